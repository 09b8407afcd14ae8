"""Frames read all through a long clip in one decode pass that every filter reading them shares.

A clip over a rate request's cap (``AtFps.spread`` false) gets none of those frames from the item's decode: held
at once, an hour at 4 a second would take 14,400 frames. Its filters declare a ``Stream`` instead; the item
(``MediaItem.streamed``) decodes the rate a group at a time and hands each group to every ``Stream`` before letting
its frames go, so that the scene cuts and the static filter decode a film once, not once each. Sliding windows past
their request's cap (``Windows.spread`` false) are read the same way (``WindowStream``): groups of consecutive
windows, given to every classifier whose input is of the same size. The samples and the windows are read in the
same pass (``passes``), so that a film the signal filters and the classifiers all read through is decoded once:
the samples at 4 a second among the windows' frames, decoded at the classifiers' size.

A pass's readers are kept apart (``_Readers``): one whose work fails (its model's error, a bug in it) reads no
further and gets its error as its result, raised in its own filter; the others read on. A group that fails to
decode is every reader's failure.

Oracle for the tests: what a reader keeps of a streamed clip equals what it computes from the same samples held at
once (a clip within the cap), whatever the group size and whoever else reads the pass.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
import torch

from pipeline.errors import DecodeError, ItemError, ItemTimeout, MediasieveError, ShutdownError
from pipeline.video.decoders import size_needed
from pipeline.video.preprocess import ClipViews, luma
from pipeline.video.sampling import (
    AtFps,
    Frames,
    Windows,
    clip_duration,
    frame_times,
    request_indices,
    window_bounds,
)

if TYPE_CHECKING:
    from pipeline.media.item import MediaItem

STREAM_GROUP = 512
"""Samples decoded at a time (at most): at a long side of 256, 512 frames take 57 MB."""


def group_size(width: int, height: int) -> int:
    """Samples decoded at a time from a source of ``width`` x ``height``: ``STREAM_GROUP`` up to 1080p, fewer above
    (each decode has ``video.decode_timeout_s``, and at 4 samples a second of 25 fps a group of 512 walks 3,072
    source frames: seconds at 1080p on one CPU thread, near the 120-s default at 4K)."""
    return max(16, min(STREAM_GROUP, STREAM_GROUP * 1920 * 1080 // max(1, width * height)))


class Reading(Protocol):
    """What one reader keeps of a stream as its groups go by."""

    def feed(self, frames: torch.Tensor, y: torch.Tensor, indices: list[int], at: list[float]) -> None:
        """One group: ``[N, H, W, 3]`` uint8 frames on the rank's device, their luma (``[N, H, W]`` float32,
        ``pipeline.video.preprocess.luma``: computed once for every reader), their stream indices and their times on
        the file's timeline; each group follows the one before without a gap."""

    def result(self) -> Any:
        """What the reader kept, once the last group has gone by."""


class StreamReader(Protocol):
    """A filter's reader of a stream: hashable (its parameters), it opens one ``Reading`` per pass."""

    what: ClassVar[str]
    """What reads, for an error's message (``the scene cuts``)."""

    def open(self, device: str) -> Reading: ...


@dataclass(frozen=True)
class Stream:
    """The samples at ``fps`` all through a clip too long for its rate request's cap, each group given to
    ``reader`` at a long side of at most ``max_side``. The item's decode gives it no frames; every ``Stream`` of an
    item is read in one pass (``passes``), decoded at the largest ``max_side`` among them, or at the windows' size
    where the pass reads windows too (a reader wanting fewer pixels gets them strided, ``stride_for``)."""

    fps: float
    max_side: int
    reader: StreamReader


class WindowReading(Protocol):
    """What one reader keeps of the windows as their groups go by."""

    def feed(self, clips: ClipViews, spans: list[tuple[float, float]]) -> None:
        """Consecutive windows: each one's frames (``[n, H, W, 3]`` uint8, made when asked for) and its
        ``(start_s, end_s)`` on the file's timeline."""

    def result(self) -> Any:
        """What the reader kept, once the last window has gone by."""


class WindowReader(Protocol):
    """A filter's reader of a window stream: hashable, it opens one ``WindowReading`` per pass."""

    what: str
    """What reads, for an error's message (``the vfx classifier``)."""

    def open(self, device: str) -> WindowReading: ...


