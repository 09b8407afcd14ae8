"""Padding to fixed bucket shapes without changing results: masks, length-aware statistics, clamped gathers.

Shape-specialised backends (TensorRT engines, cuDNN algorithm choices, CUDA graphs) want a few fixed shapes, so
variable-length inputs are padded up to a bucket. Padding is harmless only when nothing that mixes positions
sees the padded ones:

- statistics over time (normalisation, mean pooling) are taken over the valid part only, and the padded part is
  set to zero after normalisation;
- attention fills masked scores before the softmax;
- index tensors come from the input's own shape (``arange(x.shape[d])``), never from a reshaped constant, so an
  exported graph stays correct for every bucket; gathers clamp their long indices to the valid length.

Every function here is exportable to ONNX (opset 17) with dynamic batch and length axes.
"""

from __future__ import annotations

import torch


def bucket_for(n: int, buckets: tuple[int, ...] | list[int]) -> int:
    """The smallest bucket that holds ``n`` (``n`` itself when it is larger than every bucket)."""
    for b in sorted(buckets):
        if b >= n:
            return b
    return n


def valid_mask(x: torch.Tensor, lengths: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``[B, x.shape[dim]]`` bool, True where the position is below the row's length.

    The positions come from ``x``'s own shape, so a traced or exported graph follows the input's length.
    """
    positions = torch.arange(x.shape[dim], device=x.device)
    return positions[None, :] < lengths.to(x.device)[:, None]


def pad_to_bucket(x: torch.Tensor, buckets: tuple[int, ...] | list[int], dim: int = 1,
                  value: float = 0.0) -> tuple[torch.Tensor, int]:
    """Pad ``x`` along ``dim`` to its bucket; returns the padded tensor and the original length."""
    n = x.shape[dim]
    b = bucket_for(n, buckets)
    if b == n:
        return x, n
    shape = list(x.shape)
    shape[dim] = b - n
    return torch.cat([x, x.new_full(shape, value)], dim=dim), n


def masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over dim 1 of ``[B, N, ...]`` counting valid positions only (``valid``: ``[B, N]`` bool)."""
    w = valid.to(x.dtype).reshape(*valid.shape, *([1] * (x.dim() - 2)))
    return (x * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)


def length_normalise(x: torch.Tensor, valid: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Zero mean, unit variance over dim 1 of ``[B, N, ...]`` with statistics of the valid positions only; the
    padded positions are zero afterwards (so they carry nothing into later layers)."""
    w = valid.to(x.dtype).reshape(*valid.shape, *([1] * (x.dim() - 2)))
    count = w.sum(dim=1, keepdim=True).clamp_min(1.0)
    mean = (x * w).sum(dim=1, keepdim=True) / count
    var = (((x - mean) * w) ** 2).sum(dim=1, keepdim=True) / count
    return (x - mean) / torch.sqrt(var + eps) * w


def masked_softmax_scores(scores: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Attention weights of ``[B, H, Lq, N]`` scores with invalid keys filled before the softmax.

    The fill is the dtype's most negative finite value, not -inf: a row with no valid key then gives uniform
    weights instead of NaN (callers never pass one, but an exported graph must not produce NaN on it).
    """
    if valid is not None:
        scores = scores.masked_fill(~valid[:, None, None, :], torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1)


def gather_clamped(x: torch.Tensor, index: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, k]]`` for ``[B, N, D]`` ``x`` and ``[B, K]`` indices, each clamped to ``[0, length_b - 1]``
    (long indices, so an exported gather never reads a padded or out-of-range row)."""
    hi = (lengths.to(torch.long) - 1).clamp_min(0)[:, None]
    idx = torch.minimum(index.to(torch.long).clamp_min(0), hi)
    return torch.gather(x, 1, idx[:, :, None].expand(-1, -1, x.shape[2]))
