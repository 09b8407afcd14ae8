"""Decoder backends behind one small interface, tried in order: decord, then torchcodec, then PyAV.

A file fails only when every configured backend failed on it; the result says which backend decoded it.
"""

from __future__ import annotations

import contextvars
import functools
import itertools
import logging
import os
import threading
import time
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from pipeline.errors import DecodeError, DecodeTimeout, ItemTimeout
from pipeline.media import damage
from pipeline.media.chunks import ChunkClock
from pipeline.media.packets import demux, open_container
from pipeline.media.probe import (
    ASF_HEADER,
    DISCONTINUITY_S,
    EBML_MAGIC,
    cut_short_by_duration,
    first_frame,
    holds_frames,
    main_video_stream,
    quarter_turns,
    stated_duration,
    timestamps_may_jump,
)
from pipeline.video.preprocess import luma_into, per_group
from pipeline.video.sampling import FramePlan, FrameRequest, clip_duration, frame_times, make_plan

log = logging.getLogger(__name__)

Prepare = Callable[[torch.Tensor], torch.Tensor]
"""What a backend applies to each slice of frames it decoded (uint8 ``[n, h, w, 3]`` in, the frames handed out
back): the deinterlacer, which must see the lines before any vertical scaling mixes the two fields."""


@dataclass
class VideoMeta:
    num_frames: int
    fps: float
    width: int
    height: int
    timestamps: np.ndarray | None = None
    """Presentation time of each frame in seconds from the first (None where the backend cannot tell)."""
    lost_tail: int = 0
    """Frames the container's header lists past the last that demuxes (a file cut short: a broken tail), which
    ``num_frames`` does not count; 0 where none are missing or the backend cannot tell."""
    claimed_s: float | None = None
    """With ``lost_tail``: seconds from the first frame to the end the header gives."""
    lost_chunks: tuple[tuple[int, int], ...] = ()
    """``[a, b)`` ranges of an AVI's index entries (chunks with data) that the demuxer passed over in a corrupt
    stretch (``chunks.ChunkClock``): frames lost in the middle of the clip, which ``num_frames`` does not count (the
    frames after them keep their times)."""
    chunk_spans: tuple[tuple[float, float], ...] = ()
    """With ``lost_chunks``: the seconds from the first frame that each run of them spoils, to the next keyframe."""

    def truncated(self, n: int) -> VideoMeta:
        ts = self.timestamps[:n] if self.timestamps is not None else None
        return VideoMeta(n, self.fps, self.width, self.height, ts)


def _shown(packet) -> bool:
    """A packet that becomes a frame on screen: not the empty flush packet, and not one an MP4 edit list hides (a
    stream copy cut at 1.3 s keeps the frames from the keyframe before, marked discard, with negative times)."""
    return packet.size > 0 and not packet.is_discard


def main_video_index(path: str) -> int | None:
    """The container index of the main video stream (``main_video_stream``); None where the file does not open."""
    try:
        with open_container(path) as c:
            return main_video_stream(c).index
    except Exception:  # noqa: BLE001 - the decode that follows says what is wrong with the file
        return None


def timeline_offset(path: str) -> float:
    """Seconds from the container's start to the first video frame: more than 0 where another stream (the audio of
    an MPEG-TS capture) starts first. 0 where the file does not say."""
    import av

    try:
        with open_container(path) as c:
            s = main_video_stream(c)
            if s.start_time is None or c.start_time is None:
                return 0.0
            return max(0.0, float(s.start_time * s.time_base) - c.start_time / av.time_base)
    except Exception:  # noqa: BLE001 - no offset known: the first frame is at 0
        return 0.0


def seeks_frame_exactly(container: str, codec: str, containers: tuple[str, ...], codecs: tuple[str, ...]) -> bool:
    """Whether decord and torchcodec return the frames asked for in this file: its container (an FFmpeg demuxer
    name such as ``mov,mp4,m4a,3gp,3g2,mj2``, any of whose names may be listed) and codec are both in the measured
    lists (``video.random_access_containers`` and ``video.random_access_codecs``)."""
    return bool(set(container.split(",")) & set(containers)) and codec in codecs


@dataclass
class DecodedVideo:
    """Frames decoded once for every filter of an item.

    ``frames`` is uint8 ``[N, H, W, 3]`` RGB on CPU (or on the GPU with NVDEC decode); ``scale`` maps decoded
    pixels back to the source (decoding can downscale to ``video.decode_max_side``).
    """

    frames: torch.Tensor
    plan: FramePlan
    meta: VideoMeta
    backend: str
    scale: tuple[float, float]  # (source width / decoded width, source height / decoded height)
    crop: tuple[int, int, int, int] | None = None  # (x1, y1, x2, y2) in decoded pixels, applied by view()
    start_s: float = 0.0
    """Where the first frame sits on the file's timeline (the container's start, where ``ffmpeg -ss`` and the audio
    count from): ``times`` count from the first frame, and the times a row reports add this."""
    reduced: DecodedVideo | None = None
    """The requests with a ``max_side`` or ``short_side``, decoded in a second pass at the size they need where one
    pass would have taken over ``video.reduced_pass_bytes`` (``_passes``); every method routes a request to the
    video that holds it."""
    crop_source: tuple[int, int, int, int] | None = None
    """The crop last set, in source pixels (``set_crop_source``): a later decode of the item is cropped alike."""

    def _of(self, request: FrameRequest) -> DecodedVideo:
        return self if self.reduced is None or request not in self.reduced.plan.positions else self.reduced

    @property
    def frames_decoded(self) -> int:
        return len(self.plan.indices) + (self.reduced.frames_decoded if self.reduced is not None else 0)

    def view(self, request: FrameRequest, window: int = 0, step: int = 1) -> torch.Tensor:
        """The frames of one request (one window), in request order, cropped when a crop was set; with ``step``,
        every ``step``-th row and column of them, gathered without a copy of the full frames."""
        v = self._of(request)
        pos = v.plan.positions[request][window]
        return v._source(step, step)[torch.from_numpy(pos).to(v.frames.device)]

    def luma(self, request: FrameRequest, device: str, window: int = 0, step: tuple[int, int] = (1, 1)) -> torch.Tensor:
        """BT.601 luma (float32 ``[N, H, W]``, 0..255) of a request's frames on ``device``: every ``step[0]``-th row
        and ``step[1]``-th column of the (cropped) frames, read from the decoded frames in place, a frame at a time
        (``view`` and then luma copied each request's full frames first: 3x the time of this on 720p)."""
        v = self._of(request)
        src = v._source(*step)
        pos = v.plan.positions[request][window]
        out = torch.empty((len(pos),) + tuple(src.shape[1:3]), dtype=torch.float32, device=device)
        for k, p in enumerate(pos.tolist()):
            luma_into(out[k], src[p].to(device, non_blocking=True))
        return out

    def size(self, request: FrameRequest) -> tuple[int, int]:
        """``(height, width)`` of the frames that ``view`` gives for ``request`` (after the crop, before a
        ``step``)."""
        v = self._of(request)
        if v.crop is None:
            return int(v.frames.shape[1]), int(v.frames.shape[2])
        x1, y1, x2, y2 = v.crop
        return len(range(v.frames.shape[1])[y1:y2]), len(range(v.frames.shape[2])[x1:x2])

    def _source(self, row_step: int, col_step: int) -> torch.Tensor:
        """All decoded frames, cropped and strided: a view, no copy."""
        x1, y1, x2, y2 = self.crop if self.crop is not None else (None, None, None, None)
        return self.frames[:, y1:y2:row_step, x1:x2:col_step]

    def set_crop_source(self, box: tuple[int, int, int, int]) -> None:
        """Crop every later view to ``box`` (x1, y1, x2, y2) given in source pixels (filters after a safe crop see
        the crop)."""
        self.crop_source = box
        sx, sy = self.scale
        self.crop = (int(box[0] / sx), int(box[1] / sy), int(round(box[2] / sx)), int(round(box[3] / sy)))
        if self.reduced is not None:
            self.reduced.set_crop_source(box)

    def windows(self, request: FrameRequest) -> int:
        return len(self._of(request).plan.positions[request])

    def indices(self, request: FrameRequest, window: int = 0) -> np.ndarray:
        """The stream's index of each frame of a request."""
        v = self._of(request)
        return np.asarray(v.plan.indices, dtype=np.int64)[v.plan.positions[request][window]]

    def times(self, request: FrameRequest, window: int = 0) -> np.ndarray:
        """Seconds of each frame of a request."""
        v = self._of(request)
        return frame_times(v.indices(request, window), v.meta.fps, v.meta.timestamps)


