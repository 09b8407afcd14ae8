"""Frames to model input on the device: uint8 in, resized, normalised and (on GPU) FP16 out, in batches."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clips_to_input(frames: torch.Tensor, size: int, mean: list[float], std: list[float], device: str,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 clips ``[B, T, H, W, 3]`` -> normalised ``[B, T, 3, size, size]`` on ``device``.

    The uint8 tensor is moved first (4x fewer bytes than float), then the short side is resized to ``size``
    (antialiased) and the centre cropped square.
    """
    b, t, h, w, _ = frames.shape
    x = frames.to(device, non_blocking=True).reshape(b * t, h, w, 3).permute(0, 3, 1, 2).float()
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[:, :, top:top + size, left:left + size] / 255.0
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    x = ((x - m) / s).to(dtype)
    return x.reshape(b, t, 3, size, size)
