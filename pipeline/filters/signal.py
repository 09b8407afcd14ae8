"""Weight-free signal filters in torch on the rank's device: black borders, static, exposure, sharpness, cuts.

Each works on frames the item decodes once (uint8 RGB), has its thresholds in config, and writes scores and a
label. Pixel outputs are in source pixels even when decoding downscaled.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import torch
import torch.nn.functional as F

from pipeline.filters.base import FilterContext, VideoFilter
from pipeline.media.item import MediaItem
from pipeline.video.preprocess import per_group
from pipeline.video.sampling import AtFps, Uniform

BOX = pa.struct([("x", pa.int32()), ("y", pa.int32()), ("w", pa.int32()), ("h", pa.int32())])


def luma(frames: torch.Tensor, device: str) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` RGB -> float32 ``[N, H, W]`` luma in 0..255 (BT.601 weights) on ``device``."""
    group = per_group(frames[:1].numel() * 4)  # float RGB: 64 frames of 4K would be 6 GB at once
    if frames.shape[0] <= group:  # the usual case: one pass, no copy into an output buffer
        return _luma(frames.to(device, non_blocking=True).float())
    out = torch.empty(frames.shape[:3], dtype=torch.float32, device=device)
    for i in range(0, frames.shape[0], group):
        out[i:i + group] = _luma(frames[i:i + group].to(device, non_blocking=True).float())
    return out


def _luma(f: torch.Tensor) -> torch.Tensor:
    return f[..., 0] * 0.299 + f[..., 1] * 0.587 + f[..., 2] * 0.114


def frames_content_box(frames: torch.Tensor, device: str, threshold: float,
                       min_fraction: float) -> tuple[int, int, int, int]:
    """``content_box`` of uint8 RGB frames: rows measured on every 4th column and columns on every 4th row, so each
    axis keeps its full resolution for a quarter of the pixels each."""
    return content_box(luma(frames[:, :, ::4], device), threshold, min_fraction, luma(frames[:, ::4, :], device))


