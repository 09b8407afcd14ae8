"""Frame requests a filter declares, and the plan that decodes their union once.

Oracle for the tests: every request's indices are a subset of the plan, and ``DecodedVideo.view`` returns the
frames at exactly those indices, in the request's order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Uniform:
    """``n`` frames evenly spaced over the whole clip (repeats when the clip has fewer frames)."""

    n: int
    max_side: int | None = None
    """The long side (pixels) these frames need at most, None: the decoded size. Where one pass over every request
    would pass ``video.reduced_pass_bytes``, requests with a ``max_side`` or ``short_side`` are decoded in a second
    pass at that size (``decode_video``)."""
    short_side: int | None = None
    """The short side these frames need at most (a model that resizes its input's short side), as ``max_side``."""


@dataclass(frozen=True)
class EveryK:
    """Every ``k``-th frame from the start, at most ``max_count``: a longer clip is sampled every k-th frame for the
    larger k that covers all of it (before, its tail went unseen)."""

    k: int
    max_count: int = 512
    max_side: int | None = None
    short_side: int | None = None


@dataclass(frozen=True)
class AtFps:
    """Frames at about ``fps`` per second from the start (frame differences, scene cuts), at most ``max_count``:
    a clip longer than ``max_count / fps`` seconds is sampled at the lower rate that spreads ``max_count`` frames
    over all of it (before, its tail went unseen: a still intro of a minute made a clip static)."""

    fps: float
    max_count: int = 512
    max_side: int | None = None
    short_side: int | None = None
    spread: bool = True
    """False: a clip longer than ``max_count`` frames at ``fps`` gets none from the item's decode; its filter reads
    the rate all through, a group at a time, keeping what it computes of each group and not the frames
    (``pipeline.video.stream``; ``scene_cuts``: spread 3 s apart over an hour, samples miss most cuts)."""


@dataclass(frozen=True)
class Windows:
    """Sliding windows of ``window_s`` seconds every ``stride_s`` between ``start_s`` and ``end_s`` (None: clip
    end), seconds on the file's timeline (where the rows' times count from), ``n`` frames evenly spaced inside
    each; at most ``max_windows``: where more would fit, the stride grows so that ``max_windows`` windows cover the
    whole span (the first at its start, the last at its end; before, the windows stopped early)."""

    window_s: float
    stride_s: float
    n: int
    start_s: float = 0.0
    end_s: float | None = None
    max_windows: int = 64
    max_side: int | None = None
    short_side: int | None = None
    spread: bool = True
    """False: a span holding more than ``max_windows`` windows at ``stride_s`` gets none from the item's decode; its
    filter reads the windows all through, a group at a time (``pipeline.video.stream.WindowStream``)."""


@dataclass(frozen=True)
class Frames:
    """The frames at ``indices`` (those past the clip's end are dropped): a filter's second, targeted decode of
    frames its first look singled out (``MediaItem.more_frames``: the frames between two samples a scene cut fell
    between)."""

    indices: tuple[int, ...]
    max_side: int | None = None
    short_side: int | None = None


FrameRequest = Uniform | EveryK | AtFps | Windows | Frames


def uniform_indices(start: int, stop: int, n: int) -> list[int]:
    """``n`` indices evenly spaced in ``[start, stop)`` (centres of n equal segments), repeating when short."""
    if stop <= start:
        return [start] * n
    span = stop - start
    return [min(stop - 1, start + int(math.floor((i + 0.5) * span / n))) for i in range(n)]


def variable_rate(timestamps: np.ndarray | None, fps: float) -> bool:
    """Whether frame times depart from ``index / fps`` by more than half a frame anywhere (a variable frame rate:
    sampling by index would then put windows and uniform frames at the wrong times)."""
    if timestamps is None or len(timestamps) < 2 or fps <= 0:
        return False
    return bool(np.max(np.abs(timestamps - np.arange(len(timestamps)) / fps)) > 0.5 / fps)


def clip_duration(num_frames: int, fps: float, timestamps: np.ndarray | None = None) -> float:
    """Seconds the clip plays: the last frame's time plus one typical frame interval (variable rate), else
    ``num_frames / fps``."""
    if variable_rate(timestamps, fps):
        return float(timestamps[-1] + np.median(np.diff(timestamps)))
    return num_frames / fps if fps > 0 else 0.0


def frame_times(indices: np.ndarray, fps: float, timestamps: np.ndarray | None = None) -> np.ndarray:
    """Seconds of the frames at ``indices`` from the first frame: their timestamps (variable rate), else
    ``index / fps``."""
    if variable_rate(timestamps, fps):
        return timestamps[indices]
    return indices / fps if fps > 0 else indices.astype(float)


def played_at(timestamps: np.ndarray, times: np.ndarray) -> list[int]:
    """Index of the frame on screen at each time (the last frame starting at or before it)."""
    idx = np.searchsorted(timestamps, np.asarray(times) + 1e-9, side="right") - 1
    return np.clip(idx, 0, len(timestamps) - 1).astype(int).tolist()


def window_bounds(req: Windows, num_frames: int, fps: float, timestamps: np.ndarray | None = None,
                  offset_s: float = 0.0) -> list[tuple[float, float]]:
    """The (start_s, end_s) of each window in seconds from the first frame, which sits ``offset_s`` into the file's
    timeline (``req``'s bounds are on that timeline); a clip shorter than one window gets one window over all of
    it."""
    duration = clip_duration(num_frames, fps, timestamps)
    end = min(duration, req.end_s - offset_s) if req.end_s is not None else duration
    start = max(0.0, req.start_s - offset_s)
    if end - start <= req.window_s:
        return [(start, end)] if end > start else [(0.0, duration)]
    stride = req.stride_s
    if math.floor((end - start - req.window_s) / stride + 1e-9) + 1 > req.max_windows:
        if not req.spread:
            return []  # read all through instead (``Windows.spread``)
        if req.max_windows > 1:
            stride = (end - start - req.window_s) / (req.max_windows - 1)  # a long clip: windows spread over all of it
    out = []
    t = start
    while t + req.window_s <= end + 1e-9 and len(out) < req.max_windows:
        out.append((t, t + req.window_s))
        t = start + len(out) * stride
    return out


def _timed_indices(req: FrameRequest, num_frames: int, fps: float, ts: np.ndarray,
                   offset_s: float) -> list[list[int]]:
    """Variable frame rate: requests in seconds pick the frame on screen at evenly spaced times."""
    duration = clip_duration(num_frames, fps, ts)
    if isinstance(req, Uniform):
        return [played_at(ts, (np.arange(req.n) + 0.5) * duration / req.n)]
    if isinstance(req, AtFps):
        times = np.zeros(1)
        if req.fps > 0:  # a long clip: a lower rate over all of it
            if not req.spread and math.ceil(duration * req.fps - 1e-9) > req.max_count:
                return [[]]
            times = np.arange(0.0, duration, max(1.0 / req.fps, duration / max(1, req.max_count)))[: req.max_count]
        return [sorted(set(played_at(ts, times)))]
    out = []
    for s, e in window_bounds(req, num_frames, fps, ts, offset_s):
        out.append(played_at(ts, s + (np.arange(req.n) + 0.5) * (e - s) / req.n))
    return out


def request_indices(req: FrameRequest, num_frames: int, fps: float,
                    timestamps: np.ndarray | None = None, offset_s: float = 0.0) -> list[list[int]]:
    """Frame indices of a request: one list per window (one list for whole-clip requests). ``offset_s``: where the
    first frame sits on the file's timeline, which window bounds are given on.

    With ``timestamps`` (seconds of each frame) of a variable-rate clip, whole-clip, rate and window requests are
    placed by time; otherwise by index at the average rate (the same thing for a constant rate).
    """
    if num_frames <= 0:
        return [[]]
    if isinstance(req, Frames):
        return [[i for i in req.indices if 0 <= i < num_frames]]
    if not isinstance(req, EveryK) and variable_rate(timestamps, fps):
        return _timed_indices(req, num_frames, fps, np.asarray(timestamps[:num_frames], float), offset_s)
    if isinstance(req, Uniform):
        return [uniform_indices(0, num_frames, req.n)]
    if isinstance(req, EveryK):
        k = max(1, req.k, math.ceil(num_frames / max(1, req.max_count)))  # a long clip: every k-th over all of it
        return [list(range(0, num_frames, k))[: req.max_count]]
    if isinstance(req, AtFps):
        step = max(1, int(round(fps / req.fps))) if fps > 0 and req.fps > 0 else 1
        if not req.spread and math.ceil(num_frames / step) > req.max_count:
            return [[]]
        step = max(step, math.ceil(num_frames / max(1, req.max_count)))  # a long clip: a lower rate over all of it
        return [list(range(0, num_frames, step))[: req.max_count]]
    if isinstance(req, Windows):
        out = []
        for s, e in window_bounds(req, num_frames, fps, offset_s=offset_s):
            a = min(num_frames - 1, int(math.floor(s * fps + 1e-9)))
            b = max(a + 1, min(num_frames, int(round(e * fps))))
            out.append(uniform_indices(a, b, req.n))
        return out
    raise TypeError(f"unknown frame request {req!r}")


@dataclass
class FramePlan:
    """The sorted union of every request's indices, and each request's positions in it."""

    indices: list[int]
    positions: dict[FrameRequest, list[np.ndarray]]


def make_plan(requests: list[FrameRequest], num_frames: int, fps: float,
              timestamps: np.ndarray | None = None, offset_s: float = 0.0) -> FramePlan:
    """Union the requests' indices so each frame is decoded once.

    Args:
        requests: every filter's frame requests for this item.
        num_frames: frames in the clip (as the decoder reports it).
        fps: average frame rate.
        timestamps: seconds of each frame, where the backend knows them (a variable rate is then sampled by time).
        offset_s: where the first frame sits on the file's timeline (window bounds are on that timeline).

    Returns:
        The plan: decode ``indices``; request ``r``'s window ``w`` is ``frames[positions[r][w]]``.
    """
    per_req = {r: request_indices(r, num_frames, fps, timestamps, offset_s) for r in dict.fromkeys(requests)}
    union = sorted({i for lists in per_req.values() for idx in lists for i in idx})
    where = {idx: pos for pos, idx in enumerate(union)}
    positions = {r: [np.array([where[i] for i in idx], dtype=np.int64) for idx in lists]
                 for r, lists in per_req.items()}
    return FramePlan(union, positions)
