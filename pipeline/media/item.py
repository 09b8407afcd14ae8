"""One fetched item as the filters see it: its local file and what has been decoded from it so far."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from pipeline.media.damage import ItemDamage
from pipeline.media.probe import MediaInfo, probe_media, stated_frames

if TYPE_CHECKING:
    from pipeline.config import VideoConfig
    from pipeline.video.decoders import DecodedVideo
    from pipeline.video.sampling import FrameRequest
    from pipeline.video.stream import Stream, WindowStream


log = logging.getLogger(__name__)


class MediaItem:
    """A fetched item, decoded lazily and once: every filter that asks for the same data gets the same object.

    Args:
        item_id: the manifest id.
        local_path: the file in the node cache (or in place on a local tier).
        size_bytes: file size.
        frame_requests: the union of the frame requests of every filter that runs on this item (its ``Stream``
            and ``WindowStream`` requests are read by ``streamed``, not decoded with the others).
        video_config: decoding settings.
        backends: decoder backend instances, in order.
        device: the rank's device (for NVDEC decode).
    """

    def __init__(self, item_id: str, local_path: str, size_bytes: int, frame_requests: list[FrameRequest] = (),
                 video_config: VideoConfig | None = None, backends: list[object] = (), device: str = "cpu"):
        self.item_id = item_id
        self.local_path = local_path
        self.size_bytes = size_bytes
        self.frame_requests = list(frame_requests)
        self.video_config = video_config
        self.backends = list(backends)
        self.device = device
        self._lock = threading.Lock()
        self._info: MediaInfo | None = None
        self._video: DecodedVideo | None = None
        self._video_done = False
        self._video_error: Exception | None = None
        self._stream_lock = threading.Lock()
        self._streamed: dict[object, tuple] = {}  # (stream, device): (the crop it was read under, its result)
        self._served: set = set()
        self._stream_s: dict[object, float] = {}  # each stream's seconds in its reader, till its filter claims them
        self.decode_backend: str | None = None
        self.frames_decoded: int | None = None
        self.damage = ItemDamage()
        """What its decodes lost in corrupt stretches (the rank's consumer makes it ``damage.current_damage``)."""
        self.given_up = threading.Event()
        """Set when the rank's watchdog gives the item up (``runtime.item_timeout_s``): its decodes stop at their
        next frame, and no further filter runs on it."""

    @property
    def info(self) -> MediaInfo:
        """Container and stream metadata (probed once)."""
        with self._lock:
            if self._info is None:
                self._info = probe_media(self.local_path)
                self.decode_backend = self.decode_backend or "pyav"
            return self._info

    @property
    def duration_s(self) -> float | None:
        """The media's probed duration, None until a filter has probed it (read without the lock, never probing:
        the watchdog reads it while a filter may hold the lock)."""
        info = self._info
        return info.duration_s if info is not None else None

    def video(self) -> DecodedVideo | None:
        """Every declared frame request, decoded once (None when the item has no video stream).

        Raises:
            DecodeError: every backend failed, or the item is over a cap.
        """
        if self.info.video is None:
            return None
        with self._lock:
            if self._video_error is not None:
                raise self._video_error
            if not self._video_done:
                from pipeline.video.stream import Stream, WindowStream

                try:
                    self._video = self._decode([r for r in self.frame_requests
                                                if not isinstance(r, (Stream, WindowStream))],
                                               self.backends)
                except Exception as e:  # every filter of this item sees the same decode failure
                    self._video_error = e
                    raise
                self._video_done = True
                self.decode_backend = self._video.backend
                self.frames_decoded = self._video.frames_decoded
            return self._video

    def more_frames(self, request: FrameRequest) -> DecodedVideo:
        """A second, targeted decode of the item (``Frames``: the frames a filter's first look singled out), by the
        backend that decoded ``video()``, with the same settings (deinterlacing, tone mapping, square pixels, the
        deadline and caps) and the same crop; decoded at the request's ``max_side``. Where that backend fails on
        these frames (a corrupt stretch in a film that decord and torchcodec stop at, and PyAV decodes past), the
        others are tried in order, as in a first decode; where ``video()`` decoded no frame (every request is read
        all through, ``Stream``), no backend has vouched for the pictures yet, and each is tried in order. Counted in
        ``frames_decoded``.

        Raises:
            DecodeError: every backend failed on these frames (the file changed or went away).
            DecodeTimeout: past ``video.decode_timeout_s``.
            ItemTimeout: the rank's watchdog gave the item up.
        """
        first = self.video()
        if first is None:
            raise ValueError(f"{self.item_id} has no video stream")
        name = first.backend.removesuffix("-nvdec")
        backends = sorted(self.backends, key=lambda b: b.name != name) if first.plan.indices else self.backends
        more = self._decode([request], backends, at_request_size=True)
        if first.crop_source is not None:
            more.set_crop_source(first.crop_source)
        with self._lock:
            self.frames_decoded = (self.frames_decoded or 0) + more.frames_decoded
        return more

    def streamed(self, request: Stream | WindowStream, device: str) -> Any:
        """What ``request``'s reader keeps of the clip read all through (a ``Stream``: the samples at its rate; a
        ``WindowStream``: its windows), read in one pass with the item's other streams that ``passes`` puts with it
        (the signal filters' samples and the classifiers' windows: a film decoded once for them), on ``device``,
        cropped as the item's frames are when the pass runs. The pass runs once (per device); a crop set after it
        (``yolo_regions``' ``crop_output``) has a later reader read again, cropped, with the readers of its pass
        not yet served. A failure of the pass is every one of its readers' failure. Each reader's seconds in the
        pass are kept for its filter (``claim_seconds``).

        Raises:
            DecodeError: a group of the frames failed to decode (see ``read_pass``).
        """
        from pipeline.video.stream import Stream, WindowStream, passes, read_pass

        video = self.video()
        crop = video.crop_source

        def stale(r) -> bool:  # no result of ``r`` yet, or one read under another crop
            kept = self._streamed.get((r, device))
            return kept is None or kept[0] != crop

        with self._stream_lock:
            if stale(request):
                size = (int(video.frames.shape[2]), int(video.frames.shape[1]))
                streams = [r for r in dict.fromkeys([*self.frame_requests, request])
                           if isinstance(r, (Stream, WindowStream))]
                same = [r for r in next(p for p in passes(streams, size) if request in p)
                        if r == request or ((r, device) not in self._served and stale(r))]
                if any((r, device) in self._streamed for r in same):  # read again (cropped): say so, it costs a pass
                    log.info("item %s: a crop set after its pass was read (the clip read all through for %s); read "
                             "again, cropped", self.item_id, ", ".join(dict.fromkeys(r.reader.what for r in same)))
                try:
                    read, seconds = read_pass(self, same, device)
                except Exception as e:
                    read, seconds = dict.fromkeys(same, e), {}
                self._streamed.update(((r, device), (crop, out)) for r, out in read.items())
                for r, t in seconds.items():
                    self._stream_s[r] = self._stream_s.get(r, 0.0) + t
            out = self._streamed[request, device][1]
            self._served.add((request, device))
        if isinstance(out, Exception):
            raise out
        return out

    def claim_seconds(self, mine: list, before: set) -> float:
        """Seconds to add to a filter's own (``Filter.run``) for the passes read in its run or before it: its
        streams' (``mine``) seconds in passes that other filters' runs read (``before``: the streams read before
        its run), less the other filters' streams' seconds in a pass its run read (they claim them). A pass's
        decoding stays with the filter whose run read it."""
        with self._stream_lock:
            add = 0.0
            for r in list(self._stream_s):
                if r in mine:
                    t = self._stream_s.pop(r)
                    add += t if r in before else 0.0
                elif r not in before:
                    add -= self._stream_s[r]
            return add

    def streams_read(self) -> set:
        """The streams whose passes have been read (for ``claim_seconds``)."""
        with self._stream_lock:
            return set(self._stream_s)

    def _decode(self, requests: list[FrameRequest], backends: list[object],
                at_request_size: bool = False) -> DecodedVideo:
        """``requests`` decoded by the first of ``backends`` that can (``decode_video``) with the item's settings,
        and tone mapped where the item is HDR. ``at_request_size``: a request with a ``max_side`` is decoded at that
        size however few its frames (``video.reduced_pass_bytes`` 0)."""
        from pipeline.config import VideoConfig
        from pipeline.video.decoders import check_pixels, decode_video, seeks_frame_exactly
        from pipeline.video.deinterlace import interlaced_decode, is_interlaced

        cfg = self.video_config or VideoConfig()
        v = self._info.video
        device = self.device if cfg.decode_device == "cuda" else "cpu"
        first_field = None
        if cfg.deinterlace and is_interlaced(v):
            first_field, backends = interlaced_decode(v, backends, device)
        random_access = seeks_frame_exactly(self._info.container, v.codec, cfg.random_access_containers,
                                            cfg.random_access_codecs)
        check_pixels(v.width, v.height, cfg.max_pixels)  # before a backend opens it: decord decodes one
        video = decode_video(self.local_path, requests, backends, device=device, max_frames=cfg.max_frames,
                             max_pixels=cfg.max_pixels, max_bytes=cfg.max_decoded_bytes, max_side=cfg.decode_max_side,
                             timeout_s=cfg.decode_timeout_s, random_access=random_access,
                             reduced_pass_bytes=0 if at_request_size else cfg.reduced_pass_bytes,
                             several_streams=self._info.video_streams > 1, given_up=self.given_up,
                             pixel_aspect=v.sample_aspect_ratio if cfg.square_pixels else 1.0, first_field=first_field,
                             stated_frames=stated_frames(self._info))
        if cfg.tone_map and v.hdr:  # PQ or HLG pixels as coded are flat and grey: the filters see SDR
            from pipeline.video.tonemap import tone_map_

            for decoded in (video, video.reduced):
                if decoded is not None:
                    tone_map_(decoded.frames, v.color_transfer)
        return video
