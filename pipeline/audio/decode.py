"""Decode the audio stream of an audio file or a video container to mono float32 at one rate (PyAV)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipeline.errors import DecodeError, ItemTimeout
from pipeline.media import damage
from pipeline.media.chunks import ChunkClock
from pipeline.media.packets import demux, open_container
from pipeline.media.probe import (
    DISCONTINUITY_S,
    cut_short_by_duration,
    decoder_context,
    holds_stated_size,
    main_audio_stream,
    mp3_header,
    stated_duration,
    timestamps_may_jump,
)


log = logging.getLogger(__name__)

GAP_S = 0.05
"""A jump in the audio timestamps longer than this (after the first frame) is a gap to fill with silence;
shorter ones are rounding in the container's time base."""


def _flat(frames, channels: int, average_pair: bool = False) -> list[np.ndarray]:
    """Frames as ``[channels, n]`` arrays; ``average_pair``: stereo frames become their mean, ``[1, n]``."""
    if average_pair:
        return [f.to_ndarray().reshape(2, -1).mean(axis=0, keepdims=True) for f in frames]
    return [f.to_ndarray().reshape(channels, -1) for f in frames]


def decode_audio(path: str, sample_rate: int = 16000, max_seconds: float | None = None,
                 channels: int = 1, given_up: threading.Event | None = None) -> np.ndarray:
    """The main audio stream of ``path`` (``main_audio_stream``: the default track) as float32 at ``sample_rate``:
    ``[N]`` mono, or ``[2, N]`` with ``channels=2`` (a mono source is duplicated).

    Mono from stereo is the mean of the two channels, as silero-vad's ``read_audio``, librosa and ``ffmpeg -ac 1``
    to 16-bit give (FFmpeg's float downmix adds them at 0.707 each, so a dual-mono recording came out 1.41x loud
    and past 1.0). Surround is downmixed with FFmpeg's standard matrix, unnormalised: a film's dialogue in the
    centre channel keeps its level (averaging all six channels would make it 1/6; normalising the matrix, 0.29),
    and loud sound in every channel can pass 1.0 (the VAD's segments did not move at 4.4x gain on real speech).

    Sample 0 is the start of the file's timeline (the container's start, what ``ffmpeg -ss`` counts from), so
    speech times line up with the video: audio that starts after the video (a delayed track, common in MPEG-TS and
    edited MP4) is preceded by silence, and a gap in its timestamps (dropped packets) is filled with silence.

    Args:
        path: local file (any container PyAV opens: WAV, FLAC, MP3, MP4, MKV, ...), any rate and channel count.
        sample_rate: output rate (16000; 8000 where the VAD supports it).
        max_seconds: refuse longer audio (a cap a hostile file cannot exceed).
        given_up: set by the rank's watchdog when it lets the item go (``MediaItem.given_up``): the decode stops at
            its next frame.

    Raises:
        DecodeError: no audio stream, undecodable, or over the cap.
        ItemTimeout: ``given_up`` was set.
    """
    import av

    try:
        container = open_container(path)
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise DecodeError(f"cannot open media: {type(e).__name__}: {e}") from e
    with container:
        stream = main_audio_stream(container)  # the default track of a film with commentary or dubs
        decoder_context(container, stream, "audio")  # one FFmpeg knows a decoder for (else a clear DecodeError)
        layout = "mono" if channels == 1 else "stereo"
        resampler, source, pair = None, None, False
        parts: list[np.ndarray] = []
        total = 0
        cap = None if max_seconds is None else int(max_seconds * sample_rate)
        stated = stated_duration(container)  # where the header states the end (FFmpeg gives a WAV what it holds)
        # a raw FLAC whose header counts its samples starts at its first: FFmpeg takes the first packet's time, a
        # later one where the first frames are damaged (the audio after them then came early by the frames lost).
        # One written to a pipe counts none, and may be a capture whose frames number on from a stream's
        numbered_from_zero = container.format.name == "flac" and stated is not None
        start = container.start_time if container.start_time is not None and not numbered_from_zero else 0
        expected = float(start) / av.time_base
        jump_s = DISCONTINUITY_S if timestamps_may_jump(container) else None  # a splice, not missing audio
        first = True
        bad, failed = 0, None  # packets that did not decode (a corrupt stretch), and the last one's error
        placed, spans = 0, []  # the bad packets whose silence is placed; the seconds that silence spans
        claimed = container.duration / av.time_base if container.duration else None  # where the file says it ends
        origin = start / av.time_base
        clock = ChunkClock.of(container, stream)  # an AVI's index: each packet's time, and every chunk
        # the packets the header lists (MP4; an AVI's index: its header counts PCM's samples), and those that demux
        header, seen = (clock.with_data() if clock is not None else int(stream.frames or 0)), Demuxed()
        claimed = max(claimed or 0.0, stated) if stated is not None else claimed

        def told() -> int | None:  # asked at a variable bit rate's first stretch only: it reads the file's header
            """The frames a variable bit rate MP3's Xing or VBRI header counts, where the file states its end and
            holds every byte its header states: the time one stretch held is the stated duration less what decoded
            (``UnplacedStretch``). None else."""
            mp3 = mp3_header(path) if stated is not None and "mp3" in container.format.name.split(",") else None
            return mp3.frames if mp3 is not None and mp3.frames and holds_stated_size(path) else None

        mark, marked_spans, after_mark = None, 0, False  # where such a stretch began: (parts, samples), spans before
        counted = 0  # the frames its header counts
        broke = False
        try:
            for frame in _frames(container, stream, seen, clock, told):
                if isinstance(frame, UnplacedStretch):
                    mark, marked_spans, counted = (len(parts), total), len(spans), frame.frames
                    continue
                if isinstance(frame, av.error.FFmpegError):
                    bad, failed = bad + 1, frame
                    continue
                if isinstance(frame, ChunksLost):  # an AVI's chunks passed over: the next frame's time says where
                    bad += frame.count
                    continue
                if given_up is not None and given_up.is_set():
                    raise ItemTimeout("the item was given up (runtime.item_timeout_s) while its audio decoded")
                t = frame.time  # seconds on the file's timeline; None where the stream has no timestamps
                if t is not None and jump_s is None and claimed is not None and t - origin > claimed + GAP_S:
                    # past the file's end: a flipped bit in a packet's time (an FLV tag's, an ASF payload's) made a
                    # jump of days, which failed the item at the cap; the frame plays after the one before
                    t = None
                before = total
                if t is not None:
                    gap = t - expected
                    if gap * sample_rate >= 0.5 and (first or GAP_S < gap and (jump_s is None or gap < jump_s)):
                        silence = int(round(gap * sample_rate))
                        if cap is not None and total + silence > cap:
                            raise DecodeError(f"audio starts or jumps {gap:.1f}s into the file, past the "
                                              f"{max_seconds:.0f}s cap")
                        parts.append(np.zeros((channels, silence), np.float32))
                        total += silence
                    step = frame.samples / float(frame.sample_rate or sample_rate)
                    expected = t + step if jump_s is not None and abs(gap) >= jump_s else max(expected, t + step)
                else:  # untimed (FLAC frames decoded out of a corrupt stretch): it plays after the one before
                    expected += frame.samples / float(frame.sample_rate or sample_rate)
                if bad > placed:  # the first frame after a corrupt stretch: the silence before it is the stretch's
                    if total > before:
                        spans.append((before / sample_rate, total / sample_rate))
                    placed = bad
                first = False
                after_mark = mark is not None
                # a broadcast recording switches between stereo and 5.1, or 48 and 44.1 kHz, at an ad break
                fmt = (frame.format.name, frame.layout.name, frame.sample_rate)
                if fmt != source:
                    if resampler is not None:
                        parts.extend(_flat(resampler.resample(None), channels, pair))
                    pair = channels == 1 and frame.layout.nb_channels == 2
                    resampler = av.AudioResampler(format="fltp", layout="stereo" if pair else layout, rate=sample_rate)
                    source = fmt
                for arr in _flat(resampler.resample(frame), channels, pair):
                    parts.append(arr)
                    total += arr.shape[1]
                if cap is not None and total > cap:
                    raise DecodeError(f"audio longer than the {max_seconds:.0f}s cap")
            if resampler is not None:
                parts.extend(_flat(resampler.resample(None), channels, pair))
        except av.error.FFmpegError as e:
            if not parts:
                raise DecodeError(f"audio does not decode: {type(e).__name__}: {e}") from e
            broke = True  # a broken tail: keep what decoded
        if mark is not None and (broke or not after_mark):  # a second stretch, or none decoded after: it ends there
            del parts[mark[0]:], spans[marked_spans:]
        elif mark is not None:  # the one stretch held the frames the header counts and nothing decoded: silence
            missing = round((counted - seen.decoded) * stream.codec_context.frame_size * sample_rate
                            / stream.sample_rate)
            if missing > 0:
                parts.insert(mark[0], np.zeros((channels, missing), np.float32))
                at, shift = mark[1] / sample_rate, missing / sample_rate
                spans[marked_spans:] = [(a + shift, b + shift) for a, b in spans[marked_spans:]]
                spans.append((at, at + shift))
            # the encoder's padding that the decoder trims from the last frame where the frames' count reaches the
            # stated end, which it no longer did: trimmed here
            end = int(round(claimed * sample_rate))
            if sum(p.shape[1] for p in parts) > end:  # rare (a damaged file): joined here rather than below
                parts = [np.concatenate(parts, axis=1)[:, :end]]
    if not parts and failed is not None:
        raise DecodeError(f"audio does not decode: {type(failed).__name__}: {failed}") from failed
    if not parts:
        raise DecodeError("audio stream holds no samples")
    length = sum(p.shape[1] for p in parts) / sample_rate
    if claimed is not None and claimed - length > TAIL_S and (
            broke or bad > placed or _cut_short(path, header, seen.packets, claimed, length, origin, stated)):
        spans.append((length, claimed))  # the audio ends early: from there to where the file says it ends is lost
    damage.audio_decoded(bad, spans)
    if bad:
        log.warning("%d audio packets of %s did not decode; the time they held is silence where the frames after "
                    "them say where they belong (a corrupt stretch), else the audio ends there", bad, damage.where(path))
    audio = np.concatenate(parts, axis=1).astype(np.float32, copy=False)
    return audio[0] if channels == 1 else audio