def _decode_size(width: int, height: int, max_side: int | None, pixel_aspect: float = 1.0) -> tuple[int, int]:
    """The ``(w, h)`` frames are decoded at: square pixels (``square_pixels``), then at most ``max_side`` long."""
    w, h = square_pixels(width, height, pixel_aspect)
    if max_side and max(w, h) > max_side:
        s = max_side / max(w, h)
        w, h = w * s, h * s
    if (w, h) == (width, height):
        return width, height
    return max(2, int(round(w / 2)) * 2), max(2, int(round(h / 2)) * 2)


def square_pixels(width: int, height: int, pixel_aspect: float) -> tuple[float, float]:
    """The stored size of a picture whose pixels are ``pixel_aspect`` wide for 1 high (its sample aspect ratio), as
    square pixels: the stretched side shrinks (HDV's 1440x1080 at 4:3 to 1440x810, NTSC DVD's 720x480 at 32:27 to
    720x405, at 8:9 to 640x480), so the frames show the picture's shapes as a player does and take no more memory.
    Ratios within 1% of 1 and outside 1:4 to 4:1 (none is real) keep the stored size."""
    if abs(pixel_aspect - 1.0) < 0.01 or not 0.25 <= pixel_aspect <= 4.0:
        return width, height
    return (width, height / pixel_aspect) if pixel_aspect > 1 else (width * pixel_aspect, height)


class _Handoff:
    """What a backend's ``meta()`` opened or read, kept by path for its ``decode()`` of the same item to take: one
    open (decord) or one demux (PyAV) per item, not two. Bounded: a ``meta()`` whose ``decode()`` never came is
    dropped."""

    def __init__(self, limit: int = 16):
        self._items: OrderedDict[str, object] = OrderedDict()
        self._limit = limit
        self._lock = threading.Lock()

    def put(self, path: str, value: object) -> None:
        with self._lock:
            self._items[path] = value
            while len(self._items) > self._limit:
                self._items.popitem(last=False)

    def take(self, path: str) -> object | None:
        with self._lock:
            return self._items.pop(path, None)


class DecordBackend:
    name = "decord"
    random_access = True  # trusts the container's seeking: frame-exact only where ``seeks_frame_exactly`` says so
    chooses_stream = False  # decodes the stream its own FFmpeg 4 ranks best, which need not be the main stream
    # reserves memory for every frame the header states (its duration times its rate where it lists none): an MKV
    # stating 10^9 s made it throw std::bad_alloc through its C API, which aborts the process (``stated_frames``)
    trusts_stated_count = True

    def __init__(self) -> None:
        import decord  # noqa: F401 - fail at construction when the package is missing

        self._readers = _Handoff()  # opened by meta(), reused by decode() at source size

    def meta(self, path: str, stop: threading.Event | None = None) -> VideoMeta:
        import decord

        vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        h, w = vr[0].shape[:2] if len(vr) else (0, 0)  # decord exposes the size only through a frame
        ts = vr.get_frame_timestamp(np.arange(len(vr)))[:, 0].astype(np.float64) if len(vr) else None
        if ts is not None and (ts < -1e6).any():  # FFmpeg's "no timestamp" read as seconds
            raise DecodeError(f"decord gives {int((ts < -1e6).sum())} of this file's {len(ts)} frames no timestamp "
                              "(an AVI with B-frames, a VOB): it cannot place them")
        if ts is not None and ts[0] < -1e-6:
            raise DecodeError(f"decord ignores this file's edit list: it would count {int((ts < -1e-6).sum())} "
                              "hidden frames (a stream copy cut between keyframes)")
        self._readers.put(path, vr)
        fps = float(vr.get_avg_fps() or 0.0)
        ts = ts - ts[0] if ts is not None else None
        return VideoMeta(len(vr), fps, int(w), int(h), ts,
                         *_lost_on_decord(path, len(vr), fps, ts, stop))

    def decode(self, path: str, indices: list[int], size: tuple[int, int], device: str, resize: bool,
               stop: threading.Event | None = None, prepare: Prepare | None = None) -> torch.Tensor:
        import decord
        from decord.bridge import to_torch

        vr = self._readers.take(path)
        if vr is None or resize:
            vr = decord.VideoReader(path, ctx=decord.cpu(0), width=size[0], height=size[1], num_threads=1)
        # through DLPack, decord's buffer is the tensor: ``asnumpy`` copied every frame once more (our stage was
        # 0.81x raw decord's get_batch in bench_decode.py, 0.97-0.99x without the copy)
        return _in_slices(lambda part: to_torch(vr.get_batch(part)), indices, stop, decode_slice(size),
                          prepare=prepare)


class TorchcodecBackend:
    name = "torchcodec"
    nvdec = True  # decodes with NVDEC given a cuda device (its CUDA build)
    random_access = True
    chooses_stream = True  # told the main stream's index (``main_video_stream``), as PyAV and the probe choose it

    def __init__(self) -> None:
        import torchcodec  # noqa: F401

        self._streams = _Handoff()  # the stream meta() chose, for decode()
        self._decoders = _Handoff()  # opened by meta() (a scan of the file in exact mode), reused by a CPU decode()

    def _stream(self, path: str) -> int | None:
        chosen = self._streams.take(path)
        return chosen if chosen is not None else main_video_index(path)

    def meta(self, path: str, stop: threading.Event | None = None) -> VideoMeta:
        from torchcodec.decoders import VideoDecoder

        index = _FrameIndex.demux(path, stop)
        chosen = index.stream_index if index is not None else None
        dec = VideoDecoder(path, stream_index=chosen, seek_mode="exact", dimension_order="NHWC")
        m = dec.metadata
        if chosen is not None:
            self._streams.put(path, chosen)
            self._decoders.put(path, dec)
        n = int(m.num_frames or 0)
        ts = index.timestamps() if index is not None else None
        return VideoMeta(n, float(m.average_fps or 0.0), int(m.width), int(m.height),
                         ts if ts is not None and len(ts) == n else None,
                         *_lost_tail(int(m.num_frames_from_header or 0), index, m.duration_seconds_from_header,
                                     float(m.average_fps_from_header or m.average_fps or 0.0)))

    def decode(self, path: str, indices: list[int], size: tuple[int, int], device: str, resize: bool,
               stop: threading.Event | None = None, prepare: Prepare | None = None) -> torch.Tensor:
        """On CPU, FFmpeg decodes and resizes. On a GPU, NVDEC decodes at the source size and the frames are resized
        on the device in slices (so at most a slice of source-size frames is on the GPU at once). When torchcodec
        cannot decode the stream with NVDEC (codec, profile or bit depth the chip lacks) it decodes on the CPU
        instead; the frames then come back on the CPU, so that the row does not claim an NVDEC decode."""
        from torchcodec.decoders import VideoDecoder

        opened = self._decoders.take(path)
        if not device.startswith("cuda"):
            transforms = None
            if resize:
                from torchcodec.transforms import Resize

                transforms = [Resize(size=(size[1], size[0]))]
            if opened is None or resize:  # meta()'s decoder decodes at the source size
                opened = VideoDecoder(path, stream_index=self._stream(path), seek_mode="exact",
                                      dimension_order="NHWC", transforms=transforms)
            dec = opened
            return _in_slices(lambda part: dec.get_frames_at(part).data, indices, stop, decode_slice(size),
                              prepare=prepare)
        dec = VideoDecoder(path, stream_index=self._stream(path), seek_mode="exact", dimension_order="NHWC",
                           device=device)
        m = dec.metadata
        per_call = min(NVDEC_SLICE, per_group(int(m.width or 1) * int(m.height or 1) * 3, NVDEC_SLICE_BYTES))

        def decoded(part: list[int]) -> torch.Tensor:
            got = dec.get_frames_at(part).data
            if prepare is not None:  # on the device too, at the source size NVDEC decodes at
                return prepare(got)
            return resize_frames(got, size) if resize else got

        frames = _in_slices(decoded, indices, stop, per_call)
        fallback = getattr(dec, "cpu_fallback", None)
        if fallback:
            _log_nvdec_fallback(f"torchcodec: {fallback}")
            return frames.cpu()
        return frames


NVDEC_SLICE = 32
"""Frames decoded by NVDEC per call before they are resized on the device ..."""
NVDEC_SLICE_BYTES = 512 << 20
"""... and fewer where that many source-size frames would pass this (8 of 8K, 85 of 1080p)."""

_NVDEC_FALLBACKS: set[str] = set()


def _log_nvdec_fallback(status: str) -> None:
    if status not in _NVDEC_FALLBACKS:  # once per reason per process, not once per item
        _NVDEC_FALLBACKS.add(status)
        log.warning("decoded on the CPU instead of NVDEC: %s", status)


