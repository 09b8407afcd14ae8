"""Weight-free signal filters in torch on the rank's device: black borders, static, exposure, sharpness, cuts.

Each works on frames the item decodes once (uint8 RGB), has its thresholds in config, and writes scores and a
label. Pixel outputs are in source pixels even when decoding downscaled.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Container
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from pipeline.errors import DecodeError
from pipeline.filters.base import FilterContext, VideoFilter
from pipeline.media.item import MediaItem
from pipeline.video.preprocess import luma
from pipeline.video.sampling import AtFps, Frames, Uniform
from pipeline.video.stream import Stream, read_all_through

log = logging.getLogger(__name__)

BOX = pa.struct([("x", pa.int32()), ("y", pa.int32()), ("w", pa.int32()), ("h", pa.int32())])


@dataclass(frozen=True)
class Borders:
    """Where the content of sampled frames lies: ``box`` ``(x, y, w, h)``, and the ``overlays`` ``(x, y, w, h)``
    found in its bars (burnt-in subtitles or a logo on a bar, left outside the box)."""

    box: tuple[int, int, int, int]
    overlays: tuple[tuple[int, int, int, int], ...] = ()
    blur_fill: bool = False
    """The box is narrowed to a picture whose blurred copy fills its sides (``blur_fill_box``)."""


def frames_content_box(frames: torch.Tensor, device: str, threshold: float, min_fraction: float,
                       max_overlay_fill: float = 0.5, max_bar_fraction: float = 0.25,
                       blur_fill: bool = False) -> Borders:
    """``content_box`` of uint8 RGB frames: rows measured on every 4th column and columns on every 4th row, so each
    axis keeps its full resolution for a quarter of the pixels each; with ``blur_fill``, narrowed by
    ``blur_fill_box``."""
    return borders(luma(frames[:, :, ::4], device), luma(frames[:, ::4, :], device), threshold, min_fraction,
                   max_overlay_fill, max_bar_fraction, blur_fill)


def borders(y_rows: torch.Tensor, y_cols: torch.Tensor, threshold: float, min_fraction: float,
            max_overlay_fill: float = 0.5, max_bar_fraction: float = 0.25, blur_fill: bool = False) -> Borders:
    """``frames_content_box`` from the luma of the frames' every 4th column (``y_rows``) and every 4th row."""
    found = content_box(y_rows, threshold, min_fraction, y_cols, max_overlay_fill, max_bar_fraction)
    if not blur_fill:
        return found
    box, filled = blur_fill_box(y_rows, y_cols, found.box)
    return Borders(box, found.overlays, filled)


def sample_rate(times) -> float:
    """Frames per second of evenly spaced sample ``times`` (a rate request's, lowered for a long clip); 0 for one."""
    if len(times) < 2 or times[-1] <= times[0]:
        return 0.0
    return float((len(times) - 1) / (times[-1] - times[0]))


def thumbnails(y: torch.Tensor, side: int = 32) -> torch.Tensor:
    """``[N, side, side]`` thumbnails (0-1, area averages) of luma ``[N, H, W]`` (0-255): where a picture's
    structure lies, whatever its size and colours (the static filter's motion, the scene cuts' changes of view)."""
    return F.interpolate(y[:, None], size=(side, side), mode="area")[:, 0] / 255.0


def thumbnail_steps(thumbs: torch.Tensor) -> torch.Tensor:
    """The mean absolute difference between each pair of consecutive ``thumbnails``: ``[N - 1]``."""
    return (thumbs[1:] - thumbs[:-1]).abs().mean(dim=(1, 2))