def _cut_short(path: str, header: int, packets: int, claimed: float, length: float, origin: float,
               stated: float | None) -> bool:
    """Whether a file whose audio decoded without an error was cut short (a download that stopped): its header lists
    more packets than demuxed (MP4, M4A; AIFF lists samples, more than its packets, and its stated duration is past
    the audio's end), or, where it lists none but ``stated`` where it ends (Matroska, WebM, FLAC, WAV, FLV, WMA, an
    MP3 with a Xing header: ``stated_duration``), every stream ends well before that (``cut_short_by_duration``).
    Ogg, MPEG-TS, raw AAC or AC-3 and an MP3 without a Xing header cut short are not told (their duration is read
    from what the file holds, or estimated)."""
    if header:
        return packets < header
    return cut_short_by_duration(path, claimed if stated is not None else None, origin, length)


TAIL_S = 0.05
"""Audio that a broken tail (or a corrupt stretch nothing decodes after) ends more than this before the container's
duration has the rest as a span of ``result_info.corrupt_spans``."""

TIMED_CONTAINERS = ("mov", "mp4", "matroska", "webm", "mpegts", "ogg", "flac", "flv", "asf", "mpeg")
"""Container formats whose packets carry timestamps of their own (``container.format.name`` holds one of these):
after a corrupt stretch the next frame's time says where it belongs. A raw FLAC's frames number themselves in their
headers, which FFmpeg's parser reads (a stretch over its first frames is placed too); FLV's tags, ASF's payloads and
MPEG-PS's PES packets carry their times (before, an MPEG-PS's MP2 after a stretch was also moved by the failed
packet's bytes, 2.1 s early in the test's film, and an FLV whose first AAC packets did not decode lost all its
sound). A raw stream's demuxer counts the frames instead (MP3: the audio after 6 s lost in a 5-minute file came 6 s
early), so there the time lost is measured in bytes, where the stream has a constant bit rate (``_frames``)."""