def resize_frames(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` -> uint8 ``[N, h, w, 3]`` for ``size = (w, h)``, on the frames' device: bilinear with
    antialiasing (a downscale averages like FFmpeg's scaler instead of skipping pixels)."""
    n, h, w, _ = frames.shape
    group = per_group(h * w * 3 * 4)  # a float copy of a 4K slice would be gigabytes
    out = []
    for i in range(0, n, group):
        x = frames[i:i + group].permute(0, 3, 1, 2).float()
        y = torch.nn.functional.interpolate(x, size=(size[1], size[0]), mode="bilinear", antialias=True,
                                            align_corners=False)
        out.append(y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1))
    return torch.cat(out).contiguous() if out else frames.new_empty((0, size[1], size[0], 3))


def backend_order(names: tuple[str, ...], nvdec: bool) -> tuple[str, ...]:
    """The configured backends in the order they are tried. ``nvdec`` (``video.decode_device: cuda`` on a GPU rank):
    the backends that decode with NVDEC go first, torchcodec (its frames stay on the GPU; only its CUDA build, from
    PyTorch's index, has NVDEC) then PyAV (whose PyPI wheels have it), and the others stay behind them as CPU
    fallbacks; otherwise decord, the default first, would decode every file on the CPU and NVDEC would never run."""
    if not nvdec:
        return tuple(names)
    first = [n for n in ("torchcodec", "pyav") if n in names]
    return (*first, *[n for n in names if n not in first])


class PyAVBackend:
    """Names every frame it hands out by its timestamp (seeking only where the timestamps vouch for the frame) or by
    its place in a decode from the start; tolerates a broken tail by keeping what decoded."""

    name = "pyav"
    nvdec = True  # decodes with NVDEC given a cuda device (decode)
    random_access = False  # does not trust a container's seeking: right in every container (see decode)
    chooses_stream = True  # decodes ``main_video_stream``, the probe's choice

    def __init__(self) -> None:
        self._indices = _Handoff()  # the demux meta() read, for decode() to seek by

    def meta(self, path: str, stop: threading.Event | None = None) -> VideoMeta:
        with open_container(path) as c:
            s = main_video_stream(c)
            rate = float(s.average_rate or s.guessed_rate or 0.0)
            n = header = int(s.frames or 0)
            stated_s = float(s.duration * s.time_base) if s.duration else None
            width, height = int(s.codec_context.width), int(s.codec_context.height)
            if quarter_turns(_first_frame_rotation(c, s)) % 2:  # the size the frames are shown (and decoded) at
                width, height = height, width
        index = _FrameIndex.demux(path, stop)
        if index is not None:
            self._indices.put(path, index)
            # the frames shown: the header counts what an edit list hides, and TS and raw streams have no count
            n = index.count
        ts = index.timestamps() if index is not None else None
        return VideoMeta(n, rate, width, height, ts if ts is not None and len(ts) == n else None,
                         *_lost_tail(header, index, stated_s, rate), *(index.lost_chunks() if index else ((), ())))

    def decode(self, path: str, indices: list[int], size: tuple[int, int], device: str, resize: bool,
               stop: threading.Event | None = None, prepare: Prepare | None = None) -> torch.Tensor:
        """Frames by index in presentation order. Where a keyframe lies between two wanted frames the decode seeks
        to it instead of decoding the frames between, and every frame is identified by its timestamp, so a seek
        that lands elsewhere (MPEG-TS, open GOPs) is noticed; where timestamps cannot identify frames (AVI) or a
        seek misses, the whole request is decoded from the start.

        On a GPU (``device`` ``cuda:N``, from ``video.decode_device: cuda``) NVDEC decodes the stream through the
        FFmpeg that PyAV's wheels carry (built with NVDEC; the CUDA torchcodec is not on PyPI): each frame is
        downloaded, converted and resized by FFmpeg on the CPU as before, and the frames go to the device. Where
        NVDEC cannot decode the stream (no CUDA, a codec or profile the chip lacks, any error), it is decoded on the
        CPU as without a GPU, a warning once per reason saying why: a packet that NVDEC fails on is not taken for a
        corrupt stretch."""
        index_of = self._indices.take(path) or _FrameIndex.demux(path, stop)
        if device.startswith("cuda"):
            try:
                return self._decode(path, indices, size, stop, prepare, index_of, _nvdec_accel(device)).to(device)
            except (DecodeCancelled, TruncatedVideo):
                raise
            except Exception as e:  # noqa: BLE001 - NVDEC could not: the CPU decode below answers for the file
                _log_nvdec_fallback(f"pyav: {type(e).__name__}: {e}")
        return self._decode(path, indices, size, stop, prepare, index_of)

    def _decode(self, path: str, indices: list[int], size: tuple[int, int], stop: threading.Event | None,
                prepare: Prepare | None, index_of: _FrameIndex | None, hw=None) -> torch.Tensor:
        start = 0
        try:
            got = self._decode_seeking(path, sorted(set(indices)), size, index_of, stop, prepare, hw)
        except _SeekMiss as e:
            if isinstance(e, _CorruptPacket):  # sound timestamps: in order from the keyframe before the frames
                start = max(0, index_of.keyframe_at_or_before(min(indices))[0])
                start = start if start >= SEEK_MIN_SKIP else 0
            log.debug("pyav: decoding %s in order from frame %d: %s", path, start, e)
        else:
            return torch.from_numpy(np.stack([got[i] for i in indices]))
        try:
            return self._decode_in_order(path, indices, size, stop, prepare, index_of, start, hw)
        except _SeekMiss as e:  # the seek to ``start`` landed after the frames wanted
            log.debug("pyav: decoding %s from the start: %s", path, e)
            return self._decode_in_order(path, indices, size, stop, prepare, index_of, hw=hw)

    def _decode_seeking(self, path: str, wanted: list[int], size: tuple[int, int],
                        index_of: _FrameIndex | None = None, stop: threading.Event | None = None,
                        prepare: Prepare | None = None, hw=None) -> dict[int, np.ndarray]:
        import av

        index_of = index_of or _FrameIndex.demux(path, stop)
        if index_of is None or index_of.pts is None or wanted[-1] >= index_of.count:
            raise _SeekMiss("no timestamps, or fewer packets than frames")
        if index_of.repeats:
            raise _SeekMiss("repeated timestamps")
        got: dict[int, np.ndarray] = {}
        pos = -1  # index of the last frame decoded
        frames = None
        try:
            with _open(path, hw) as c:
                stream = _decoding_stream(c, hw)
                step = max(1, int(round(0.5 / float(stream.time_base))))  # half a second in stream ticks
                by_dts = False  # learnt per file: MPEG-TS lands on a keyframe by its decode time, MP4 by its own
                for target in wanted:
                    # the last keyframe at or before the target (-1: none is shown before it; decode from the start)
                    k, key_dts = index_of.keyframe_at_or_before(target)
                    if frames is None and k < SEEK_MIN_SKIP:  # near the start (or no keyframe shown before it)
                        frames = _from_start(_decoded(c, stream, index_of), index_of)
                    elif k - pos - 1 >= SEEK_MIN_SKIP:  # a keyframe well past what is decoded: seeking skips frames
                        key_pts = int(index_of.pts[k])
                        tries = [key_dts, key_dts - step, key_dts - 4 * step, key_dts - 16 * step]
                        for n, at in enumerate(tries if by_dts else [key_pts, *tries]):
                            c.seek(at, stream=stream, backward=True, any_frame=False)
                            frames = _from_keyframe(_decoded(c, stream, index_of), index_of)
                            first = next(frames, None)
                            if first is not None and first[0] <= target:
                                frames = itertools.chain([first], frames)
                                break
                            by_dts = by_dts or (n == 0 and key_dts != key_pts)  # landed late: seek by decode time
                        else:
                            raise _SeekMiss("every seek landed after the frame wanted")
                    for pos, frame in frames:
                        _check(stop)
                        if pos == target:
                            got[target] = _upright_rgb(frame, size, prepare)
                        if pos >= target:
                            break
                    if target not in got:
                        raise _SeekMiss(f"frame {target} did not decode in order after a seek")
        except av.error.FFmpegError as e:
            if hw is not None:
                raise
            raise _CorruptPacket(f"{type(e).__name__}: {e}") from None
        return got

    def _decode_in_order(self, path: str, indices: list[int], size: tuple[int, int],
                         stop: threading.Event | None = None, prepare: Prepare | None = None,
                         index_of: _FrameIndex | None = None, start: int = 0, hw=None) -> torch.Tensor:
        """Frames by their place in a decode from the start, a packet at a time. Packets that do not decode (a
        corrupt stretch: a bad sector, a damaged download) are passed over: where the timestamps name frames
        (``index_of``, agreeing with their places so far), the first frame that decodes after them is placed by its
        timestamp, and the frames lost between are the frame shown before them (as a player holds it), a warning
        saying how many; where nothing decodes after them, or nothing can place what does, the clip ends there
        (a broken tail: ``TruncatedVideo``). Before, a corrupt second in the middle of a film ended it there. Until
        the next keyframe after a stretch (packets that did not decode, or an AVI's chunks the demuxer passed over),
        a frame the decoder drops for a lost reference (a B-frame) is held the same way, its place named by the
        timestamp of the frame after it (placed by count, every frame after it came one place early).

        ``start``: a keyframe to seek to and decode from (where the seeking decode met a corrupt stretch, whose
        timestamps it had found sound), its frames placed by their timestamps; ``_SeekMiss`` where the seek lands
        after the first frame wanted."""
        import av

        wanted = set(indices)
        last = max(indices)
        got: dict[int, np.ndarray] = {}
        agrees = index_of is not None and index_of.pts is not None and not index_of.repeats
        keyed = agrees and not index_of.may_jump  # a keyframe's timestamp names its place, if not its frames' order
        # frames passed over after an error waiting for a keyframe, at most the longest stretch between two of them
        patience = int(np.diff(index_of.key_positions).max(initial=0)) + 1 if keyed else 0
        skipped = 0
        i, prev, failed = -1, None, None  # the last frame's place, that frame, the error of packets since it
        bad, lost, concealed = 0, [], 0  # packets that did not decode, the [a, b) places of the frames they held
        spans: list[tuple[float, float]] = []  # seconds from the first frame that the stretches spoil
        landed = not start  # after a seek: the first keyframe decoded has not yet given its place
        # since a corrupt stretch (the decode time of the packet after it), until a keyframe decoded after it: the
        # decoder may drop frames; frames still come out that were decoded before it (a decoder's delay)
        recovering: int | None = None
        with _open(path, hw) as c:
            stream = _decoding_stream(c, hw)
            if start:
                c.seek(int(index_of.pts[start]), stream=stream, backward=True, any_frame=False)
            sought = bool(start)  # the first packet after a seek passes over every chunk before it
            for packet, passed in _placed(c, stream, index_of):
                if passed and not sought:  # an AVI's chunks passed over
                    recovering = packet.dts
                sought = sought and not packet.size
                try:
                    frames = packet.decode()
                except av.error.FFmpegError as e:
                    if hw is not None:  # NVDEC failing is not a corrupt stretch: the CPU decode will tell
                        raise
                    failed, bad = e, bad + 1
                    if recovering is None:
                        recovering = packet.dts if packet.dts is not None else -(1 << 62)
                    continue
                skipping = False  # frames after an error passed over to the next keyframe (``keyed``)
                for frame in frames:
                    _check(stop)
                    if not landed:  # the seek's first keyframe: placed by its timestamp (frames before it skipped)
                        j = index_of.get(frame.pts) if frame.key_frame else None
                        if j is None:
                            continue
                        if j > min(wanted):
                            raise _SeekMiss(f"the seek to frame {start} landed at frame {j}")
                        i, landed, failed = j - 1, True, None
                    # the first frame after packets that did not decode, or one after frames the decoder dropped
                    j = index_of.get(frame.pts) if agrees and (failed is not None or recovering is not None) else None
                    if j is None and (failed is not None or recovering is not None) and frame.key_frame and keyed:
                        # frames whose timestamps do not follow their places (H.264 in AVI: the packets' decode
                        # order): a keyframe shows where it decodes, as nothing before it shows after it
                        j = index_of.get(frame.pts)
                    if failed is not None and (j is None or j <= i):
                        if keyed and not agrees and skipped < patience:
                            skipping, skipped = True, skipped + 1
                            continue  # passed over to the next keyframe, which places itself (else: the end)
                        break  # nothing places it: the clip ends at the error (below)
                    if j is not None and j > i + 1:
                        for k in range(i + 1, j):  # the frames lost in between: the frame shown before them
                            if k in wanted:
                                got[k] = _upright_rgb(prev if prev is not None else frame, size, prepare)
                                concealed += 1
                        lost.append((i + 1, j))
                        spans.append(index_of.damaged_span(i + 1, j))
                        i = j - 1
                    failed, skipped = None, 0
                    i += 1
                    if agrees and index_of.get(frame.pts) != i:
                        agrees = False  # an edit list or a stream the timestamps cannot name: places by count only
                    if i in wanted:
                        got[i] = _upright_rgb(frame, size, prepare)
                    prev = frame
                    if recovering is not None and frame.key_frame and (frame.pts or 0) >= recovering:
                        recovering = None
                    if i >= last:
                        break
                if i >= last or (failed is not None and frames and not skipping):
                    break
        if not landed:
            raise _SeekMiss(f"nothing decoded after the seek to frame {start}")
        if failed is not None and i < last:
            if not got:
                raise failed
            log.debug("pyav: broken tail after %d frames: %s", i + 1, failed)
        if lost:
            offset = timeline_offset(path)  # the rows' times are on the file's timeline
            damage.video_lost(lost, [(a + offset, b + offset) for a, b in spans])
            why = f"{bad} packets of %s did not decode" if bad else "the decoder dropped frames of %s after a stretch"
            log.warning("pyav: " + why + ": %d frames lost in the middle of the clip, the %d of them asked for are the "
                        "frame shown before them", damage.where(path), sum(b - a for a, b in lost), concealed)
        if not got:
            raise DecodeError("no frame decoded")
        if len(got) < len(wanted):
            raise TruncatedVideo(i + 1 if i < last else max(got) + 1)
        return torch.from_numpy(np.stack([got[i] for i in indices]))


def _placed(container, stream, index_of: _FrameIndex | None):
    """``container.demux(stream)``, each packet of an AVI timed by the file's index as ``index_of``'s were
    (``chunks.ChunkClock``: after a corrupt stretch the demuxer's count would time every packet early), with the
    chunks the demuxer passed over before it (0 elsewhere)."""
    clock = index_of.chunks.fresh() if index_of is not None and index_of.chunks is not None else None
    for packet in demux(container, stream):
        yield packet, clock.place(packet) if clock is not None else 0


def _decoded(container, stream, index_of: _FrameIndex | None):
    """``container.decode(stream)`` over ``_placed`` packets."""
    for packet, _ in _placed(container, stream, index_of):
        yield from packet.decode()


def _nvdec_accel(device: str):
    """PyAV's settings for NVDEC on ``device``'s GPU, sharing the CUDA primary context that torch uses (no second
    context per file), without FFmpeg's silent software fallback (``_decoding_stream`` checks the rest)."""
    from av.codec.hwaccel import HWAccel

    index = int(device.split(":")[1]) if ":" in device else 0
    torch.cuda.set_device(index)
    torch.cuda.current_stream().query()  # torch's primary context current in this (decode) thread, for current_ctx
    return HWAccel("cuda", device=str(index), allow_software_fallback=False, options={"current_ctx": "1"})


def _open(path: str, hw=None):
    return open_container(path) if hw is None else open_container(path, hwaccel=hw)


def _decoding_stream(container, hw=None):
    """The main video stream, set to decode with frame threads; with ``hw``, one NVDEC decodes (``NvdecUnavailable``
    where FFmpeg has no NVDEC decoder for its codec, which PyAV would otherwise decode on the CPU)."""
    stream = main_video_stream(container)
    if hw is not None and not stream.codec_context.is_hwaccel:
        raise NvdecUnavailable(f"no NVDEC decoder for {stream.codec_context.name}")
    stream.thread_type = "AUTO"
    return stream


class NvdecUnavailable(Exception):
    """NVDEC cannot decode this stream: the CPU decodes it."""


SEEK_MIN_SKIP = 16
"""PyAV seeks only where that skips at least this many frames: a seek flushes the decoder and refills its frame
threads, which costs about as much as decoding a few frames."""


class _SeekMiss(Exception):
    """The seeking decode cannot vouch for a frame: decode from the start instead."""


class _CorruptPacket(_SeekMiss):
    """The seeking decode met a packet that does not decode (a corrupt stretch): its timestamps are sound, so the
    decode in order may start at the keyframe before the first frame wanted rather than at the file's start."""


def _from_keyframe(frames, index_of):
    """``(index, frame)`` in presentation order from the first keyframe a decode outputs after a seek: frames
    before it (leading pictures of an open GOP) may lack their references. From there every frame must carry the
    next index. After a seek in MPEG-PS the keyframe itself can carry a later frame's timestamp, which only its
    successor shows: the keyframe is handed out once its successor confirms it, and dropped where the successor
    contradicts it (the frames after it decode from it, so they are sound and carry their own timestamps)."""
    key = last = None
    for frame in frames:
        i = index_of.get(frame.pts)
        if i is None:
            raise _SeekMiss(f"a decoded timestamp ({frame.pts}) is not a packet's")
        if key is None:
            if frame.key_frame:
                key, last = (i, frame), i
            continue
        if last == key[0] and key[1] is not None:  # the keyframe's successor: confirm or drop the keyframe
            if i == last + 1:
                yield key
            key = (key[0], None)
        elif i != last + 1:
            raise _SeekMiss(f"frame {i} came after frame {last}: this seek's timestamps cannot name frames")
        yield i, frame
        last = i
    if key is not None and key[1] is not None:
        raise _SeekMiss("nothing decoded after the keyframe to confirm its timestamp")


def _from_start(frames, index_of):
    """``(index, frame)`` from a decode of the whole stream: sound without a keyframe check (an edit list may hide
    the first keyframe), and every frame must carry the next index."""
    for expected, frame in enumerate(frames):
        i = index_of.get(frame.pts)
        if i != expected:
            raise _SeekMiss(f"frame {expected} from the start carries the timestamp of {i}")
        yield i, frame


class _FrameIndex:
    """The main video stream's shown frames, from one demux (no decode): ``count`` of them; ``pts`` sorted, so that
    index i is the i-th frame shown (None where a packet has no timestamp: raw streams); and the keyframes, where a
    decode may start, with their decode timestamps. Arrays rather than dicts: ten hours of 60 fps is two million
    frames."""

    def __init__(self, count: int, pts: np.ndarray | None, dts: np.ndarray, key: np.ndarray, time_base: float,
                 may_jump: bool, stream_index: int = 0):
        self.count = count
        self.packets = count  # every packet of the stream that demuxed, shown or hidden by an edit list (``demux``)
        self.chunk_clock = False
        """The stream's timestamps count its chunks (AVI): the header's frame count lists the empty ones too (a frame
        dropped at capture, shown as the one before), which FFmpeg's demuxer passes over, and ends where that count
        at the frame rate does."""
        self.cut_short: tuple[float, float] | None = None
        """Where every stream ends and where the container says the file ends, in seconds from the first frame,
        where the second is more than ``probe.CUT_SHORT_S`` later (a download cut short whose header counts no frames
        but states where it ends: ``probe.stated_duration``)."""
        self.stream_index = stream_index  # the container's index of the stream demuxed (``main_video_stream``)
        self.chunks: ChunkClock | None = None
        """An AVI's clock (``chunks.ChunkClock``): the packets of this demux were timed by the file's index, and
        every decode's are (``_placed``); ``chunks.lost`` the chunks the demuxer passed over."""
        self.time_base = time_base
        self.may_jump = may_jump
        self.pts = None
        self.repeats = False
        if pts is None:
            return
        order = np.argsort(pts, kind="stable")
        self.pts = pts[order]
        self.repeats = len(self.pts) > 1 and not (np.diff(self.pts) > 0).all()
        position = np.empty_like(order)
        position[order] = np.arange(len(order))
        by_position = np.argsort(position[key], kind="stable")
        self.key_positions = position[key][by_position]
        self.key_dts = dts[key][by_position]

    @classmethod
    def demux(cls, path: str, stop: threading.Event | None = None) -> _FrameIndex | None:
        """None where the file does not demux (the decode that follows says what is wrong with it)."""
        import av

        pts, dts, key = array("q"), array("q"), array("b")
        count, packets, timed, duration = 0, 0, True, 0
        try:
            with open_container(path) as c:
                s = main_video_stream(c)
                clock = ChunkClock.of(c, s)
                for p in demux(c, s):
                    if clock is not None:
                        clock.place(p)
                    packets += p.size > 0
                    if not _shown(p):
                        continue
                    count += 1
                    if count % 1024 == 0:
                        _check(stop)
                    if p.pts is None:
                        timed = False
                    if timed:
                        pts.append(p.pts)
                        dts.append(p.dts if p.dts is not None else p.pts)
                        key.append(bool(p.is_keyframe))
                        duration = p.duration  # the last one's: the pictures end after the latest pts by about it
                time_base, may_jump, stream_index = float(s.time_base), timestamps_may_jump(c), s.index
                chunked = c.format.name == "avi"
                origin = c.start_time / av.time_base if c.start_time is not None else 0.0
                stated = stated_duration(c)
        except DecodeCancelled:
            raise
        except Exception:  # noqa: BLE001 - no index: sampling by the average rate, decoding from the start
            return None
        decode_ts = np.frombuffer(dts, np.int64)
        index = cls(count, np.frombuffer(pts, np.int64) if timed and count else None, decode_ts,
                    np.frombuffer(key, np.int8) > 0, time_base, may_jump, stream_index)
        index.packets = packets
        index.chunks = clock
        if chunked and index.pts is not None:
            index.chunk_clock = True  # the chunks spanned (decode order), empty ones too
            index.packets = max(packets, int(decode_ts.max() - decode_ts.min()) + 1)
        if index.pts is not None and stated is not None and not may_jump:  # index.pts: sorted
            end = (float(index.pts[-1]) + (duration or 0)) * time_base
            index.cut_short = _cut_short(path, stated, origin, float(index.pts[0]) * time_base - origin,
                                         end - origin, stop)
        return index

    def lost_chunks(self) -> tuple[tuple[tuple[int, int], ...], tuple[tuple[float, float], ...]]:
        """``VideoMeta.lost_chunks`` and ``chunk_spans``: the chunks an AVI's demux passed over (``ChunkClock.lost``),
        and for each run the seconds from the first frame from the time of the chunk before it (which demuxed, but
        whose data the stretch may have begun in) to the keyframe at or after the first frame shown after it (the
        frames between decode from lost references); to the clip's end where no keyframe follows."""
        clock = self.chunks
        if clock is None or clock.stopped or not clock.lost or self.pts is None or not len(self.pts):
            return (), ()
        first, spans = int(self.pts[0]), []
        end_ticks = int(self.pts[-1]) + 1
        for a, b in clock.lost:
            after = int(np.searchsorted(self.pts, clock.tick(b)))  # b: the chunk placed after the run
            k = int(np.searchsorted(self.key_positions, after))
            end = int(self.pts[int(self.key_positions[k])]) if k < len(self.key_positions) else end_ticks
            start = clock.tick(max(a - 1, 0))  # the chunk before: a stretch rarely starts where a chunk does
            spans.append((max(start - first, 0) * self.time_base, (end - first) * self.time_base))
        return tuple(clock.lost), tuple(spans)

    def timestamps(self) -> np.ndarray | None:
        """Seconds of each frame from the first. None where they cannot give times: a splice of MPEG-TS recordings
        restarts the clock (repeated timestamps) or jumps it by an hour, and sampling by such times would pick one
        frame eight times."""
        if self.pts is None or self.repeats:
            return None
        t = self.pts.astype(np.float64) * self.time_base
        if self.may_jump and len(t) > 1 and np.diff(t).max() >= DISCONTINUITY_S:
            return None
        return t - t[0]

    def damaged_span(self, first: int, after: int) -> tuple[float, float]:
        """Seconds from the first frame spanned by a corrupt stretch: from frame ``first`` (the first lost) to the
        keyframe at or after frame ``after`` (the first decoded after the stretch), the frames between decoding from
        damaged references; to the clip's end where no keyframe follows. Where the clock is spliced
        (``timestamps`` None) frames are timed by their count at the clip's usual frame duration."""
        t = self.timestamps()
        if t is None:
            step = float(np.median(np.diff(self.pts))) * self.time_base if len(self.pts) > 1 else 0.0
            t = np.arange(len(self.pts), dtype=np.float64) * step
        k = int(np.searchsorted(self.key_positions, after))
        if k < len(self.key_positions):
            end = t[int(self.key_positions[k])]
        else:
            end = t[-1] + (t[-1] - t[-2] if len(t) > 1 else 0.0)
        return float(t[first]), float(end)

    def get(self, pts: int | None) -> int | None:
        """The presentation index of the frame with this timestamp (None: no packet has it)."""
        if pts is None:
            return None
        i = int(np.searchsorted(self.pts, pts))
        return i if i < len(self.pts) and self.pts[i] == pts else None

    def keyframe_at_or_before(self, target: int) -> tuple[int, int]:
        """The last keyframe shown at or before frame ``target`` and its decode timestamp; (-1, 0) where none is
        (an edit list hides the first keyframe)."""
        j = int(np.searchsorted(self.key_positions, target, side="right")) - 1
        return (int(self.key_positions[j]), int(self.key_dts[j])) if j >= 0 else (-1, 0)


def _cut_short(path: str, stated: float | None, origin: float, first: float, last: float,
               stop: threading.Event | None = None) -> tuple[float, float] | None:
    """``_FrameIndex.cut_short``: where the pictures end and where the container says the file ends, in seconds from
    the first frame, where the file was cut short (``cut_short_by_duration``); None else. ``origin`` is the
    container's start, ``first`` and ``last`` where the pictures start and end on the file's timeline."""
    if not cut_short_by_duration(path, stated, origin, last, lambda: _check(stop)):
        return None
    return last - first, stated - first


def _frames_cut(cut: tuple[float, float] | None, fps: float) -> tuple[int, float | None]:
    """``VideoMeta.lost_tail`` and ``claimed_s`` from a ``_cut_short``: the frames its missing seconds hold at
    ``fps`` (the header lists none to count)."""
    if cut is None or fps <= 0:
        return 0, None
    last, claimed = cut
    return max(1, round((claimed - last) * fps)), claimed


def _lost_on_decord(path: str, frames: int, fps: float, timestamps: np.ndarray | None,
                    stop: threading.Event | None = None) -> tuple[int, float | None]:
    """``VideoMeta.lost_tail`` and ``claimed_s`` for a backend that counts only the frames it reads (decord, which
    decodes a download cut short as its prefix without a word): an AVI's header frame count against the chunks its
    ``frames`` span (their ``timestamps`` from the first, ``_FrameIndex.chunk_clock``), a Matroska, WebM, FLV or
    WMV file's stated duration against the seconds of pictures (``_cut_short``). Only such files are opened: the other
    containers' ends are not checked (``stated_duration``), and opening each costs the primary backend's every item
    a few milliseconds."""
    import av

    try:
        with open(path, "rb") as f:
            head = f.read(12)
        avi = head[:4] == b"RIFF" and head[8:12] == b"AVI "
        if not avi and head[:4] != EBML_MAGIC and head[:3] != b"FLV" and head[:12] != ASF_HEADER[:12]:
            return 0, None
        with open_container(path) as c:
            s = main_video_stream(c)
            if avi:
                spanned = round(float(timestamps[-1]) * fps) + 1 if timestamps is not None and len(timestamps) else 0
                return _chunks_lost(int(s.frames or 0), max(frames, spanned), 1 / fps if fps > 0 else 0.0)
            stated = stated_duration(c)
            origin = c.start_time / av.time_base if c.start_time is not None else 0.0
            first = float(s.start_time * s.time_base) - origin if s.start_time is not None else 0.0
    except DecodeCancelled:
        raise
    except Exception:  # noqa: BLE001 - nothing to compare with: the decode says what is wrong with the file
        return 0, None
    played_s = clip_duration(frames, fps, timestamps)
    return _frames_cut(_cut_short(path, stated, origin, first, first + played_s, stop), fps)


def _chunks_lost(listed: int, spanned: int, tick_s: float) -> tuple[int, float | None]:
    """``VideoMeta.lost_tail`` and ``claimed_s`` of an AVI (``_FrameIndex.chunk_clock``): the chunks its header lists
    past the ``spanned`` ones its frames reach, empty ones included, and where the listed ones end at ``tick_s`` a
    chunk (FFmpeg gives an AVI cut short the duration of what it holds)."""
    lost = listed - spanned
    return (lost, listed * tick_s) if lost > 0 and tick_s > 0 else (0, None)


def _lost_tail(header: int, index: _FrameIndex | None, stated_s: float | None,
               fps: float) -> tuple[int, float | None]:
    """``VideoMeta.lost_tail`` and ``claimed_s``: the frames the container's header lists (``header``: an MP4's
    sample count, hidden frames of an edit list included; 0 where it gives none) past the packets that demux (a file
    cut short), and the duration the header states; where the header lists no frames but states a duration that
    every stream ends well before (``_FrameIndex.cut_short``), the frames that duration would hold at ``fps``."""
    if index is None:
        return 0, None
    if index.chunk_clock:
        return _chunks_lost(header, index.packets, index.time_base)
    lost = max(0, header - index.packets) if header else 0
    if lost:
        return lost, (float(stated_s) if stated_s else None)
    return _frames_cut(index.cut_short, fps) if not header else (0, None)


def _first_frame_rotation(container, stream) -> float:
    """PyAV exposes the display matrix only on decoded frames; a stream whose first frame does not decode says 0
    here and fails in ``decode``."""
    try:
        frame = first_frame(container, stream)
    except DecodeError:
        return 0.0
    return float(getattr(frame, "rotation", 0) or 0)


def _upright_rgb(frame, size: tuple[int, int], prepare: Prepare | None = None) -> np.ndarray:
    """One PyAV frame as RGB ``[h, w, 3]`` at ``size = (w, h)`` in display orientation: the container's rotation
    (phone video) applied, as decord, torchcodec and the ffmpeg CLI apply it, so the fallback backend hands the
    filters the same upright frames and crop boxes mean the same pixels. ``prepare`` then, as on a slice of the
    other backends' frames."""
    k = quarter_turns(getattr(frame, "rotation", 0))
    w, h = (size[1], size[0]) if k % 2 else size
    planar = SEMI_PLANAR.get(frame.format.name)
    if planar is not None:  # NVDEC's download: repacked (exactly) so that FFmpeg converts it as a CPU decode's
        frame = frame.reformat(format=planar)
    rgb = frame.to_ndarray(format="rgb24", width=w, height=h)
    rgb = np.rot90(rgb, k) if k else rgb
    return rgb if prepare is None else prepare(torch.from_numpy(np.ascontiguousarray(rgb))[None])[0].numpy()


SEMI_PLANAR = {"nv12": "yuv420p", "nv21": "yuv420p", "nv16": "yuv422p", "nv24": "yuv444p", "p010le": "yuv420p10le",
               "p016le": "yuv420p16le"}
"""Pixel formats with interleaved chroma (what NVDEC hands over) and their planar twins (what a CPU decoder gives).
FFmpeg's scaler converts the two to RGB differently (its planar path repeats each chroma sample, the other
interpolates): 2.2 levels apart on average and up to 189 at sharp colour edges, measured on an H200 against the
CPU decode of the same H.264. The repacking is exact, and the RGB then equals the CPU decode's."""


class TruncatedVideo(Exception):
    """The stream ends (a broken tail) before the frame count the container claims."""

    def __init__(self, decodable: int):
        super().__init__(f"only the first {decodable} frames decode")
        self.decodable = decodable


class PillowBackend:
    """Animated images that FFmpeg does not decode (an animated WebP: FFmpeg up to 8.1 reads a 0x0 stream), through
    Pillow, frame by frame in order; each frame's time from the durations the file gives
    (``probe.read_webp_animation``). Last in the default order: FFmpeg decodes GIF and APNG itself."""

    name = "pillow"
    random_access = False  # decodes in order
    chooses_stream = False  # an image has one picture stream

    def __init__(self) -> None:
        from PIL import Image  # noqa: F401 - ImportError here: the backend is unavailable

    def meta(self, path: str, stop: threading.Event | None = None) -> VideoMeta:
        from pipeline.media.probe import read_webp_animation

        a = read_webp_animation(path)
        return VideoMeta(len(a.times), a.fps, a.width, a.height, a.times)

    def decode(self, path: str, indices: list[int], size: tuple[int, int], device: str, resize: bool,
               stop: threading.Event | None = None, prepare: Prepare | None = None) -> torch.Tensor:
        from PIL import Image

        got: dict[int, torch.Tensor] = {}
        done = -1
        with Image.open(path) as im:
            for i in sorted(set(indices)):
                try:
                    for j in range(done + 1, i + 1):  # each frame builds on the one before: decoded in order,
                        _check(stop)  # a given-up decode stopping at the next
                        im.seek(j)
                        im.load()
                        done = j
                    rgb = im.convert("RGB")
                except (OSError, EOFError, ValueError) as e:
                    if done < 0:
                        raise DecodeError(f"frame 0 does not decode: {type(e).__name__}: {e}") from e
                    raise TruncatedVideo(done + 1) from e  # a broken tail: the frames before it are the clip
                if rgb.size != size:
                    rgb = rgb.resize(size, Image.Resampling.BILINEAR)
                frame = torch.from_numpy(np.asarray(rgb).copy())[None]
                got[i] = (frame if prepare is None else prepare(frame))[0]
        return torch.stack([got[i] for i in indices])


BACKENDS: dict[str, Callable[[], object]] = {
    "decord": DecordBackend,
    "torchcodec": TorchcodecBackend,
    "pyav": PyAVBackend,
    "pillow": PillowBackend,
}


def available_backends(names: tuple[str, ...]) -> list[object]:
    """Instantiate the configured backends that are installed (decord has no wheel off x86_64 Linux)."""
    out = []
    for name in names:
        try:
            out.append(BACKENDS[name]())
        except ImportError as e:
            log.warning("video backend %s unavailable (%s); using the others", name, e)
    if not out:
        from pipeline.errors import DependencyError

        raise DependencyError(f"none of the video backends {names} is installed (pip install decord torchcodec av)")
    return out


class DecodeCancelled(Exception):
    """Raised inside a decode that ``decode_video`` gave up at its deadline: the decode thread unwinds at its next
    frame (PyAV) or slice of frames (decord, torchcodec) and frees what it decoded, instead of decoding on for
    nobody."""


def _check(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise DecodeCancelled()


DECODE_SLICE_BYTES = 192 << 20
"""Decoded bytes per call of a seeking backend (decord ``get_batch``, torchcodec ``get_frames_at``) on the CPU:
between calls a given-up decode stops. A call is one native step that cannot be interrupted, and its time grows
with its pixels: 32 frames of 1080p (about a third of a second here), 72 of 720p, 8 of 4K. A request under it is
one call, its frames the tensor the backend returns; over it, the slices are copied into one (about a fifth of the
decode's time at 720p: 32 frames a call before, so 61 frames of 720p were copied once more)."""

DECODE_SLICE_MAX = 512
"""Frames per call at most (small frames: 512 of 240p decode in about the time of 32 of 1080p)."""


def decode_slice(size: tuple[int, int]) -> int:
    """Frames per call of a CPU decode at ``size`` (width, height): ``DECODE_SLICE_BYTES`` of them, at most
    ``DECODE_SLICE_MAX``."""
    return min(DECODE_SLICE_MAX, per_group(size[0] * size[1] * 3, DECODE_SLICE_BYTES))


def _in_slices(get: Callable[[list[int]], torch.Tensor], indices: list[int], stop: threading.Event | None,
               per_call: int, prepare: Prepare | None = None) -> torch.Tensor:
    """``get(indices)`` (frames ``[n, h, w, 3]``), ``per_call`` indices at a time, checking ``stop`` before each
    call, and ``prepare`` applied to each slice; the slices are copied into one tensor as they come (the frames
    are not held twice)."""
    def sliced(part: list[int]) -> torch.Tensor:
        got = get(part)
        return got if prepare is None else prepare(got)

    _check(stop)
    if len(indices) <= per_call:
        return sliced(indices)
    out = None
    for i in range(0, len(indices), per_call):
        if i:
            _check(stop)
        part = sliced(indices[i:i + per_call])
        if out is None:
            out = torch.empty((len(indices), *part.shape[1:]), dtype=part.dtype, device=part.device)
        out[i:i + part.shape[0]] = part
        if part.shape[0] != len(indices[i:i + per_call]):
            return out[:i + part.shape[0]]  # fewer than asked: the caller's count check names it
    return out


_GIVEN_UP: set[threading.Thread] = set()
_GIVEN_UP_LOCK = threading.Lock()


def decodes_past_deadline() -> int:
    """Decode threads given up (at ``video.decode_timeout_s``, or with their item) that are still running: a decode
    stuck inside one native call (an FFmpeg loop that does not return) cannot be stopped from Python and keeps its
    thread, and a CPU core if it spins. The others end at their next frame or slice. Reported as
    ``decodes_past_deadline`` in the metrics log."""
    with _GIVEN_UP_LOCK:
        _GIVEN_UP.difference_update([t for t in _GIVEN_UP if not t.is_alive()])
        return len(_GIVEN_UP)


def _with_deadline(attempt: Callable[[threading.Event], DecodedVideo], name: str, timeout_s: float,
                   given_up: threading.Event | None = None) -> DecodedVideo:
    """``attempt(stop)`` on a thread of its own, waited for at most ``timeout_s``; past it ``stop`` is set (the
    attempt unwinds with ``DecodeCancelled`` at its next check) and the item gets ``DecodeTimeout``. The same when
    ``given_up`` is set (the rank's watchdog let the item go): then ``ItemTimeout``, for a row nobody writes. A
    thread per attempt rather than a pool: a decode stuck in native code holds only its own thread, where a pool's
    stuck workers would leave every later decode of the process waiting for one until its own deadline."""
    stop, done = threading.Event(), threading.Event()
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["video"] = attempt(stop)
        except DecodeCancelled:
            log.debug("%s: a decode given up at its deadline stopped", name)
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread, which raises it
            box["error"] = e
        finally:
            done.set()

    context = contextvars.copy_context()  # the item the caller works on, for the decode's warnings
    thread = threading.Thread(target=context.run, args=(run,), name=f"decode-{name}", daemon=True)
    thread.start()
    end = time.monotonic() + timeout_s
    while not done.wait(min(GIVEN_UP_POLL_S, max(0.0, end - time.monotonic()))):
        watchdog = given_up is not None and given_up.is_set()
        if watchdog or time.monotonic() >= end:
            stop.set()
            with _GIVEN_UP_LOCK:
                _GIVEN_UP.add(thread)
            if watchdog:
                raise ItemTimeout(f"{name}: the item was given up (runtime.item_timeout_s) while it decoded")
            raise DecodeTimeout(f"{name}: decode took over {timeout_s:g}s (given up; it stops at its next frame)")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["video"]  # type: ignore[return-value]


GIVEN_UP_POLL_S = 0.25
"""How often a waiting decode looks whether its item was given up."""


def _passes(requests: list[FrameRequest], meta: VideoMeta, offset: float, max_side: int | None,
            reduced_pass_bytes: int | None,
            pixel_aspect: float = 1.0) -> list[tuple[list[FrameRequest], FramePlan, tuple[int, int]]]:
    """How the requests are decoded: ``(requests, plan, size)`` per pass. One pass at the decode size, unless it
    would decode more than ``reduced_pass_bytes`` and some requests need fewer pixels (``size_needed``: the
    frame-difference and histogram filters sample 4 frames a second at a long side of 256 or less, a classifier
    resizes to its model's short side). Those then get a pass of their own at the largest size one of them needs,
    and the others one at the decode size (``VideoConfig.reduced_pass_bytes`` has the figures). The second pass
    decodes again the frames near those of the first (a seek lands on a keyframe), which is why short clips keep
    one pass."""
    size = _decode_size(meta.width, meta.height, max_side, pixel_aspect)
    plan = make_plan(requests, meta.num_frames, meta.fps, meta.timestamps, offset)
    need = {r: size_needed(r, size) for r in requests}
    small = [r for r in requests if need[r] is not None and max(need[r]) < max(size)]
    full = [r for r in requests if r not in small]
    if (reduced_pass_bytes is None or not small
            or len(plan.indices) * size[0] * size[1] * 3 <= reduced_pass_bytes):
        return [(list(requests), plan, size)]
    side = max((need[r] for r in small), key=max)
    passes = [(full, make_plan(full, meta.num_frames, meta.fps, meta.timestamps, offset), size)] if full else []
    return passes + [(small, make_plan(small, meta.num_frames, meta.fps, meta.timestamps, offset), side)]


def size_needed(request: FrameRequest, size: tuple[int, int]) -> tuple[int, int] | None:
    """The ``(w, h)`` a request's frames need, from frames of ``size``; None: that size. For a ``short_side``, what a
    model's resize of the short side makes of ``size`` (``clips_to_input``: the same geometry, so its centre crop is
    the same pixels)."""
    if request.max_side is not None:
        return _decode_size(*size, request.max_side)
    if request.short_side is not None:
        w, h = size
        scale = request.short_side / min(w, h)
        return max(request.short_side, round(w * scale)), max(request.short_side, round(h * scale))
    return None


def _decode_pass(backend, path: str, requests: list[FrameRequest], plan: FramePlan, meta: VideoMeta,
                 size: tuple[int, int], device: str, offset: float, stop: threading.Event,
                 first_field: int | None = None) -> DecodedVideo:
    if not plan.indices:  # every request streams itself (``AtFps.spread``) or asks for none: nothing to decode
        frames = torch.empty((0, size[1], size[0], 3), dtype=torch.uint8)
        return DecodedVideo(frames, plan, meta, backend.name, (meta.width / size[0], meta.height / size[1]),
                            start_s=offset)
    extra = {}
    if first_field is not None:  # scaled along the lines only, deinterlaced, then scaled to the size
        from pipeline.video.deinterlace import deinterlace

        extra["prepare"] = functools.partial(deinterlace, first=first_field, size=size)
        size = (size[0], meta.height)
    resize = size != (meta.width, meta.height)
    if plan.indices and plan.indices[-1] >= meta.num_frames:  # the first pass found the tail broken
        plan = make_plan(requests, meta.num_frames, meta.fps, meta.timestamps, offset)
    try:
        frames = backend.decode(path, plan.indices, size, device, resize, stop=stop, **extra)
    except TruncatedVideo as t:  # a broken tail: the clip is its decodable prefix
        whole, meta = meta, meta.truncated(t.decodable)
        if t.decodable < whole.num_frames:
            _tail_lost(meta, whole.num_frames, clip_duration(whole.num_frames, whole.fps, whole.timestamps), offset)
        plan = make_plan(requests, meta.num_frames, meta.fps, meta.timestamps, offset)
        frames = backend.decode(path, plan.indices, size, device, resize, stop=stop, **extra)
    if frames.shape[0] != len(plan.indices):
        raise DecodeError(f"{backend.name} returned {frames.shape[0]} of {len(plan.indices)} frames")
    label = f"{backend.name}-nvdec" if frames.is_cuda else backend.name  # on the GPU only from NVDEC
    return DecodedVideo(frames, plan, meta, label, (meta.width / frames.shape[2], meta.height / frames.shape[1]),
                        start_s=offset)


def _tail_lost(prefix: VideoMeta, listed: int, claimed_s: float, offset: float) -> None:
    """A broken tail, for the item's row: the frames from the end of the decodable ``prefix`` to the ``listed``
    count are lost, their span from the prefix's end to ``claimed_s`` (seconds from the first frame) on the file's
    timeline (``offset``: where the first frame sits). Not a stretch decoded past: not in ``corrupt_media``."""
    end = clip_duration(prefix.num_frames, prefix.fps, prefix.timestamps)
    damage.video_lost([(prefix.num_frames, listed)], [(offset + end, offset + max(end, claimed_s))], held=False)


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    """``DecodeError`` where a ``width`` x ``height`` picture is over ``video.max_pixels``."""
    if width * height > max_pixels:
        raise DecodeError(f"{width}x{height} is over video.max_pixels={max_pixels}")


def _size(path: str) -> int | None:
    """The file's size; None where it is gone (a node cache evicted it: the backends then say so, as DecodeErrors)."""
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def _only(backends: list[object], fit, refusal: str) -> list[object]:
    """The backends that ``fit`` this file; DecodeError(``refusal``) where none does."""
    kept = [b for b in backends if fit(b)]
    if not kept:
        raise DecodeError(refusal)
    return kept


def decode_video(path: str, requests: list[FrameRequest], backends: list[object], *, device: str = "cpu",
                 max_frames: int = 8192, max_pixels: int = 8192 * 4320, max_side: int | None = None,
                 timeout_s: float = 120.0, max_bytes: int = 8 << 30, random_access: bool = True,
                 several_streams: bool = False, reduced_pass_bytes: int | None = None,
                 given_up: threading.Event | None = None, pixel_aspect: float = 1.0,
                 first_field: int | None = None, stated_frames: float | None = None) -> DecodedVideo:
    """Decode the union of ``requests`` once, trying each backend until one succeeds.

    Args:
        path: local media file.
        requests: the frame requests of every filter that runs on this item.
        backends: instances from ``available_backends``, in order of preference.
        device: ``cpu``, or ``cuda:N`` for NVDEC decode where the backend supports it (``nvdec``: torchcodec,
            PyAV); the result's ``backend`` is then ``torchcodec-nvdec`` or ``pyav-nvdec``, and the plain name where
            the backend had to decode on the CPU.
        max_frames: refuse a plan needing more frames (a hostile file cannot exhaust a worker).
        max_pixels: refuse larger frames.
        max_side: decode downscaled so that the long side is at most this (None: source size).
        max_bytes: refuse a plan whose decoded frames would take more memory than this.
        timeout_s: per-backend limit on reading the file's frame index and decoding; past it the item fails with
            DecodeTimeout and the decode stops at its next frame or slice (``_with_deadline``).
        random_access: False where the seeking backends were measured to return wrong frames for this container or
            codec (``seeks_frame_exactly``): only the backends that decode in order (PyAV) are tried.
        several_streams: the file holds more than one video stream: only the backends that decode the main one
            (``main_video_stream``: torchcodec, told its index, and PyAV) are tried; decord decodes the stream its
            own FFmpeg ranks best, which was another one in a file whose second stream is the default.
        reduced_pass_bytes: where one pass over every request would decode more than this, the requests with a
            ``max_side`` smaller than the decode size are decoded in a second pass at that size (``_passes``).
        given_up: set by the rank's watchdog when it lets the item go (``MediaItem.given_up``): the decode stops
            and ``ItemTimeout`` is raised.
        pixel_aspect: the stream's sample aspect ratio (``probe``'s ``sample_aspect_ratio``): anamorphic frames are
            decoded with square pixels (``square_pixels``); ``scale`` maps results back to stored pixels.
        first_field: interlaced video: the row parity of the field shown first (``deinterlace.first_field``). Each
            frame is decoded at the stored height (scaled along its lines only, which keeps the fields apart),
            deinterlaced (``deinterlace.deinterlace``) and then scaled to the decode size, a slice at a time.
            None: progressive.
        stated_frames: the frames the file's header states (the probe's count, or its duration times its rate):
            where the file is too small to hold them (``probe.holds_frames``), the backends that reserve memory
            for each (decord) are not tried; the others count the frames the file holds.

    Returns:
        The decoded frames and their plan.

    Raises:
        DecodeError: every backend failed (the message lists each backend's error).
    """
    if not random_access:
        backends = _only(backends, lambda b: not getattr(b, "random_access", True),
                         f"the backends {[b.name for b in backends]} seek to wrong frames in this container or codec; "
                         "add pyav to video.backends (it decodes in order), or list the container and codec in "
                         "video.random_access_containers / video.random_access_codecs")
    if several_streams:
        backends = _only(backends, lambda b: getattr(b, "chooses_stream", True),
                         "this file holds several video streams and no configured backend can be told which one to "
                         "decode; add torchcodec or pyav to video.backends")
    size = _size(path) if stated_frames is not None else None
    if size is not None and not holds_frames(stated_frames, size):  # NaN too
        backends = _only(backends, lambda b: not getattr(b, "trusts_stated_count", False),
                         f"this file's header states {stated_frames:.3g} frames, more than its {size} bytes can hold, "
                         f"and the backends {[b.name for b in backends]} reserve memory for each; add torchcodec or "
                         "pyav to video.backends (they count the frames the file holds)")
    errors = []
    offset = timeline_offset(path)  # where the first frame sits on the file's timeline, which windows are given on

    def attempt(backend, stop: threading.Event) -> DecodedVideo:
        meta = backend.meta(path, stop=stop)
        if meta.num_frames <= 0 or meta.width <= 0 or meta.height <= 0:
            raise DecodeError(f"no frames ({meta})")
        if meta.lost_tail:  # a file cut short: the frames its header lists past the end are lost
            _tail_lost(meta, meta.num_frames + meta.lost_tail, meta.claimed_s or 0.0, offset)
        if meta.lost_chunks:  # an AVI's chunks the demuxer passed over: the frames after them keep their times
            damage.video_lost(meta.lost_chunks, [(offset + a, offset + b) for a, b in meta.chunk_spans],
                              numbering="chunks")
            log.warning("%s: %d frames of %s were lost in the middle of the clip (chunks the demuxer passed over in "
                        "a corrupt stretch); the frames after them keep their times by the file's index", backend.name,
                        sum(b - a for a, b in meta.lost_chunks), damage.where(path))
        check_pixels(meta.width, meta.height, max_pixels)
        passes = _passes(requests, meta, offset, max_side, reduced_pass_bytes, pixel_aspect)
        frames_needed = sum(len(plan.indices) for _, plan, _ in passes)
        if frames_needed > max_frames:
            raise DecodeError(f"frame plan needs {frames_needed} frames, over video.max_frames={max_frames}")
        need = sum(len(plan.indices) * size[0] * size[1] * 3 for _, plan, size in passes)
        if need > max_bytes:
            sizes = " and ".join(f"{len(plan.indices)} frames of {size[0]}x{size[1]}" for _, plan, size in passes)
            raise DecodeError(f"{sizes} would take {need / 2**30:.1f} GiB, over video.max_decoded_bytes="
                              f"{max_bytes / 2**30:.1f} GiB (set video.decode_max_side to decode smaller)")
        dev = device if getattr(backend, "nvdec", False) else "cpu"
        videos = []
        for reqs, plan, size in passes:  # the reduced pass second: it takes a broken tail the first one found
            video = _decode_pass(backend, path, reqs, plan, meta, size, dev, offset, stop, first_field)
            meta = video.meta
            videos.append(video)
        if len(videos) == 2:
            videos[0].reduced = videos[1]
        return videos[0]

    for backend in backends:
        try:
            return _with_deadline(lambda stop, b=backend: attempt(b, stop), backend.name, timeout_s, given_up)
        except (DecodeTimeout, ItemTimeout):
            raise
        except Exception as e:  # noqa: BLE001 - any backend failure means: try the next backend
            errors.append(f"{backend.name}: {type(e).__name__}: {str(e)[:300]}")
    raise DecodeError("every video backend failed: " + " | ".join(errors))