@dataclass(frozen=True)
class WindowStream:
    """Sliding windows all through a clip with more of them than its filter's ``Windows`` request takes from the
    item's decode: ``request`` is the windows read here (``spread``, its ``max_windows`` the cap of the stream), a
    group of consecutive windows decoded at a time (``read_pass``) and given to ``reader``. Every
    ``WindowStream`` of an item whose request is decoded at the same size is read in the same pass, whatever its
    windows (four classifiers with one input size decode a film's windows once, a classifier's windows every 4 s
    among another's every 2 s too), and with it the item's ``Stream`` samples (``passes``)."""

    request: Windows
    reader: WindowReader

    @property
    def pass_key(self) -> tuple[int | None, int | None]:
        return self.request.short_side, self.request.max_side


def stride_for(frames: torch.Tensor, max_side: int) -> int:
    """The row and column stride that brings ``frames`` ``[N, H, W, C]`` to a long side near ``max_side`` (as a
    filter strides frames decoded larger than it needs)."""
    return max(1, max(frames.shape[1:3]) // max_side)


def read_all_through(video, request: AtFps | Windows) -> bool:
    """Whether the item's decode gave ``request`` (a rate or windows request that does not spread) no frames of a
    clip of several: the clip is over the request's cap, and its filter reads it through its ``Stream`` or
    ``WindowStream`` instead (``MediaItem.streamed``)."""
    return video.meta.num_frames > 1 and (not video.windows(request) or not len(video.indices(request)))


def _own_failure(e: Exception) -> bool:
    """Whether a reader's error is its own (its model's, a bug in it), kept from the pass's other readers: not one
    that stops the item (the watchdog gave it up, the rank is stopping) or the rank (a GPU that failed)."""
    return not isinstance(e, MediasieveError) or (isinstance(e, ItemError)
                                                  and not isinstance(e, (ItemTimeout, ShutdownError)))


class _Readers:
    """The readings of a pass's streams, kept apart: a stream whose reader fails to open, to take a group, or to
    give its result (``_own_failure``) is read no further, and its error is its result; the others read on. Each
    stream's seconds in its reader are counted (``seconds``), for its filter's ``filter_s``."""

    def __init__(self, streams: list, device: str):
        self.readings: dict = {}
        self.failed: dict = {}
        self.seconds: dict = dict.fromkeys(streams, 0.0)
        for s in streams:
            self._guard(s, lambda s=s: self.readings.__setitem__(s, s.reader.open(device)))

    def _guard(self, stream, call) -> None:
        t = time.perf_counter()
        try:
            call()
        except Exception as e:
            if not _own_failure(e):
                raise
            self.failed[stream] = e
            self.readings.pop(stream, None)
        finally:
            self.seconds[stream] += time.perf_counter() - t

    def feed(self, stream, *args) -> None:
        """One group to ``stream``'s reading, where it has not failed."""
        if stream in self.readings:
            self._guard(stream, lambda: self.readings[stream].feed(*args))

    def results(self) -> dict:
        """Each stream's ``result()``, or its error."""
        out: dict = {}
        for s in list(self.readings):
            self._guard(s, lambda s=s: out.__setitem__(s, self.readings[s].result()))
        return {**out, **self.failed}


def _readers(streams: list) -> str:
    """Who reads a pass, for its error message (``the scene cuts and the static filter``; ``the static filter, the
    vfx classifier and the rov classifier``)."""
    who = list(dict.fromkeys(s.reader.what for s in streams))
    return who[0] if len(who) == 1 else f"{', '.join(who[:-1])} and {who[-1]}"


def _decode_group(media: MediaItem, group: Frames, num_frames: int, purpose: str):
    """One group of a pass decoded (``media.more_frames``). First ``ItemTimeout`` where the rank's watchdog has let
    the item go: a pass over a film stops at its next group (a group's decode stops at its next frame; the readers'
    work between decodes, a classifier's windows, would otherwise go on for nobody). A failure is the same error
    type, naming the group's frames and what the pass is for (``purpose``, after the clip's frame count)."""
    if media.given_up.is_set():
        raise ItemTimeout("the item was given up (runtime.item_timeout_s) while it was read all through")
    try:
        return media.more_frames(group)
    except DecodeError as e:
        raise type(e)(f"decoding frames {group.indices[0]}-{group.indices[-1]} of the clip's {num_frames}{purpose}, "
                      f"failed: {e}") from e


def _long_side(size: tuple[int, int], request) -> int:
    """The long side of the frames of ``request`` (one with a ``max_side`` or a ``short_side``) decoded from an item
    decoded at ``size`` (``size_needed``; a request is never decoded larger than the item)."""
    need = size_needed(request, size)
    return min(max(size), max(need)) if need else max(size)


def passes(streams: list, size: tuple[int, int]) -> list[list]:
    """The passes that an item's ``streams`` are read in, on a clip decoded at ``size`` (``(w, h)``): the
    ``WindowStream``s of one size together (``pass_key``); every ``Stream`` (every rate) together, and with the
    windows of the first size whose frames are at least as large as the largest ``max_side`` of the rates, so that
    a film the signal filters and the classifiers read all through is decoded once for them. Windows too small for
    the rates (a classifier taking 112 pixels) leave the rates a pass of their own, as before."""
    rates = [s for s in streams if isinstance(s, Stream)]
    by_key: dict[tuple, list[WindowStream]] = {}
    for s in streams:
        if isinstance(s, WindowStream):
            by_key.setdefault(s.pass_key, []).append(s)
    need = _long_side(size, Frames((), max_side=max(s.max_side for s in rates))) if rates else 0
    joint = next((k for k, w in by_key.items() if rates and _long_side(size, w[0].request) >= need), None)
    out = [(rates if k == joint else []) + w for k, w in by_key.items()]
    return out + ([rates] if rates and joint is None else [])


def window_groups(windows: list[list[int]], size: int) -> list[tuple[int, int]]:
    """``[a, b)`` ranges of consecutive ``windows`` (each a list of frame indices) whose frames together are at most
    ``size`` (a window with more alone makes a group of its own)."""
    out, a = [], 0
    while a < len(windows):
        union, b = set(windows[a]), a + 1
        while b < len(windows):
            new = set(windows[b]).difference(union)
            if len(union) + len(new) > size:
                break
            union.update(new)
            b += 1
        out.append((a, b))
        a = b
    return out


def read_pass(media: MediaItem, streams: list, device: str) -> tuple[dict, dict]:
    """Every one of ``streams`` (one of ``passes``) read in one pass over the item's clip: the samples of every
    rate and the windows of every request, in the order their first frames come, in groups of at most
    ``group_size`` frames (``window_groups``: a frame that two of them share, samples or windows, decoded once);
    each group decoded (``media.more_frames``, under ``video.decode_timeout_s``) at the windows' size where the
    pass reads windows, else at the rates' largest ``max_side``; each rate's samples of the group given to its
    readers (strided to their ``max_side``, with a luma computed once per stride), each request's windows to the
    readers of that request, and the frames let go. A tail found broken ends the samples where it breaks and the
    windows at the last one whose frames all decoded.

    Returns:
        Each stream's result (``Reading.result()`` or ``WindowReading.result()``, or its reader's own error), and
        each stream's seconds in its reader (the pass's decoding is not in them).

    Raises:
        DecodeError: a group's decode failed (its frames and what they are for named; a timeout stays a
            ``DecodeTimeout``).
        ItemTimeout: the rank's watchdog gave the item up.
    """
    video = media.video()
    meta = video.meta
    rates = list(dict.fromkeys(s.fps for s in streams if isinstance(s, Stream)))
    requests = list(dict.fromkeys(s.request for s in streams if isinstance(s, WindowStream)))
    samples = {f: request_indices(AtFps(f, max(1, meta.num_frames)), meta.num_frames, meta.fps, meta.timestamps)[0]
               for f in rates}
    windows = {r: request_indices(r, meta.num_frames, meta.fps, meta.timestamps, video.start_s) for r in requests}
    bounds = {r: window_bounds(r, meta.num_frames, meta.fps, meta.timestamps, video.start_s) for r in requests}
    units = sorted([(i, 0, k, n) for k, f in enumerate(rates) for n, i in enumerate(samples[f])]
                   + [(w[0] if w else 0, 1, k, n) for k, r in enumerate(requests) for n, w in enumerate(windows[r])])

    def frames_of(unit) -> list[int]:  # a sample is one frame, a window its request's frames
        _, kind, k, n = unit
        return [samples[rates[k]][n]] if kind == 0 else windows[requests[k]][n]

    if requests:
        sized = {"max_side": requests[0].max_side, "short_side": requests[0].short_side}
    else:
        sized = {"max_side": max(s.max_side for s in streams)}
    of_rate = {f: [s for s in streams if isinstance(s, Stream) and s.fps == f] for f in rates}
    readers = _Readers(streams, device)
    named = _readers(streams)
    for a, b in window_groups([frames_of(u) for u in units], group_size(meta.width, meta.height)):
        if not readers.readings:
            break  # every reader has failed: nothing to decode for
        chunk = units[a:b]
        group = Frames(tuple(sorted({i for u in chunk for i in frames_of(u)})), **sized)
        more = _decode_group(media, group, meta.num_frames, _purpose(chunk, rates, requests, windows, named))
        where = {int(i): p for p, i in enumerate(more.indices(group))}
        frames = more.view(group) if where else None
        complete = True
        for k, f in enumerate(rates):
            mine = [samples[f][n] for _, kind, j, n in chunk if kind == 0 and j == k]
            got = list(itertools.takewhile(where.__contains__, mine))
            complete = complete and len(got) == len(mine)
            if got:
                _feed_rate(readers, of_rate[f], frames[torch.tensor([where[i] for i in got])].to(device), got, more,
                           device)
        end = math.inf  # a broken tail: the clip (and its windows, as the item's decode gives them) ends there
        if more.meta.num_frames < meta.num_frames:
            end = clip_duration(more.meta.num_frames, more.meta.fps, more.meta.timestamps) + 1e-6
        laid = [(requests[j], n) for _, kind, j, n in chunk if kind == 1]
        whole = [(r, n) for r, n in laid if bounds[r][n][1] <= end and all(i in where for i in windows[r][n])]
        complete = complete and len(whole) == len(laid)
        for r, mine in _by_request(whole).items():
            clips = ClipViews(lambda j, at=[windows[r][n] for n in mine], held=frames: held[torch.tensor(
                [where[i] for i in at[j]])], len(mine))
            spans = [(bounds[r][n][0] + video.start_s, bounds[r][n][1] + video.start_s) for n in mine]
            for s in list(readers.readings):
                if isinstance(s, WindowStream) and s.request == r:
                    readers.feed(s, clips, spans)
        more = frames = clips = None  # let the group's frames go before the next decode
        if not complete:
            break  # the tail is broken: the clip ends there
    return readers.results(), readers.seconds


def _feed_rate(readers: _Readers, streams: list[Stream], frames: torch.Tensor, indices: list[int], more,
               device: str) -> None:
    """One group's samples of a rate (``frames`` at stream ``indices``, of the decode ``more``) to the readers of
    it that read on, each strided to its ``max_side``, the luma computed once per stride."""
    at = (frame_times(np.asarray(indices, dtype=np.int64), more.meta.fps, more.meta.timestamps)
          + more.start_s).tolist()
    lumas: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # by stride: each reader's frames and luma
    for s in streams:
        if s not in readers.readings:
            continue
        step = stride_for(frames, s.max_side)
        if step not in lumas:
            strided = frames[:, ::step, ::step]
            lumas[step] = strided, luma(strided, device)
        readers.feed(s, *lumas[step], indices, at)


def _purpose(chunk: list[tuple], rates: list[float], requests: list[Windows], windows: dict[Windows, list],
             readers: str) -> str:
    """A group of a pass, for its decode's error: the rates it samples, each request's windows in it and how they
    are laid, and who reads them."""
    sampled = [f"{rates[k]:g}" for k in sorted({k for _, kind, k, _ in chunk if kind == 0})]
    parts = []
    for r, mine in _by_request([(requests[k], n) for _, kind, k, n in chunk if kind == 1]).items():
        parts.append(f"windows {mine[0] + 1}-{mine[-1] + 1} of {len(windows[r])} ({r.window_s:g} s every "
                     f"{r.stride_s:g} s)")
    if not parts:
        return f", sampled at {' and '.join(sampled)} a second all through for {readers} (stream_long_clips)"
    if not sampled:
        return f" for {' and '.join(parts)}, read all through for {readers} (stream_windows)"
    return (f", sampled at {' and '.join(sampled)} a second and for {' and '.join(parts)}, read all through for "
            f"{readers} (stream_long_clips, stream_windows)")


def _by_request(windows: list[tuple[Windows, int]]) -> dict[Windows, list[int]]:
    """``(request, window)`` pairs as each request's windows, in order."""
    out: dict[Windows, list[int]] = {}
    for r, n in windows:
        out.setdefault(r, []).append(n)
    return out
