"""Frames to model input on the device: uint8 in, resized, normalised and (on GPU) FP16 out, in batches."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


GROUP_BYTES = 256 << 20
"""Transient copies of source-size frames (float conversions, uint8 stacks) are made this many bytes at a time:
48 frames of 4K are 4.8 GB as float."""


def per_group(item_bytes: int, budget: int | None = None) -> int:
    """How many items of ``item_bytes`` one group holds under ``budget`` (default ``GROUP_BYTES``); at least one."""
    return max(1, (GROUP_BYTES if budget is None else budget) // max(1, item_bytes))


class ClipViews(Sequence):
    """``n`` clips made when asked for, ``get(i)`` the ``i``-th (``[T, H, W, 3]`` uint8: a window's frames, gathered
    out of the decoded frames, which copies them), so that a filter with many windows holds a few of them at a
    time: 64 windows of 48 frames at 455x256 are 1.1 GB copied at once."""

    def __init__(self, get: Callable[[int], torch.Tensor], n: int):
        self._get = get
        self._n = n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._get(j) for j in range(*i.indices(self._n))]
        if not -self._n <= i < self._n:
            raise IndexError(i)
        return self._get(i % self._n)


def luma(frames: torch.Tensor, device: str) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` RGB (any strides: a strided view is read in place) -> float32 ``[N, H, W]`` luma in
    0..255 (BT.601 weights) on ``device``. Moved to ``device`` a group of frames at a time."""
    out = torch.empty(frames.shape[:3], dtype=torch.float32, device=device)
    group = per_group(frames[:1].numel())
    for i in range(0, frames.shape[0], group):
        luma_into(out[i:i + group], frames[i:i + group].to(device, non_blocking=True))
    return out


def luma_into(out: torch.Tensor, rgb: torch.Tensor) -> None:
    """BT.601 luma of uint8 RGB ``[..., 3]`` written into float32 ``out`` (on its device). Accumulated in place, one
    channel at a time: a float copy of all three channels, then three products and two sums, took 2.5x as long."""
    out.copy_(rgb[..., 0])
    out.mul_(0.299)
    out.add_(rgb[..., 1], alpha=0.587)
    out.add_(rgb[..., 2], alpha=0.114)


def clips_to_input(frames: torch.Tensor, size: int, mean: list[float], std: list[float], device: str,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 clips ``[B, T, H, W, 3]`` -> normalised ``[B, T, 3, size, size]`` on ``device``.

    The uint8 tensor is moved first (4x fewer bytes than float), then, a group of frames at a time (so the float
    copy at source size stays under ``GROUP_BYTES``), the short side is resized to ``size`` (antialiased) and the
    centre cropped square.
    """
    b, t, h, w, _ = frames.shape
    src = frames.to(device, non_blocking=True).reshape(b * t, h, w, 3)
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    top, left = (nh - size) // 2, (nw - size) // 2
    m = torch.tensor(mean, device=src.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=src.device).view(1, 3, 1, 1)
    out = torch.empty(b * t, 3, size, size, dtype=dtype, device=src.device)
    group = per_group(h * w * 3 * 4)
    for i in range(0, b * t, group):
        x = src[i:i + group].permute(0, 3, 1, 2).float()
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        x = x[:, :, top:top + size, left:left + size] / 255.0
        out[i:i + group] = ((x - m) / s).to(dtype)
    return out.reshape(b, t, 3, size, size)
