"""Cut points at natural pauses: candidates near VAD boundaries, ranking, one NMS, a guard, a final check."""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CutParams:
    candidate_radius_s: float = 0.2
    """Candidates lie within this distance of a VAD boundary."""
    min_gap_s: float = 1.0
    """No two cuts closer than this (NMS, and again after the guard)."""
    pause_min_s: float = 0.3
    """A silence at least this long is a pause; shorter ones are breaths."""
    breath_weight: float = 0.4
    """w(kind): a pause weighs 1.0, a breath this much."""
    duration_scale_s: float = 0.25
    """h(d) = d / (d + scale): longer silences rank higher, saturating."""
    centre_weight: float = 0.3
    """How much a candidate at the reach of a silence ranks below one at its middle."""
    guard_s: float = 0.02
    """The guard moves a cut at most this far, to a zero crossing or an energy minimum."""


@dataclass
class Cut:
    time_s: float
    """Where the cut is, after the guard."""
    raw_s: float
    """Where NMS chose it, before the guard."""
    kind: str
    rank: float

    @property
    def guard_shift_s(self) -> float:
        return self.time_s - self.raw_s


def candidates(segments: list[tuple[float, float]], frame_times: np.ndarray, vad_prob: np.ndarray,
               energy_db: np.ndarray, p: CutParams) -> list[tuple[float, float, str]]:
    """``(time, rank, kind)`` for every feature frame within ``candidate_radius_s`` of a pause's boundaries.

    rank = score * w(kind) * h(duration) * c(t), score = (1 - speech prob) * (1 - normalised energy), and c a
    gentle preference for the middle of the silence (1 there, ``1 - centre_weight`` at the candidate radius past
    its edges): inside a silence the score is nearly flat, and without it tiny differences (a chunk's VAD warm-up)
    would move a cut between equally quiet frames.
    """
    if len(frame_times) == 0:
        return []
    lo, hi = np.percentile(energy_db, 5), np.percentile(energy_db, 95)
    energy = np.clip((energy_db - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    out = []
    r = p.candidate_radius_s
    prob, energy64 = vad_prob.astype(np.float64), energy.astype(np.float64)
    for (s0, e0), (s1, _e1) in zip(segments, segments[1:]):
        gap = max(0.0, s1 - e0)
        kind = "pause" if gap >= p.pause_min_s else "breath"
        w = 1.0 if kind == "pause" else p.breath_weight
        h = gap / (gap + p.duration_scale_s)
        # frames within r of either boundary (frame times are sorted: two slices, not a scan of the file)
        a0, b0 = np.searchsorted(frame_times, [e0 - r, s1 - r], side="left")
        a1, b1 = np.searchsorted(frame_times, [e0 + r, s1 + r], side="right")
        idx = np.union1d(np.arange(a0, a1), np.arange(b0, b1))
        t = frame_times[idx]
        keep = ((np.abs(t - e0) <= r) | (np.abs(t - s1) <= r)) & (t >= e0 - r) & (t <= s1 + r)
        idx, t = idx[keep], t[keep]
        mid, reach = (e0 + s1) / 2, gap / 2 + r
        score = (1.0 - prob[idx]) * (1.0 - energy64[idx])
        centre = 1.0 - p.centre_weight * np.abs(t - mid) / reach
        out.extend(zip(t.tolist(), (score * w * h * centre).tolist(), [kind] * len(idx)))
    return out


def nms(cands: list[tuple[float, float, str]], min_gap_s: float) -> list[tuple[float, float, str]]:
    """Keep the best-ranked candidates, none within ``min_gap_s`` of a better one (ties: earlier first)."""
    kept: list[tuple[float, float, str]] = []
    times: list[float] = []  # kept times, sorted: only the neighbours of a candidate can be too close
    for c in sorted(cands, key=lambda c: (-c[1], c[0])):
        i = bisect.bisect_left(times, c[0])
        if (i == 0 or c[0] - times[i - 1] >= min_gap_s) and (i == len(times) or times[i] - c[0] >= min_gap_s):
            times.insert(i, c[0])
            kept.append(c)
    return sorted(kept)


def guard(audio: np.ndarray, t: float, sample_rate: int, guard_s: float) -> float:
    """Move ``t`` to the nearest zero crossing within ``guard_s``, else to the quietest 2 ms there."""
    c = int(round(t * sample_rate))
    r = int(guard_s * sample_rate)
    a, b = max(0, c - r), min(len(audio) - 1, c + r)
    if b - a < 2:
        return t
    seg = audio[a:b + 1]
    crossings = np.nonzero(np.signbit(seg[:-1]) != np.signbit(seg[1:]))[0] + a
    if len(crossings):
        return float(crossings[np.argmin(np.abs(crossings - c))]) / sample_rate
    k = max(1, int(0.002 * sample_rate))
    energy = np.convolve(np.abs(seg), np.ones(k) / k, mode="same")
    return float(a + int(np.argmin(energy))) / sample_rate


def final_check(cuts: list[Cut], min_gap_s: float) -> list[Cut]:
    """After the guard's moves, drop the lower-ranked of any two cuts closer than ``min_gap_s``."""
    kept: list[Cut] = []
    for cut in sorted(cuts, key=lambda c: (-c.rank, c.time_s)):
        if all(abs(cut.time_s - k.time_s) >= min_gap_s - 1e-9 for k in kept):
            kept.append(cut)
    return sorted(kept, key=lambda c: c.time_s)


def cut_points(audio: np.ndarray, sample_rate: int, segments: list[tuple[float, float]], frame_times: np.ndarray,
               vad_prob: np.ndarray, energy_db: np.ndarray, p: CutParams) -> list[Cut]:
    """The whole cut stage: candidates -> NMS -> guard -> final min-gap check."""
    chosen = nms(candidates(segments, frame_times, vad_prob, energy_db, p), p.min_gap_s)
    moved = [Cut(guard(audio, t, sample_rate, p.guard_s), t, kind, rank) for t, rank, kind in chosen]
    return final_check(moved, p.min_gap_s)


def pieces(cuts: list[Cut], duration_s: float) -> list[tuple[float, float]]:
    """The segments between cuts (and the file's ends)."""
    bounds = [0.0] + [c.time_s for c in cuts] + [duration_s]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
