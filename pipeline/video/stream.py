"""Frames read all through a long clip in one decode pass that every filter reading them shares.

A clip over a rate request's cap (``AtFps.spread`` false) gets none of those frames from the item's decode: held
at once, an hour at 4 a second would take 14,400 frames. Its filters declare a ``Stream`` instead; the item
(``MediaItem.streamed``) decodes the rate a group at a time and hands each group to every ``Stream`` at that rate
before letting its frames go, so that the scene cuts and the static filter decode a film once, not once each.
Sliding windows past their request's cap (``Windows.spread`` false) are read the same way (``WindowStream``):
groups of consecutive windows, given to every classifier whose input is of the same size.

A pass's readers are kept apart (``_Readers``): one whose work fails (its model's error, a bug in it) reads no
further and gets its error as its result, raised in its own filter; the others read on. A group that fails to
decode is every reader's failure.

Oracle for the tests: what a reader keeps of a streamed clip equals what it computes from the same samples held at
once (a clip within the cap), whatever the group size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

from pipeline.errors import DecodeError, ItemError, ItemTimeout, MediasieveError, ShutdownError
from pipeline.video.preprocess import ClipViews, luma
from pipeline.video.sampling import AtFps, Frames, Windows, clip_duration, request_indices, window_bounds

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
    item at one ``fps`` is read in one pass, decoded at the largest ``max_side`` among them (a reader wanting
    fewer pixels gets them strided, ``stride_for``)."""

    fps: float
    max_side: int
    reader: StreamReader

    @property
    def pass_key(self) -> float:
        """The streams of an item with equal keys are read in one pass."""
        return self.fps

    @staticmethod
    def read_pass(media: MediaItem, streams: list[Stream], device: str) -> dict[Stream, Any]:
        return read_streams(media, streams, device)


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
    group of consecutive windows decoded at a time (``read_windows``) and given to ``reader``. Every
    ``WindowStream`` of an item whose request is decoded at the same size is read in the same pass, whatever its
    windows (four classifiers with one input size decode a film's windows once, a classifier's windows every 4 s
    among another's every 2 s too)."""

    request: Windows
    reader: WindowReader

    @property
    def pass_key(self) -> tuple[int | None, int | None]:
        return self.request.short_side, self.request.max_side

    @staticmethod
    def read_pass(media: MediaItem, streams: list[WindowStream], device: str) -> dict[WindowStream, Any]:
        return read_windows(media, streams, device)


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
    give its result (``_own_failure``) is read no further, and its error is its result; the others read on."""

    def __init__(self, streams: list, device: str):
        self.readings: dict = {}
        self.failed: dict = {}
        for s in streams:
            self._guard(s, lambda s=s: self.readings.__setitem__(s, s.reader.open(device)))

    def _guard(self, stream, call) -> None:
        try:
            call()
        except Exception as e:
            if not _own_failure(e):
                raise
            self.failed[stream] = e
            self.readings.pop(stream, None)

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
    """Who reads a pass, for its error message (``the scene cuts and the static filter``)."""
    return " and ".join(dict.fromkeys(s.reader.what for s in streams))


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


def read_streams(media: MediaItem, streams: list[Stream], device: str) -> dict[Stream, Any]:
    """Every one of ``streams`` (one ``fps``) read in one pass over the item's clip: the samples decoded
    ``group_size`` at a time (``media.more_frames``), each group given to every reader (with its luma, computed
    once for readers at one stride) and then let go. A tail found broken ends the samples where it breaks.

    Returns:
        Each stream's ``Reading.result()``.

    Raises:
        DecodeError: a group's decode failed (its frames named; a timeout stays a ``DecodeTimeout``).
        ItemTimeout: the rank's watchdog gave the item up.
    """
    fps = streams[0].fps
    meta = media.video().meta
    wanted = request_indices(AtFps(fps, max(1, meta.num_frames)), meta.num_frames, meta.fps, meta.timestamps)[0]
    side = max(s.max_side for s in streams)
    readers = _Readers(streams, device)
    size = group_size(meta.width, meta.height)
    purpose = f", sampled at {fps:g} a second all through for {_readers(streams)} (stream_long_clips)"
    for g in range(0, len(wanted), size):
        if not readers.readings:
            break  # every reader has failed: nothing to decode for
        group = Frames(tuple(wanted[g:g + size]), max_side=side)
        more = _decode_group(media, group, meta.num_frames, purpose)
        got = more.indices(group)
        if len(got):
            frames = more.view(group).to(device)
            at, indices = (more.times(group) + more.start_s).tolist(), got.tolist()
            lumas: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # by stride: each reader's frames and luma
            for s in list(readers.readings):
                step = stride_for(frames, s.max_side)
                if step not in lumas:
                    strided = frames[:, ::step, ::step]
                    lumas[step] = strided, luma(strided, device)
                readers.feed(s, *lumas[step], indices, at)
            del frames, lumas
        if len(got) < len(group.indices):
            break  # the tail is broken: the clip ends there
    return readers.results()


def window_groups(windows: list[list[int]], size: int) -> list[tuple[int, int]]:
    """``[a, b)`` ranges of consecutive ``windows`` (each a list of frame indices) whose frames together are at most
    ``size`` (a window with more alone makes a group of its own)."""
    out, a = [], 0
    while a < len(windows):
        union, b = set(windows[a]), a + 1
        while b < len(windows) and len(union.union(windows[b])) <= size:
            union.update(windows[b])
            b += 1
        out.append((a, b))
        a = b
    return out


def read_windows(media: MediaItem, streams: list[WindowStream], device: str) -> dict[WindowStream, Any]:
    """Every one of ``streams`` (requests decoded at one size, each with its windows) read in one pass over the
    item's clip: the windows of every request in the order they start, in groups whose frames number at most
    ``group_size`` (``window_groups``: a frame two windows share, of one request or two, decoded once), each group's
    frames decoded at the requests' size (``media.more_frames``, a decode under ``video.decode_timeout_s``), each
    request's windows of the group given to every reader of it, and the frames let go. A tail found broken ends the
    windows at the last one whose frames all decoded.

    Returns:
        Each stream's ``WindowReading.result()``.

    Raises:
        DecodeError: a group's decode failed (its frames and windows named; a timeout stays a ``DecodeTimeout``).
        ItemTimeout: the rank's watchdog gave the item up.
    """
    video = media.video()
    meta = video.meta
    requests = list(dict.fromkeys(s.request for s in streams))
    windows = {r: request_indices(r, meta.num_frames, meta.fps, meta.timestamps, video.start_s) for r in requests}
    bounds = {r: window_bounds(r, meta.num_frames, meta.fps, meta.timestamps, video.start_s) for r in requests}
    order = sorted(((w[0] if w else 0, k, n) for k, r in enumerate(requests) for n, w in enumerate(windows[r])))
    merged = [(requests[k], n) for _, k, n in order]  # every request's windows, by their first frame
    readers = _Readers(streams, device)
    named = _readers(streams)
    side = requests[0]
    for a, b in window_groups([windows[r][n] for r, n in merged], group_size(meta.width, meta.height)):
        if not readers.readings:
            break  # every reader has failed: nothing to decode for
        group = Frames(tuple(sorted({i for r, n in merged[a:b] for i in windows[r][n]})), max_side=side.max_side,
                       short_side=side.short_side)
        more = _decode_group(media, group, meta.num_frames, _windows_named(merged[a:b], windows, named))
        where = {int(i): p for p, i in enumerate(more.indices(group))}
        end = math.inf  # a broken tail: the clip (and its windows, as the item's decode gives them) ends there
        if more.meta.num_frames < meta.num_frames:
            end = clip_duration(more.meta.num_frames, more.meta.fps, more.meta.timestamps) + 1e-6
        whole = [(r, n) for r, n in merged[a:b] if bounds[r][n][1] <= end and all(i in where for i in windows[r][n])]
        if whole:
            frames = more.view(group)
            for r, mine in _by_request(whole).items():
                clips = ClipViews(lambda j, at=[windows[r][n] for n in mine]: frames[torch.tensor(
                    [where[i] for i in at[j]])], len(mine))
                spans = [(bounds[r][n][0] + video.start_s, bounds[r][n][1] + video.start_s) for n in mine]
                for s in list(readers.readings):
                    if s.request == r:
                        readers.feed(s, clips, spans)
        if len(whole) < b - a:
            break  # the tail is broken: the clip ends there
    return readers.results()


def _windows_named(group: list[tuple[Windows, int]], windows: dict[Windows, list], readers: str) -> str:
    """A group of a windows pass, for its decode's error: each request's windows in it and how they are laid."""
    parts = []
    for r, mine in _by_request(group).items():
        parts.append(f"windows {mine[0] + 1}-{mine[-1] + 1} of {len(windows[r])} ({r.window_s:g} s every "
                     f"{r.stride_s:g} s)")
    return f" for {' and '.join(parts)}, read all through for {readers} (stream_windows)"


def _by_request(windows: list[tuple[Windows, int]]) -> dict[Windows, list[int]]:
    """``(request, window)`` pairs as each request's windows, in order."""
    out: dict[Windows, list[int]] = {}
    for r, n in windows:
        out.setdefault(r, []).append(n)
    return out