def subsample_step(video, request, max_side: int | None = None) -> int:
    """The row and column step that brings a request's (cropped) frames to a long side near ``max_side`` (default:
    the request's ``max_side``), with no filtering: enough for statistics that do not need pixel accuracy, and much
    cheaper than converting full frames. 1 for frames decoded at that size (``video.reduced_pass_bytes``)."""
    return max(1, max(video.size(request)) // (max_side or request.max_side))


def _runs(lit: list[bool], min_gap: int) -> list[list[int]]:
    """``[start, end)`` of the lit stretches of ``lit``, those fewer than ``min_gap`` apart joined (1: only
    adjacent ones)."""
    runs: list[list[int]] = []
    for i, on in enumerate(lit):
        if not on:
            continue
        if runs and i - runs[-1][1] < min_gap:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return runs


def _extent(fill: torch.Tensor, min_fraction: float, max_overlay_fill: float,
            max_bar_fraction: float) -> tuple[int, int, list[tuple[int, int]]]:
    """The content's ``[start, end)`` along one axis from ``fill`` (``[frames, positions]``: the fraction of lit
    pixels of each row or column in each frame), and the overlays set apart in its bars.

    An overlay is a stretch of lit positions at an edge that is sparse in every frame (at most ``max_overlay_fill``
    of its line lit: text or a logo, not a picture), apart from the rest by positions dark in every frame, and
    lies, with that dark gap, in the outer ``max_bar_fraction`` of the side: subtitles burnt into a letterbox bar.
    Where no line is dense anywhere (a title card, credits on black) there is no picture to set text apart from.
    """
    n = fill.shape[1]
    peak = fill.amax(dim=0).cpu()
    runs = _runs((peak >= min_fraction).tolist(), max(2, round(0.005 * n)))
    if not runs:  # an all-black clip: no content to crop to
        return 0, n, []
    if float(peak.max()) <= max_overlay_fill:  # no picture, only sparse content (a title card): nothing beside it
        return runs[0][0], runs[-1][1], []
    limit = max_bar_fraction * n
    first: list[tuple[int, int]] = []  # overlays at the start (top, left)
    while len(runs) >= 2 and runs[1][0] <= limit and float(peak[runs[0][0]:runs[0][1]].max()) <= max_overlay_fill:
        first.append(tuple(runs.pop(0)))
    last: list[tuple[int, int]] = []  # at the end (bottom, right)
    while (len(runs) >= 2 and n - runs[-2][1] <= limit
           and float(peak[runs[-1][0]:runs[-1][1]].max()) <= max_overlay_fill):
        last.append(tuple(runs.pop()))
    # one overlay per bar (the letters of a logo are runs apart), grown over the faint edges of its text
    overlays = []
    if first:
        overlays.append(_grow(peak, first[0][0], first[-1][1], 0, runs[0][0] - 1))
    if last:
        overlays.append(_grow(peak, last[-1][0], last[0][1], runs[-1][1] + 1, n))
    return runs[0][0], runs[-1][1], overlays


def _grow(peak: torch.Tensor, a: int, b: int, lo: int, hi: int) -> tuple[int, int]:
    """``[a, b)`` widened over the neighbouring positions with any lit pixel, within ``[lo, hi)``."""
    while a > lo and peak[a - 1] > 0:
        a -= 1
    while b < hi and peak[b] > 0:
        b += 1
    return a, b


def _span(lit: torch.Tensor, scale: float) -> tuple[int, int]:
    """``[start, end)`` in full pixels of the lit entries of ``lit``, measured on every ``scale``-th pixel."""
    at = torch.nonzero(lit).flatten()
    if len(at) == 0:
        return 0, 0
    return int(at[0]) * scale, (int(at[-1]) + 1) * scale


def content_box(y: torch.Tensor, threshold: float, min_fraction: float, y_cols: torch.Tensor | None = None,
                max_overlay_fill: float = 0.5, max_bar_fraction: float = 0.25) -> Borders:
    """The box outside which every sampled frame is black but for overlays on the bars.

    A row (column) is lit when, in some frame, at least ``min_fraction`` of its pixels exceed ``threshold`` luma; the
    fraction (not the max) keeps compression noise at a bar's edge from counting as content. The box spans the lit
    rows and columns, less the overlays at its edges (``_extent``): text in a bar would otherwise widen the crop
    over the bar and the text. Rows are measured on ``y``; columns on ``y_cols`` when given (a view subsampled
    along the other axis keeps each axis at full resolution for a quarter of the work), over the box's rows only.
    """
    y_cols = y if y_cols is None else y_cols
    h, w = y.shape[1], y_cols.shape[2]
    lit = y > threshold
    top, bottom, row_overlays = _extent(lit.float().mean(dim=2), min_fraction, max_overlay_fill, max_bar_fraction)
    step = h / y_cols.shape[1]  # the row subsampling of y_cols
    lit_cols = y_cols[:, int(top / step):max(int(top / step) + 1, math.ceil(bottom / step))] > threshold
    left, right, col_overlays = _extent(lit_cols.float().mean(dim=1), min_fraction, max_overlay_fill,
                                        max_bar_fraction)
    col_step = w / y.shape[2]  # the column subsampling of y
    overlays = []
    for r0, r1 in row_overlays:
        x0, x1 = _span(lit[:, r0:r1].any(dim=0).any(dim=0), col_step)
        overlays.append((round(x0), r0, round(x1 - x0), r1 - r0))
    for c0, c1 in col_overlays:
        y0, y1 = _span(lit_cols[:, :, c0:c1].any(dim=0).any(dim=1), step)
        overlays.append((c0, round(y0 + int(top / step) * step), c1 - c0, round(y1 - y0)))
    return Borders((left, top, right - left, bottom - top), tuple(overlays))


def _fill_panels(y: torch.Tensor, min_panel: float, max_detail: float,
                 min_edge_rows: float) -> tuple[int, int] | None:
    """The picture's ``[start, end)`` across the columns of luma frames ``y`` (``[N, rows, W]``, the columns at full
    resolution, the rows may be strided) when smooth panels fill both sides of it (a blurred, enlarged copy of the
    picture: a phone's upright video on a landscape frame), else None.

    Each panel ends at an edge: the outermost column, at least ``min_panel`` of the width in, where the mean step
    to the next column is at least the picture's mean step (between the two edges) and 3 times the panel's, and the
    panel's detail (its mean step) is at most ``max_detail`` of the picture's. The panels are within 3% of the
    width of each other (the picture is centred). Smooth sides are also a portrait against a defocused background,
    so each edge must be one straight, still line: in at least ``min_edge_rows`` of the rows of every frame
    together, the largest step from the panel to the edge is a visible one (8 levels) on the edge's column. Smooth
    panels with straight edges are also flat bars (``_is_blurred_copy`` tells them apart).
    """
    w = y.shape[2]
    if w < 64:
        return None
    gx = (y[:, :, 1:] - y[:, :, :-1]).abs()  # [N, rows, W-1]: the step from column x to x+1
    detail = gx.mean(dim=(0, 1)).double().cpu()
    m = len(detail)
    csum = torch.cat([torch.zeros(1, dtype=torch.float64), detail.cumsum(0)])

    def mean(a: int, b: int) -> float:
        return float(csum[b] - csum[a]) / max(1, b - a)

    def edge_from(positions) -> int | None:
        for x in positions:  # outermost first
            panel = mean(0, x - 1) if x < m / 2 else mean(x + 2, m)
            inner = mean(x + 2, m - x - 2) if x < m / 2 else mean(m - x + 1, x - 1)
            if detail[x] >= max(inner, 3 * panel) and panel <= max_detail * inner:
                near = range(max(0, x - 2), min(m, x + 3))
                return max(near, key=lambda c: float(detail[c]))  # the step's peak where it spreads
        return None

    lo, hi = max(2, int(min_panel * w) - 1), int(0.45 * w)
    left = edge_from(range(lo, hi))
    right = edge_from(range(m - lo - 1, m - hi - 1, -1))
    if left is None or right is None:
        return None
    for edge, side in ((left, -1), (right, 1)):  # side: where the panel lies
        a, b = (max(0, edge - 6), edge + 2) if side < 0 else (edge - 1, min(m, edge + 7))
        peak, at = gx[:, :, a:b].max(dim=2)  # each row's largest step from the panel to the edge
        on_edge = (peak >= 8.0) & ((at + a - edge).abs() <= 1)
        if float(on_edge.float().mean()) < min_edge_rows:
            return None
    start, end = left + 1, right + 1
    if abs(start - (w - end)) > 0.03 * w:
        return None
    return start, end


def _is_blurred_copy(y: torch.Tensor, start: int, end: int, min_corr: float) -> bool:
    """Whether the side panels of luma frames ``y`` ``[N, H, W]`` outside columns ``[start, end)`` show the picture
    between them enlarged to the frame's width (centred) and blurred: what the editing apps put behind an upright
    video. Compared at a coarse scale, where the blur does not matter, by the correlation of the panels' luma with
    the prediction (mean removed per frame): flat bars, or any other surround, do not correlate."""
    _, h, w = y.shape
    picture = y[:, None, :, start:end]
    scale = w / (end - start)
    tall = F.interpolate(picture, size=(max(1, round(h * scale)), w), mode="area")[:, 0]  # enlarged to the width
    top = (tall.shape[1] - h) // 2
    predicted = tall[:, top:top + h]
    panels = torch.cat([y[:, :, :start], y[:, :, end:]], dim=2)
    guess = torch.cat([predicted[:, :, :start], predicted[:, :, end:]], dim=2)
    cell = max(2, h // 16)
    a = F.avg_pool2d(panels[:, None], cell, ceil_mode=True).flatten(1)
    b = F.avg_pool2d(guess[:, None], cell, ceil_mode=True).flatten(1)
    a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    denom = float(a.square().sum().sqrt() * b.square().sum().sqrt())
    return denom > 1e-6 and float((a * b).sum()) / denom >= min_corr


def _filled_span(across: torch.Tensor, step: int, k: int) -> tuple[int, int] | None:
    """The picture's ``[start, end)`` along the last axis of ``across`` (``[N, lines every step-th, length]``) when
    a blurred copy of it fills both ends (``_fill_panels``, then ``_is_blurred_copy`` on cells of about 4k x 4k
    pixels), else None."""
    span = _fill_panels(across, 0.05, 0.5, 0.5)
    if span is None:
        return None
    small = across[:, ::k, ::step * k]
    scale = small.shape[2] / across.shape[2]
    return span if _is_blurred_copy(small, round(span[0] * scale), round(span[1] * scale), 0.7) else None


def blur_fill_box(y_rows: torch.Tensor, y_cols: torch.Tensor,
                  box: tuple[int, int, int, int]) -> tuple[tuple[int, int, int, int], bool]:
    """``box`` narrowed to the picture when a blurred, enlarged copy of it fills its sides (an upright phone video
    on a landscape frame) or its top and bottom (a landscape video on an upright frame), and whether one did.

    ``y_rows`` and ``y_cols`` are the frames' luma with every 4th column and every 4th row (``frames_content_box``'s
    views): the panels' edges are found at full resolution across them (``_fill_panels``) and the copy checked at
    a coarse scale (``_is_blurred_copy``)."""
    x0, y0, w, h = box
    rs = y_rows.shape[1] / y_cols.shape[1]  # the row step of y_cols
    cs = y_cols.shape[2] / y_rows.shape[2]  # the column step of y_rows
    k = max(1, round(max(w, h) / 1024))  # the coarse copy about 256 pixels long
    found = False
    across = y_cols[:, int(y0 / rs):math.ceil((y0 + h) / rs), x0:x0 + w]  # [N, h/4, w]
    down = y_rows[:, y0:y0 + h, int(x0 / cs):math.ceil((x0 + w) / cs)]  # [N, h, w/4]
    cols = _filled_span(across, round(rs), k)
    if cols is not None:
        x0, w, found = x0 + cols[0], cols[1] - cols[0], True
        down = down[:, :, int(cols[0] / cs):math.ceil(cols[1] / cs)]  # inside the side panels
    rows = _filled_span(down.transpose(1, 2), round(cs), k)
    if rows is not None:
        y0, h, found = y0 + rows[0], rows[1] - rows[0], True
    return (x0, y0, w, h), found


def picture_box(y: torch.Tensor) -> tuple[int, int, int, int]:
    """The content box of luma frames ``[N, H, W]`` at the black-border filter's defaults: where the other signal
    filters measure, so that bars (and text on them) count neither as darkness, nor as stillness, nor as sharpness.
    The whole frame where (nearly) all of it is black."""
    x0, y0, w, h = content_box(y, BlackBorderParams.threshold, BlackBorderParams.min_fraction).box
    if w * h < 0.05 * y.shape[1] * y.shape[2]:
        return 0, 0, y.shape[2], y.shape[1]
    return x0, y0, w, h


@dataclass(frozen=True)
class BlackBorderParams:
    frames: int = 16
    """Frames sampled uniformly over the clip."""
    threshold: float = 24.0
    """Luma (0-255) at or below which a pixel counts as black."""
    min_fraction: float = 0.02
    """A row or column with at least this fraction of non-black pixels in some frame is content."""
    min_bar_fraction: float = 0.01
    """Bars thinner than this fraction of the frame side are not reported as letterbox/pillarbox."""
    max_overlay_fill: float = 0.5
    """Lit rows (columns) at a frame's edge, apart from the picture by rows dark in every frame, with at most this
    fraction of their pixels lit in any frame, are an overlay on the bar (burnt-in subtitles, a logo), not picture:
    the crop leaves them out (0 keeps them in it)."""
    max_bar_fraction: float = 0.25
    """An overlay and the dark rows between it and the picture lie within this fraction of the side."""
    blur_fill: bool = True
    """Crop off a blurred, enlarged copy of the picture that fills its sides (an upright phone video on a landscape
    frame) or its top and bottom (``blur_fill_box``), as bars are."""


class BlackBorderFilter(VideoFilter):
    """Letterbox and pillarbox detection (black bars, or a blurred copy of the picture filling them), giving the
    crop box of the content in source pixels."""

    weight_free = True
    params_type = BlackBorderParams
    output_type = pa.struct([("crop", BOX), ("top", pa.int32()), ("bottom", pa.int32()), ("left", pa.int32()),
                             ("right", pa.int32()), ("letterbox", pa.bool_()), ("pillarbox", pa.bool_()),
                             ("bar_overlays", pa.list_(BOX)), ("blur_fill", pa.bool_())])

    def frame_requests(self) -> list:
        return [Uniform(self.params.frames)]

    def apply_video(self, video, media: MediaItem, ctx: FilterContext) -> dict:
        p = self.params
        req = Uniform(p.frames)
        found = borders(video.luma(req, ctx.device, step=(1, 4)), video.luma(req, ctx.device, step=(4, 1)),
                        p.threshold, p.min_fraction, p.max_overlay_fill, p.max_bar_fraction, p.blur_fill)
        x0, y0, w, h = found.box
        sx, sy = video.scale
        W, H = video.meta.width, video.meta.height
        crop = {"x": round(x0 * sx), "y": round(y0 * sy), "w": round(w * sx), "h": round(h * sy)}
        crop["w"], crop["h"] = min(crop["w"], W - crop["x"]), min(crop["h"], H - crop["y"])
        top, left = crop["y"], crop["x"]
        bottom, right = H - crop["y"] - crop["h"], W - crop["x"] - crop["w"]
        overlays = [{"x": round(x * sx), "y": round(y * sy), "w": round(ow * sx), "h": round(oh * sy)}
                    for x, y, ow, oh in found.overlays]
        return {"crop": crop, "top": top, "bottom": bottom, "left": left, "right": right,
                "letterbox": min(top, bottom) > p.min_bar_fraction * H,
                "pillarbox": min(left, right) > p.min_bar_fraction * W, "bar_overlays": overlays,
                "blur_fill": found.blur_fill}


@dataclass(frozen=True)
class StaticParams:
    fps: float = 4.0
    """Frames per second sampled for frame differences."""
    max_frames: int = 1200
    """At most this many frames decoded with the item's other frames (the scene cuts' samples at the defaults: one
    decode serves both). A clip longer than ``max_frames / fps`` (5 minutes) is sampled at ``fps`` all through
    (``stream_long_clips``), or else at the lower rate that spreads ``max_frames`` over all of it (``sample_fps`` in
    the row)."""
    threshold: float = 0.004
    """Mean absolute luma difference (0-1) between sampled frames below which a span is static."""
    window_s: float = 2.0
    """Window length of the per-window motion scores."""
    max_structured: float = 0.001
    """A span is static too when its motion is noise (film grain, sensor noise) and what is left without the noise is
    below this: noise halves each time the averaging area grows fourfold, a change of the picture does not, so the
    part that is not noise is ``2 * m32 - m64`` from the differences on 32x32 and 64x64 cells. A grainy still
    measured 0.0044 (over ``threshold``) and 0.0004 without its noise; moving clips measure 0.009 or more without
    theirs. A quarter of ``threshold``: low motion with detail (a talking head) loses up to half to this measure."""
    stream_long_clips: bool = True
    """A clip longer than ``max_frames / fps`` is sampled at ``fps`` all through, a group at a time, keeping each
    step's motion and not the frames, in one pass with the scene cuts' samples at the same rate
    (``pipeline.video.stream``). False: ``max_frames`` samples spread over all of it; an hour's are then 3 s apart,
    and each 2-s window's motion is a difference across seconds."""


def _structured(m64: float, m32: float) -> float:
    """The frame differences without their noise part (``StaticParams.max_structured``)."""
    return max(0.0, 2.0 * m32 - m64)


def motion_steps(y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The motion of each step between consecutive luma frames ``[N, H, W]`` inside their content box
    (``picture_box``: a subtitle coming and going on a bar is no motion of the picture): the mean absolute
    difference of their 64x64 thumbnails (noise-robust, size-free), and of their 32x32 ones (four times the cell
    area: ``StaticParams.max_structured``)."""
    x0, y0, w, h = picture_box(y)
    y = y[:, y0:y0 + h, x0:x0 + w]
    return thumbnail_steps(thumbnails(y, 64)).cpu().numpy(), thumbnail_steps(thumbnails(y, 32)).cpu().numpy()


class _StaticReading:
    """The static filter's reading of a stream: each step's motion (``motion_steps``), each group's content box
    found over the group and the sample before it, so that every step is measured within one box."""

    def __init__(self):
        self.last: torch.Tensor | None = None
        self.d64: list[np.ndarray] = []
        self.d32: list[np.ndarray] = []
        self.at: list[float] = []

    def feed(self, frames: torch.Tensor, y: torch.Tensor, indices: list[int], at: list[float]) -> None:
        if self.last is not None:
            y = torch.cat([self.last, y])
        if len(y) > 1:
            d64, d32 = motion_steps(y)
            self.d64.append(d64)
            self.d32.append(d32)
        self.last = y[-1:]
        self.at += at

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The motion of each step (64x64 and 32x32 thumbnails) and each sample's time on the file's timeline."""
        d64, d32 = (np.concatenate(d) if d else np.zeros(0, np.float32) for d in (self.d64, self.d32))
        return d64, d32, np.asarray(self.at, dtype=np.float64)


@dataclass(frozen=True)
class StaticReader:
    """The static filter's reader of a stream (no parameters: every static filter at one rate reads the same)."""

    what: ClassVar[str] = "the static filter"

    def open(self, device: str) -> _StaticReading:
        return _StaticReading()  # the luma it reads is on the device already


def static_row(diffs: np.ndarray, diffs32: np.ndarray, times: np.ndarray, start_s: float, p: StaticParams) -> dict:
    """The static filter's row from each step's motion (``motion_steps``) and each sample's ``times`` from the
    first frame, which sits ``start_s`` into the file's timeline."""
    if len(times) < 2:
        return {"motion": 0.0, "static": True, "static_ratio": 1.0, "windows": [], "structured_motion": 0.0,
                "sample_fps": 0.0}

    def still(m64: float, m32: float) -> bool:
        return m64 < p.threshold or _structured(m64, m32) < p.max_structured

    windows = []
    t0, t1 = times[:-1], times[1:]
    t_end = times[-1]
    start = 0.0
    while start <= t_end - 1e-9 or not windows:
        end = start + p.window_s
        sel = (t0 >= start) & (t1 <= end + 1e-9)
        if not sel.any():  # samples further apart than a window (a long clip): the differences across it
            sel = (t0 < end - 1e-9) & (t1 > start + 1e-9)
        if not sel.any():
            sel = np.arange(len(diffs)) == 0
        m, m32 = float(diffs[sel].mean()), float(diffs32[sel].mean())
        windows.append({"start_s": start + start_s, "end_s": min(end, float(t_end)) + start_s,
                        "motion": m, "static": still(m, m32)})
        start = end
        if start > t_end:
            break
    motion, motion32 = float(diffs.mean()), float(diffs32.mean())
    return {"motion": motion, "static": still(motion, motion32),
            "static_ratio": sum(w["static"] for w in windows) / len(windows), "windows": windows,
            "structured_motion": _structured(motion, motion32), "sample_fps": sample_rate(times)}


class StaticFilter(VideoFilter):
    """Frame-difference energy inside the content box over the clip and per window; a still image (with or without
    sound) is static."""

    weight_free = True
    params_type = StaticParams
    output_type = pa.struct([
        ("motion", pa.float64()), ("static", pa.bool_()), ("static_ratio", pa.float64()),
        ("windows", pa.list_(pa.struct([("start_s", pa.float64()), ("end_s", pa.float64()),
                                        ("motion", pa.float64()), ("static", pa.bool_())]))),
        ("structured_motion", pa.float64()), ("sample_fps", pa.float64()),
    ])

    def _request(self) -> AtFps:
        return AtFps(self.params.fps, self.params.max_frames, max_side=256, spread=not self.params.stream_long_clips)

    def _stream(self) -> Stream:
        return Stream(self.params.fps, 256, StaticReader())

    def frame_requests(self) -> list:
        return [self._request()] + ([self._stream()] if self.params.stream_long_clips else [])

    def apply_video(self, video, media: MediaItem, ctx: FilterContext) -> dict:
        req = self._request()
        if read_all_through(video, req):
            diffs, diffs32, at = media.streamed(self._stream(), ctx.device)
            return static_row(diffs, diffs32, at - video.start_s, video.start_s, self.params)
        step = subsample_step(video, req)
        diffs, diffs32 = motion_steps(video.luma(req, ctx.device, step=(step, step)))
        return static_row(diffs, diffs32, video.times(req), video.start_s, self.params)


@dataclass(frozen=True)
class ExposureParams:
    frames: int = 16
    dark_threshold: float = 0.15
    """Mean luma (0-1, inside the black-border crop) below which the clip is too dark."""
    bright_threshold: float = 0.85
    """Mean luma above which the clip is too bright."""


class ExposureFilter(VideoFilter):
    """Too dark / too bright, measured inside the content box so black bars do not count as darkness."""

    weight_free = True
    params_type = ExposureParams
    output_type = pa.struct([("mean_luma", pa.float64()), ("dark_fraction", pa.float64()),
                             ("bright_fraction", pa.float64()), ("label", pa.string())])

    def frame_requests(self) -> list:
        return [Uniform(self.params.frames)]

    def apply_video(self, video, media: MediaItem, ctx: FilterContext) -> dict:
        req = Uniform(self.params.frames)
        step = subsample_step(video, req, 512)
        y = video.luma(req, ctx.device, step=(step, step))
        x0, y0, w, h = picture_box(y)
        inner = y[:, y0:y0 + h, x0:x0 + w] / 255.0
        mean = float(inner.mean())
        label = "dark" if mean < self.params.dark_threshold else "bright" if mean > self.params.bright_threshold else "ok"
        n = inner.numel()
        return {"mean_luma": mean, "dark_fraction": int(torch.count_nonzero(inner < 16 / 255)) / n,
                "bright_fraction": int(torch.count_nonzero(inner > 235 / 255)) / n, "label": label}


@dataclass(frozen=True)
class SharpnessParams:
    frames: int = 8
    analysis_short_side: int = 360
    """Frames are resized to this short side first, so the score does not depend on resolution."""
    blur_threshold: float = 60.0
    """Variance of the Laplacian below which the clip is blurry (low quality)."""


def laplacian(y: torch.Tensor) -> torch.Tensor:
    """The 4-neighbour Laplacian of ``[..., H, W]`` over its interior (``[..., H - 2, W - 2]``), from shifted views:
    ``conv2d`` with its 3x3 kernel on one channel took 67 ms for 8 frames at 360x640 on a CPU, this 9 ms."""
    c = y[..., 1:-1, 1:-1]
    return y[..., :-2, 1:-1] + y[..., 2:, 1:-1] + y[..., 1:-1, :-2] + y[..., 1:-1, 2:] - 4.0 * c


class SharpnessFilter(VideoFilter):
    """Blur measure: variance of the Laplacian of luma inside the content box, averaged over frames."""

    weight_free = True
    params_type = SharpnessParams
    output_type = pa.struct([("laplacian_var", pa.float64()), ("blurry", pa.bool_())])

    def frame_requests(self) -> list:
        return [Uniform(self.params.frames)]

    def apply_video(self, video, media: MediaItem, ctx: FilterContext) -> dict:
        y = video.luma(Uniform(self.params.frames), ctx.device)
        step = max(1, max(y.shape[1], y.shape[2]) // 512)
        x0, y0, w, h = (v * step for v in picture_box(y[:, ::step, ::step]))
        (x0, y0, w, h), _ = blur_fill_box(y[:, :, ::4], y[:, ::4, :], (x0, y0, w, h))  # a blurred fill is no blur
        # inside the bars and off their edge: a picture's edge against a black bar is the sharpest line in the frame
        # (a blurred letterboxed clip measured 226 with its bars, 3.9 without), and so is text on a bar
        inset = max(4, 2 * step) if (w, h) != (y.shape[2], y.shape[1]) else 0
        inset = max(0, min(inset, (min(w, h) - 3) // 2))  # a sliver of a box keeps 3 pixels for the Laplacian
        y = y[:, y0 + inset:y0 + h - inset, x0 + inset:x0 + w - inset][:, None]
        h, w = y.shape[-2:]
        s = self.params.analysis_short_side / min(h, w)
        if abs(s - 1.0) > 1e-3:
            y = F.interpolate(y, size=(max(3, round(h * s)), max(3, round(w * s))), mode="area")
        lap = laplacian(y)
        var = float(lap.var(dim=(1, 2, 3)).mean())
        return {"laplacian_var": var, "blurry": var < self.params.blur_threshold}


@dataclass(frozen=True)
class SceneCutParams:
    fps: float = 4.0
    """Frames per second compared."""
    max_frames: int = 1200
    """At most this many frames decoded with the item's other frames. A clip longer than ``max_frames / fps`` (5
    minutes) is sampled at ``fps`` all through by this filter (``stream_long_clips``), or else at the lower rate that
    spreads ``max_frames`` over all of it (``sample_fps`` in the row; before, with 480, a clip's cuts after 2 minutes
    went unseen). Placed (``frame_accurate``), cuts closer than one sample apart are told apart where the samples
    around them differ; without, they count once, and a dissolve shorter than one sample interval reads as a cut
    either way."""
    bins: int = 16
    """Histogram bins per RGB channel."""
    threshold: float = 0.45
    """Half the L1 distance (0-1) between two frames' colour histograms above which they are of two scenes."""
    gradual_threshold: float = 0.1
    """A step changing more than this may be part of a gradual transition (a dissolve's steps measured 0.13-0.6;
    motion in one scene mostly under 0.1; see ``transitions``)."""
    gradual_change: float = 0.25
    """The least distance between the frames at the two ends of a gradual transition. A dissolve's blended frames
    hold colours of neither scene, so its steps exceed the distance between its ends: dissolves between distinct
    scenes measured 0.33-0.47 end to end, with steps up to 0.65; motion in one scene, and a flash, under 0.05."""
    max_gradual_s: float = 5.0
    """The longest gradual transition: longer stretches of change are motion in one scene."""
    stream_long_clips: bool = True
    """A clip longer than ``max_frames / fps`` is sampled at ``fps`` all through, a group at a time, keeping the
    samples' histograms and thumbnails and not their frames, in one pass with the static filter's samples at the same
    rate (``pipeline.video.stream``). False: the ``max_frames`` samples spread over all of it, decoded with the
    item's other frames: 3 s apart in an hour of 320x180 with 1908 cuts, they found 288 and placing brought 1187 to
    their frames in 90 s (its budget spent on spans of 75 frames); sampled all through, all 1908 were placed, in
    65 s (``bench_scene_cuts.py``)."""
    frame_accurate: bool = True
    """Each cut placed at the frame where the picture changes, not at the first sample after it (up to ``1 / fps``
    late: 6 frames of 25 fps): the frames between the two samples it fell between are decoded
    (``MediaItem.more_frames``, at the samples' size) and compared step by step (``place_cuts``)."""
    structure_change: float = 0.1
    """The least mean luma difference (0-1, of 32x32 thumbnails) of a cut that keeps the colours: two shots of one
    scene (a reverse angle; here a mirrored or a zoomed-in copy of a test pattern) have histograms 0.01-0.12 apart
    but thumbnails 0.29-0.41; motion moved them 0.03-0.06 between samples and 0.01-0.06 between frames. A step
    between samples over this and over twice the steps either side is a candidate (with ``frame_accurate``: a cut
    only where its frames show one)."""
    max_placing_frames: int = 4800
    """At most this many frames decoded to place cuts in 5 minutes of video (``placing_budget``: a clip of 5
    minutes or less gets this many, a longer one as many per 5 minutes), the cuts first. A cut takes 7 to 16 at 4
    samples a second; with ``stream_long_clips`` off a 1-hour film's samples spread, and its cuts take 75 each. Past
    it a cut keeps the sample's time (``frame_exact`` false), a gradual transition its span, and a candidate is
    dropped. Whatever the budget, the spans do not overlap: placing decodes the clip about once more at most."""
    black_luma: float = 20.0
    """A frame whose mean luma (0-255) is at most this is the black of a fade. A mean, not a count of black pixels
    (ffmpeg blackdetect's): at 4 samples a second the fully black frames of a quick fade are seldom among them, and
    the darkest sampled ones still show the picture faintly; a logo over the black does not lift it either."""


TRANSITION = pa.struct([("start_s", pa.float64()), ("end_s", pa.float64()), ("kind", pa.string()),
                        ("frame", pa.int64()), ("frame_exact", pa.bool_())])


def soft_histograms(frames: torch.Tensor, bins: int) -> torch.Tensor:
    """``[N, 3 * bins]`` colour histograms of ``[N, H, W, 3]`` uint8 frames, each summing to 1, each value shared
    between its two nearest bin centres by distance. With hard bins a flat colour whose brightness drifts moves all
    its pixels to the next bin at once. Sharing is linear in the counts, so it is a ``[256, bins]`` matrix applied
    to each channel's 256-level histogram: the cost of a hard histogram."""
    n = frames.shape[0]
    counts = level_counts(frames, per_frame=frames.device.type == "cpu")
    x = (torch.arange(256, device=frames.device, dtype=torch.float32) + 0.5) * (bins / 256.0) - 0.5  # bin units
    low = x.floor().clamp(0, bins - 1)
    upper = (x - low).clamp(0, 1)
    share = torch.zeros(256, bins, device=frames.device)
    share[torch.arange(256), low.long()] += 1 - upper
    share[torch.arange(256), (low + 1).clamp(max=bins - 1).long()] += upper
    hist = (counts.reshape(n, 3, 256) @ share).reshape(n, 3 * bins)
    return hist / hist.sum(dim=1, keepdim=True)


def level_counts(frames: torch.Tensor, per_frame: bool) -> torch.Tensor:
    """``[N, 3 * 256]`` float counts of each channel's levels in ``[N, H, W, 3]`` uint8 frames. ``per_frame``: a
    ``bincount`` of the uint8 levels per frame and channel, 4.6x the speed of the batched scatter on this CPU (512
    frames of 192x108: 51 ms against 236; the scatter widens every level to int64 first); the batched scatter on a
    GPU, where a loop of small kernels would cost more than it saves."""
    n = frames.shape[0]
    flat = frames.reshape(n, -1, 3)
    if per_frame:
        out = torch.empty(n, 3, 256, device=frames.device)
        for i in range(n):
            for c in range(3):
                out[i, c] = torch.bincount(flat[i, :, c], minlength=256)
        return out.reshape(n, 3 * 256)
    levels = flat.long() + torch.arange(3, device=frames.device) * 256
    counts = torch.zeros(n, 3 * 256, device=frames.device)
    counts.scatter_add_(1, levels.reshape(n, -1), torch.ones(levels.numel() // n, device=frames.device).expand(n, -1))
    return counts


def _hist_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Half the L1 distance (0-1) between histograms along the last axis: the steps and ``across`` alike."""
    return 0.5 * (a - b).abs().sum(dim=-1)


def transitions(diff: list[float], black: list[bool], times: list[float], across: Callable[[int, int], float],
                p: SceneCutParams, candidates: bool = False) -> list[tuple[int, int, int, str]]:
    """Scene transitions from the changes between consecutive sampled frames.

    Consecutive steps where the picture changes more than ``p.gradual_threshold`` (or a frame is black) are one
    stretch of change. A dissolve changes the picture over several samples, each step about as much as a cut (a
    1-second fade through black gave 8 cuts), or, when it is slow, less than a cut: steps of 0.3-0.5 around the cut
    threshold split a 2-second dissolve into 4 cuts. A stretch is one transition when the frames at its two ends
    differ by more than ``p.gradual_change`` (``across``, the same histogram distance) and it lasts at most
    ``p.max_gradual_s``:

    - ``cut`` where one step holds the change (a cut amid motion; the others change less than half as much), if that
      step is above ``p.threshold`` (else a jolt);
    - ``gradual`` otherwise (a dissolve, a wipe), the new scene taken to start at the frame as far from both ends;
    - ``fade`` when black frames are in it, at the middle of those; a fade from black at the clip's start or to black
      at its end has no scene on one side and is no transition.

    With ``candidates``, a jolt whose step is over ``p.gradual_change`` is a ``candidate``: a cut if the frames
    between its samples show one (``place_cuts``). A short stretch whose ends differ less went back where it began
    (a flash, a flicker) or moved within one scene: no transition. A longer one is motion, not one change of scene:
    in it each run of steps above ``p.threshold`` is a transition, as if alone.

    Args:
        diff: the histogram distance of each step (frame i to i+1).
        black: whether each frame is black.
        times: each frame's time in seconds.
        across: the histogram distance between two frames, by index.
        p: the thresholds.

    Returns:
        ``(first frame, last frame, the frame where the new scene is taken to start, kind)`` of each transition.
    """
    n = len(black)
    changing = [diff[i] > p.gradual_threshold or black[i] or black[i + 1] for i in range(n - 1)]
    out = []
    for i, end in _runs(changing, 1):  # changing steps i..end-1, joining frames i..end
        dark = [k for k in range(i, end + 1) if black[k]]
        if dark:
            if 0 < i and end < n - 1:  # not from black at the start, nor to black at the end
                out.append((i, end, dark[len(dark) // 2], "fade"))
            continue
        if times[end] - times[i] > p.max_gradual_s:  # motion: what changes as a cut does in it, each apart
            for a, b in _runs([diff[k] > p.threshold for k in range(i, end)], 1):
                out.append((i + a, i + b, i + a + 1 + (b - 1 - a) // 2, "cut" if b - a == 1 else "gradual"))
            continue
        if across(i, end) <= p.gradual_change:
            continue  # back where it began, or not far from it
        top = max(range(i, end), key=lambda k: diff[k])
        if all(diff[k] < diff[top] / 2 for k in range(i, end) if k != top):  # one step holds the change
            if diff[top] > p.threshold or (candidates and diff[top] > p.gradual_change):
                out.append((top, top + 1, top + 1, "cut" if diff[top] > p.threshold else "candidate"))
        else:
            middle = min(range(i + 1, end), key=lambda k: abs(across(i, k) - across(k, end)))
            out.append((i, end, middle, "gradual"))
    return out


@dataclass
class Transition:
    """One scene transition as a row holds it: ``start_s`` and ``end_s`` the frames either side of the change (the
    samples, or for a placed cut the two frames of it), ``frame`` the stream index of the first frame of the new
    scene (``at_s`` its time), ``frame_exact`` whether that is the frame of the change itself."""

    start_s: float
    end_s: float
    kind: str
    frame: int
    at_s: float
    frame_exact: bool
    span: tuple[int, int] = (0, 0)
    """The stream indices of the frames at ``start_s`` and ``end_s``."""

    def row(self) -> dict:
        return {"start_s": self.start_s, "end_s": self.end_s, "kind": self.kind, "frame": self.frame,
                "frame_exact": self.frame_exact}


def _stands_out(d: list[float], floor: float, k: int, ignored: Container[int] = ()) -> bool:
    """Whether step ``k`` of ``d`` is over ``floor`` and its neighbours (but the ``ignored`` ones) change less than
    half as much."""
    return d[k] > floor and all(d[j] < d[k] / 2 for j in (k - 1, k + 1) if 0 <= j < len(d) and j not in ignored)


def cut_steps(hist_steps: list[float], thumb_steps: list[float], p: SceneCutParams) -> list[int]:
    """The steps (``k``: frame k to k+1) where consecutive frames change scene, from each step's histogram distance
    and thumbnail difference (``thumbnails``): a step standing out of its neighbours (they change less than half as
    much) by a histogram distance over ``p.gradual_change`` (the least distance between two scenes) or a thumbnail
    difference over ``p.structure_change`` (a cut that keeps the colours). Between consecutive frames a cut stands
    out: 3 frames of colour bars between two scenes stepped 0.43 and 0.42, the frames around them 0.00; a dissolve,
    a wipe or motion spreads its change over many small steps, and a one-frame flash makes two large steps side by
    side."""
    return [k for k in range(len(hist_steps))
            if _stands_out(hist_steps, p.gradual_change, k) or _stands_out(thumb_steps, p.structure_change, k)]


def structure_candidates(thumb_steps: list[float], found: list[tuple[int, int, int, str]],
                         p: SceneCutParams) -> list[tuple[int, int, int, str]]:
    """``candidate`` transitions where the thumbnails change between two samples by over ``p.structure_change`` and
    over twice the steps either side that are no transition (motion changes them steadily; a cut at once), outside
    the ``found`` ones. A step next to a found one is judged by its other side: a shot of 3 frames holding one
    sample, then a mirrored copy of it, stepped 0.27 and 0.33 (the first a cut found by its colours)."""
    taken = {k for a, b, _, _ in found for k in range(a, b)}
    return [(k, k + 1, k + 1, "candidate") for k in range(len(thumb_steps))
            if k not in taken and _stands_out(thumb_steps, p.structure_change, k, taken)]


PLACING_GROUP_FRAMES = 512
"""Frames decoded at a time to place cuts (at a long side of 192, 512 frames take 32 MB)."""

def placing_budget(p: SceneCutParams, duration_s: float) -> int:
    """Frames that may be decoded to place the cuts of a clip of ``duration_s`` (``max_placing_frames``)."""
    return int(p.max_placing_frames * max(1.0, duration_s / 300.0))


PLACED_FIRST = {"cut": 0, "candidate": 1, "gradual": 2}
"""Which transitions get the frames of ``max_placing_frames`` first: the cuts found, then the candidates, then the
gradual transitions (a shot shorter than two samples reads as one)."""


def place_cuts(found: list[Transition], media: MediaItem, request: AtFps, p: SceneCutParams, device: str,
               duration_s: float) -> list[Transition]:
    """``found`` with the cuts placed at their frames: the frames from the sample before each transition to the
    sample after it are decoded (``media.more_frames``) and compared step by step (``cut_steps``).

    - a ``cut`` becomes the cut(s) there (two for a shot shorter than a sample interval), or where none stands out
      (a quick dissolve), one at the largest step;
    - a ``candidate`` (a step between two samples over ``p.gradual_change`` but under ``p.threshold``: a cut
      between two shots of similar colours, or motion) is a cut where one stands out, else nothing;
    - a ``gradual`` transition is the cuts there where any stands out (a shot shorter than two samples between two
      others), else stays as it is.

    At most ``placing_budget`` frames for the clip's ``duration_s`` (``PLACED_FIRST``), ``PLACING_GROUP_FRAMES`` a
    decode. Where a decode
    fails (``DecodeError``, a timeout included) the transitions not placed stay as found (cuts at the samples'
    times, ``frame_exact`` false; candidates dropped) and a warning is logged: the row loses nothing it had."""
    spans, budget = {}, placing_budget(p, duration_s)
    for k in sorted(range(len(found)), key=lambda k: PLACED_FIRST.get(found[k].kind, 3)):
        t = found[k]
        n = t.span[1] - t.span[0] + 1
        if t.kind in PLACED_FIRST and not t.frame_exact and n <= budget:
            spans[k], budget = range(t.span[0], t.span[1] + 1), budget - n
    groups, size = [[]], 0
    for k in sorted(spans):
        if size and size + len(spans[k]) > PLACING_GROUP_FRAMES:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += len(spans[k])
    placed: dict[int, list[Transition]] = {}
    for group in groups if spans else []:
        wanted = Frames(tuple(i for k in group for i in spans[k]), max_side=request.max_side)
        try:
            more = media.more_frames(wanted)
        except DecodeError as e:
            log.warning("%s: %d transition(s) not placed at their frames: decoding the frames between their samples "
                        "failed: %s", media.item_id, len(spans) - len(placed), e)
            break
        row = {int(i): r for r, i in enumerate(more.indices(wanted))}
        times = more.times(wanted) + more.start_s
        frames = more.view(wanted).to(device)
        hist, thumbs = soft_histograms(frames, p.bins).cpu(), thumbnails(luma(frames, device)).cpu()
        for k in group:
            got = [i for i in spans[k] if i in row]  # a tail found broken drops frames
            if len(got) < 2:
                continue
            rows = [row[i] for i in got]
            d = _hist_distance(hist[rows[1:]], hist[rows[:-1]]).tolist()
            steps = cut_steps(d, thumbnail_steps(thumbs[rows]).tolist(), p)
            if not steps and found[k].kind == "cut":  # the samples differ by a cut: spread over a few frames
                steps = [max(range(len(d)), key=d.__getitem__)]
            if steps or found[k].kind == "candidate":
                placed[k] = [Transition(float(times[rows[j]]), float(times[rows[j + 1]]), "cut", got[j + 1],
                                        float(times[rows[j + 1]]), True, (got[j], got[j + 1])) for j in steps]
    return [t for k, old in enumerate(found) if old.kind != "candidate" or k in placed
            for t in placed.get(k, [old])]


@dataclass
class Samples:
    """What the scene cuts keep of their sampled frames: per frame its stream index, its time on the file's
    timeline, its soft colour histogram (on the CPU) and whether it is black; per step between two, the difference of
    their 32x32 luma thumbnails."""

    indices: list[int]
    at: list[float]
    hist: torch.Tensor
    black: list[bool]
    thumb_steps: list[float]

    @classmethod
    def of(cls, frames: torch.Tensor, indices, at, p: SceneCutParams, device: str,
           before: torch.Tensor | None = None, y: torch.Tensor | None = None) -> tuple[Samples, torch.Tensor]:
        """The samples of ``frames`` (``[N, H, W, 3]`` uint8, at stream ``indices`` and times ``at``), and the
        thumbnail of the last; ``before``: the thumbnail of the sample before the first (a group of a stream), whose
        step to the first is then the first of ``thumb_steps``; ``y``: the frames' luma, where it is at hand."""
        y = luma(frames, device) if y is None else y
        thumbs = thumbnails(y)
        if before is not None:
            thumbs = torch.cat([before.to(thumbs.device), thumbs])
        return cls([int(i) for i in indices], [float(t) for t in at], soft_histograms(frames, p.bins).cpu(),
                   (y.mean(dim=(1, 2)) <= p.black_luma).cpu().tolist(),
                   thumbnail_steps(thumbs).cpu().tolist()), thumbs[-1:]

    def extend(self, more: Samples) -> None:
        self.indices += more.indices
        self.at += more.at
        self.hist = torch.cat([self.hist, more.hist])
        self.black += more.black
        self.thumb_steps += more.thumb_steps


class _SceneCutReading:
    """The scene cuts' reading of a stream: its ``Samples``, the thumbnail step across each group's edge measured
    from the last thumbnail of the group before."""

    def __init__(self, p: SceneCutParams, device: str):
        self.p, self.device = p, device
        self.samples = Samples([], [], torch.zeros(0, 3 * p.bins), [], [])
        self.last: torch.Tensor | None = None

    def feed(self, frames: torch.Tensor, y: torch.Tensor, indices: list[int], at: list[float]) -> None:
        part, self.last = Samples.of(frames, indices, at, self.p, self.device, self.last, y)
        self.samples.extend(part)

    def result(self) -> Samples:
        return self.samples


@dataclass(frozen=True)
class SceneCutReader:
    """The scene cuts' reader of a stream."""

    what: ClassVar[str] = "the scene cuts"
    params: SceneCutParams

    def open(self, device: str) -> _SceneCutReading:
        return _SceneCutReading(self.params, device)


class SceneCutFilter(VideoFilter):
    """Scene transitions from colour-histogram differences, luma thumbnails and black frames, cuts placed at their
    frames: their count, times, frames and spans."""

    weight_free = True
    params_type = SceneCutParams
    output_type = pa.struct([("count", pa.int32()), ("times_s", pa.list_(pa.float64())), ("max_diff", pa.float64()),
                             ("transitions", pa.list_(TRANSITION)), ("sample_fps", pa.float64())])

    def _request(self) -> AtFps:
        return AtFps(self.params.fps, self.params.max_frames, max_side=192, spread=not self.params.stream_long_clips)

    def _stream(self) -> Stream:
        return Stream(self.params.fps, 192, SceneCutReader(self.params))

    def frame_requests(self) -> list:
        return [self._request()] + ([self._stream()] if self.params.stream_long_clips else [])

    def apply_video(self, video, media: MediaItem, ctx: FilterContext) -> dict:
        req = self._request()
        p = self.params
        indices = video.indices(req)
        if read_all_through(video, req):
            s = media.streamed(self._stream(), ctx.device)
        elif len(indices) < 2:
            s = None
        else:
            frames = video.view(req, step=subsample_step(video, req)).to(ctx.device)
            s, _ = Samples.of(frames, indices, video.times(req) + video.start_s, p, ctx.device)
        if s is None or len(s.indices) < 2:
            return {"count": 0, "times_s": [], "max_diff": 0.0, "transitions": [], "sample_fps": 0.0}
        d = _hist_distance(s.hist[1:], s.hist[:-1])
        at, idx, hist = s.at, s.indices, s.hist
        spans = transitions(d.tolist(), s.black, at, lambda i, j: float(_hist_distance(hist[i], hist[j])), p,
                            candidates=p.frame_accurate)
        if p.frame_accurate:
            spans = sorted(spans + structure_candidates(s.thumb_steps, spans, p))
        found = [Transition(at[a], at[b], kind, idx[k], at[k], kind == "cut" and idx[b] - idx[a] == 1,
                            (idx[a], idx[b])) for a, b, k, kind in spans]
        if p.frame_accurate:
            found = place_cuts(found, media, req, p, ctx.device, at[-1] - video.start_s)
        return {"count": len(found), "times_s": [t.at_s for t in found], "max_diff": float(d.max()),
                "transitions": [t.row() for t in found], "sample_fps": sample_rate(at)}