def subsample(frames: torch.Tensor, max_side: int = 256) -> torch.Tensor:
    """A strided view of ``[N, H, W, C]`` frames with the long side near ``max_side`` (no copy, no filtering):
    enough for statistics that do not need pixel accuracy, and much cheaper than converting full frames."""
    step = max(1, max(frames.shape[1], frames.shape[2]) // max_side)
    return frames[:, ::step, ::step]


def content_box(y: torch.Tensor, threshold: float, min_fraction: float,
                y_cols: torch.Tensor | None = None) -> tuple[int, int, int, int]:
    """The box ``(x, y, w, h)`` outside which every sampled frame is black.

    A row (column) is black when, in every frame, fewer than ``min_fraction`` of its pixels exceed ``threshold``
    luma; the fraction (not the max) keeps compression noise at a bar's edge from counting as content. Rows are
    measured on ``y``; columns on ``y_cols`` when given (a view subsampled along the other axis keeps each axis at
    full resolution for a quarter of the work).
    """
    rows = (y > threshold).float().mean(dim=2).amax(dim=0)  # [H]
    cols = ((y if y_cols is None else y_cols) > threshold).float().mean(dim=1).amax(dim=0)  # [W]
    r = torch.nonzero(rows >= min_fraction).flatten()
    c = torch.nonzero(cols >= min_fraction).flatten()
    h, w = rows.shape[0], cols.shape[0]
    if len(r) == 0 or len(c) == 0:  # an all-black clip: no content to crop to
        return 0, 0, w, h
    top, bottom = int(r[0]), int(r[-1]) + 1
    left, right = int(c[0]), int(c[-1]) + 1
    return left, top, right - left, bottom - top


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


class BlackBorderFilter(VideoFilter):
    """Letterbox and pillarbox detection, giving the crop box of the content in source pixels."""

    weight_free = True
    params_type = BlackBorderParams
    output_type = pa.struct([("crop", BOX), ("top", pa.int32()), ("bottom", pa.int32()), ("left", pa.int32()),
                             ("right", pa.int32()), ("letterbox", pa.bool_()), ("pillarbox", pa.bool_())])

    def frame_requests(self) -> list:
        return [Uniform(self.params.frames)]

    def apply_video(self, video, media: MediaItem, ctx: FilterContext) -> dict:
        frames = video.view(Uniform(self.params.frames))
        x0, y0, w, h = frames_content_box(frames, ctx.device, self.params.threshold, self.params.min_fraction)
        sx, sy = video.scale
        W, H = video.meta.width, video.meta.height
        crop = {"x": round(x0 * sx), "y": round(y0 * sy), "w": round(w * sx), "h": round(h * sy)}
        crop["w"], crop["h"] = min(crop["w"], W - crop["x"]), min(crop["h"], H - crop["y"])
        top, left = crop["y"], crop["x"]
        bottom, right = H - crop["y"] - crop["h"], W - crop["x"] - crop["w"]
        p = self.params.min_bar_fraction
        return {"crop": crop, "top": top, "bottom": bottom, "left": left, "right": right,
                "letterbox": min(top, bottom) > p * H, "pillarbox": min(left, right) > p * W}


@dataclass(frozen=True)
class StaticParams:
    fps: float = 4.0
    """Frames per second sampled for frame differences."""
    max_frames: int = 240
    """At most this many frames."""
    threshold: float = 0.004
    """Mean absolute luma difference (0-1) between sampled frames below which a span is static."""
    window_s: float = 2.0
    """Window length of the per-window motion scores."""


class StaticFilter(VideoFilter):
    """Frame-difference energy over the clip and per window; a still image (with or without sound) is static."""

    weight_free = True
    params_type = StaticParams
    output_type = pa.struct([
        ("motion", pa.float64()), ("static", pa.bool_()), ("static_ratio", pa.float64()),
        ("windows", pa.list_(pa.struct([("start_s", pa.float64()), ("end_s", pa.float64()),
                                        ("motion", pa.float64()), ("static", pa.bool_())]))),
    ])

    def _request(self) -> AtFps:
        return AtFps(self.params.fps, self.params.max_frames)

    def frame_requests(self) -> list:
        return [self._request()]

    def apply_video(self, video, media: MediaItem, ctx: FilterContext) -> dict:
        req = self._request()
        y = luma(subsample(video.view(req), 256), ctx.device)
        times = video.times(req)
        small = F.interpolate(y[:, None], size=(64, 64), mode="area")[:, 0] / 255.0  # noise-robust, size-free
        if small.shape[0] < 2:
            return {"motion": 0.0, "static": True, "static_ratio": 1.0, "windows": []}
        diffs = (small[1:] - small[:-1]).abs().mean(dim=(1, 2)).cpu().numpy()
        thr = self.params.threshold
        windows = []
        t_end = times[-1]
        start = 0.0
        while start <= t_end - 1e-9 or not windows:
            end = start + self.params.window_s
            sel = [(times[i] >= start) & (times[i + 1] <= end + 1e-9) for i in range(len(diffs))]
            vals = diffs[sel] if any(sel) else diffs[:1]
            m = float(vals.mean())
            windows.append({"start_s": start + video.start_s, "end_s": min(end, float(t_end)) + video.start_s,
                            "motion": m, "static": m < thr})
            start = end
            if start > t_end:
                break
        motion = float(diffs.mean())
        return {"motion": motion, "static": motion < thr,
                "static_ratio": sum(w["static"] for w in windows) / len(windows), "windows": windows}


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
        y = luma(subsample(video.view(Uniform(self.params.frames)), 512), ctx.device)
        x0, y0, w, h = content_box(y, 24.0, 0.02)
        if w * h < 0.05 * y.shape[1] * y.shape[2]:  # (nearly) all black: measure the whole frame
            x0, y0, w, h = 0, 0, y.shape[2], y.shape[1]
        inner = y[:, y0:y0 + h, x0:x0 + w] / 255.0
        mean = float(inner.mean())
        label = "dark" if mean < self.params.dark_threshold else "bright" if mean > self.params.bright_threshold else "ok"
        return {"mean_luma": mean, "dark_fraction": float((inner < 16 / 255).float().mean()),
                "bright_fraction": float((inner > 235 / 255).float().mean()), "label": label}


@dataclass(frozen=True)
class SharpnessParams:
    frames: int = 8
    analysis_short_side: int = 360
    """Frames are resized to this short side first, so the score does not depend on resolution."""
    blur_threshold: float = 60.0
    """Variance of the Laplacian below which the clip is blurry (low quality)."""


_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


class SharpnessFilter(VideoFilter):
    """Blur measure: variance of the Laplacian of luma, averaged over frames."""

    weight_free = True
    params_type = SharpnessParams
    output_type = pa.struct([("laplacian_var", pa.float64()), ("blurry", pa.bool_())])

    def frame_requests(self) -> list:
        return [Uniform(self.params.frames)]

    def apply_video(self, video, media: MediaItem, ctx: FilterContext) -> dict:
        y = luma(video.view(Uniform(self.params.frames)), ctx.device)[:, None]
        h, w = y.shape[-2:]
        s = self.params.analysis_short_side / min(h, w)
        if abs(s - 1.0) > 1e-3:
            y = F.interpolate(y, size=(max(3, round(h * s)), max(3, round(w * s))), mode="area")
        lap = F.conv2d(y, _LAPLACIAN.to(y.device)[None, None])
        var = float(lap.var(dim=(1, 2, 3)).mean())
        return {"laplacian_var": var, "blurry": var < self.params.blur_threshold}


@dataclass(frozen=True)
class SceneCutParams:
    fps: float = 4.0
    """Frames per second compared."""
    max_frames: int = 480
    bins: int = 16
    """Histogram bins per RGB channel."""
    threshold: float = 0.45
    """Half the L1 distance (0-1) between consecutive frames' colour histograms above which a cut is declared."""


class SceneCutFilter(VideoFilter):
    """Histogram-difference scene cuts: their count and times."""

    weight_free = True
    params_type = SceneCutParams
    output_type = pa.struct([("count", pa.int32()), ("times_s", pa.list_(pa.float64())), ("max_diff", pa.float64())])

    def _request(self) -> AtFps:
        return AtFps(self.params.fps, self.params.max_frames)

    def frame_requests(self) -> list:
        return [self._request()]

    def apply_video(self, video, media: MediaItem, ctx: FilterContext) -> dict:
        req = self._request()
        frames = subsample(video.view(req), 192).to(ctx.device)
        times = video.times(req)
        if frames.shape[0] < 2:
            return {"count": 0, "times_s": [], "max_diff": 0.0}
        b = self.params.bins
        q = (frames.long() * b) // 256  # [N, H, W, 3] bin per channel
        n, npx = q.shape[0], q.shape[1] * q.shape[2]
        offsets = torch.arange(3, device=q.device) * b
        flat = (q + offsets).reshape(n, -1)
        hist = torch.zeros(n, 3 * b, device=q.device).scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float32))
        hist = hist / (3 * npx)
        d = 0.5 * (hist[1:] - hist[:-1]).abs().sum(dim=1)
        cuts = torch.nonzero(d > self.params.threshold).flatten().cpu().tolist()
        # a cut between sampled frames i and i+1 is placed at frame i+1's time
        return {"count": len(cuts), "times_s": [float(times[i + 1]) + video.start_s for i in cuts],
                "max_diff": float(d.max())}