@dataclass(frozen=True)
class UnplacedStretch:
    """A corrupt stretch in a variable bit rate MP3 begins here: the frames after it come early by the time it held,
    which only the end of the decode tells (the ``frames`` its header counts less those that decoded:
    ``decode_audio``)."""

    frames: int


@dataclass(frozen=True)
class ChunksLost:
    """``count`` chunks of an AVI's audio that the demuxer passed over in a corrupt stretch (``chunks.ChunkClock``):
    lost packets, whose time the next frame's timestamp (the file's index's) leaves as a gap to fill with silence."""

    count: int


@dataclass
class Demuxed:
    """What ``_frames`` demuxed: the packets with data (decodable or not, and an AVI's chunks passed over), and
    those that decoded."""

    packets: int = 0
    decoded: int = 0


def _frames(container, stream, seen: Demuxed | None = None, clock: ChunkClock | None = None,
            told: Callable[[], int | None] | None = None):
    """The stream's frames, a packet at a time; a packet that does not decode (a corrupt stretch: a bad sector, a
    damaged download) yields its error and the decode goes on, where ``container.decode`` would end at it, and
    ``decode_audio`` fills the time it held with silence (as it fills a gap in the timestamps), so that speech after
    it keeps its place. Before, a corrupt second in the middle of a recording ended it there.

    In ``TIMED_CONTAINERS`` the frames after the stretch carry their own times. In a raw stream (MP3) the demuxer
    times a packet by counting the ones before it, so the frames after would come early by the time lost: there the
    stretch is passed over only at a constant bit rate (every packet decoded so far of one size, give or take a
    padding byte), where its bytes say how long it was (an MP3's zeroed stretch arrives as one packet of all its
    bytes), and the frames after it are moved by that; at a variable rate the audio still ends at the stretch.

    An AVI's packets are timed by the file's index (``chunks.ChunkClock``), which also says how many chunks the
    demuxer passed over in a stretch without an error (``ChunksLost``): there the frames after a stretch carry their
    own times, as in a timed container. Before, the audio after a zeroed stretch came early by the time it held.
    ``clock``: the stream's (``ChunkClock.of``), for a pass of its own.

    ``told``: asked at the first stretch of a variable bit rate, the frames the file's header counts where they tell
    the time it held (``decode_audio``): the stretch is then passed over too (``UnplacedStretch`` where it begins,
    the frames after it uncorrected), the time it held told by the end of the decode; a second one ends the audio,
    as at a variable rate where they do not (two stretches' shares of the time lost are unknown)."""
    import av

    clock = clock.fresh() if clock is not None else None
    named = any(name in container.format.name.split(",") for name in TIMED_CONTAINERS)
    good_bytes = good_ticks = failed_bytes = offset = 0  # raw streams: what decoded so far, in bytes and ticks
    smallest, largest, end = None, None, None
    stretch = None  # a variable rate's stretch passed over (``told``): None, "in" it, or "past" it
    for packet in demux(container, stream):
        passed = clock.place(packet) if clock is not None else 0
        if passed:
            if seen is not None:
                seen.packets += passed  # lost in the middle, not a tail cut short: the header lists them
            yield ChunksLost(passed)
        timed = named or (clock is not None and not clock.stopped)
        if seen is not None and packet.size:
            seen.packets += 1  # every packet with data, decodable or not
        try:
            frames = packet.decode()
        except av.error.FFmpegError as e:
            if not timed and (not good_ticks or largest - smallest > 1 or packet.pts is None):
                if told is None or stretch == "past":
                    raise  # a variable bit rate: how long the stretch was is unknown
                if stretch is None:
                    counted = told()
                    if counted is None:
                        raise
                    stretch = "in"
                    yield UnplacedStretch(counted)
            elif not timed:
                failed_bytes += packet.size
            yield e
            continue
        stretch = "past" if stretch == "in" and frames else stretch
        if seen is not None and packet.size:
            seen.decoded += 1
        if not timed and packet.size and packet.pts is not None and packet.duration:
            if failed_bytes:  # the first packet after a stretch: where the bytes lost say it belongs
                offset = end + round(failed_bytes * good_ticks / good_bytes) - packet.pts
                failed_bytes = 0
            good_bytes += packet.size
            good_ticks += packet.duration
            smallest = packet.size if smallest is None else min(smallest, packet.size)
            largest = packet.size if largest is None else max(largest, packet.size)
            end = packet.pts + offset + packet.duration
        for frame in frames:
            if offset and frame.pts is not None:
                frame.pts += offset
            yield frame


def resample(audio: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Mono float32 from one rate to another with FFmpeg's resampler (through PyAV)."""
    import av

    if from_rate == to_rate:
        return audio
    resampler = av.AudioResampler(format="fltp", layout="mono", rate=to_rate)
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio[None], dtype=np.float32), format="fltp",
                                       layout="mono")
    frame.sample_rate = from_rate
    out = [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    out += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(out).astype(np.float32, copy=False)
