"""STFT feature cache: one STFT per chunk with one window and hop, valid frames only, stitched per file."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.audio.schedule import ChunkPlan


def n_frames(n_samples: int, n_fft: int, hop: int) -> int:
    """Frames of a non-centred STFT over the whole file (the last frame ends inside the file)."""
    return 0 if n_samples < n_fft else 1 + (n_samples - n_fft) // hop


def stft_magnitude(x: torch.Tensor, n_fft: int, hop: int, out: np.ndarray | None = None) -> torch.Tensor:
    """``[B, L]`` -> magnitudes ``[B, frames, n_fft // 2 + 1]`` (Hann window, not centred).

    With ``out`` (``[frames, bins]`` float32, ``B == 1``) the magnitudes are written there as well; on the CPU
    straight from the complex spectrum, in one pass with no transposed copy.
    """
    window = torch.hann_window(n_fft, device=x.device)
    spec = torch.stft(x, n_fft, hop, window=window, center=False, return_complex=True)
    if spec.is_cuda:
        mag = spec.abs().transpose(1, 2)
        if out is not None:
            out[...] = mag[0].cpu().numpy()
        return mag
    # numpy's complex abs is ~6x torch's on CPU (and ~12x a real/imag view with pow and sum)
    if out is not None:
        np.abs(spec.numpy()[0].T, out=out)
        return torch.from_numpy(out)[None]
    return torch.from_numpy(np.abs(spec.numpy())).transpose(1, 2)


def valid_frames(plan: ChunkPlan, hop: int, total: int) -> tuple[int, int]:
    """Frames ``[first, last)`` whose first sample lies in the chunk's valid region (each frame in one chunk)."""
    return -(-plan.valid_start // hop), min(total, -(-plan.valid_end // hop))


def chunked_stft(audio: np.ndarray, plans: list[ChunkPlan], n_fft: int, hop: int, device: str = "cpu") -> np.ndarray:
    """The file's STFT magnitudes computed chunk by chunk, each chunk only over its valid frames (every frame
    once), stitched in the global frame index. Equal to the whole-file STFT up to float rounding."""
    total = n_frames(len(audio), n_fft, hop)
    out = np.zeros((total, n_fft // 2 + 1), np.float32)
    src = torch.from_numpy(audio)
    for plan in plans:
        first, last = valid_frames(plan, hop, total)
        if last <= first:
            continue
        piece = src[first * hop:(last - 1) * hop + n_fft].to(device)
        stft_magnitude(piece[None], n_fft, hop, out=out[first:last])  # into the frame-major cache
    return out


class FeatureCache:
    """Stitched STFT magnitudes of one file, frame ``f`` covering samples ``[f*hop, f*hop + n_fft)``."""

    def __init__(self, magnitudes: np.ndarray, hop: int, sample_rate: int):
        self.mag = magnitudes
        self.hop = hop
        self.sample_rate = sample_rate
        self._log_energy: np.ndarray | None = None

    def frame_times(self) -> np.ndarray:
        return np.arange(len(self.mag)) * self.hop / self.sample_rate

    def get_window(self, t: float, w_s: float) -> np.ndarray:
        """Frames whose start lies within ``w_s / 2`` seconds of ``t``."""
        a = max(0, int(np.ceil((t - w_s / 2) * self.sample_rate / self.hop)))
        b = min(len(self.mag), int(np.floor((t + w_s / 2) * self.sample_rate / self.hop)) + 1)
        return self.mag[a:b]

    def log_energy(self) -> np.ndarray:
        """Per-frame energy in dB (computed once)."""
        if self._log_energy is None:
            self._log_energy = 10.0 * np.log10(np.einsum("ij,ij->i", self.mag, self.mag) + 1e-10)
        return self._log_energy


def stitch_frames(chunk_values, plans: list[ChunkPlan], hop: int, total: int) -> np.ndarray:
    """Stitch per-chunk frame values (``[C, frames, ...]``, or a list of ``[frames, ...]`` tensors, one per chunk,
    so callers need not stack them) into the file's ``total`` frames: frame ``f`` comes from the chunk whose valid
    region holds its first sample ``f * hop``."""
    out = np.zeros((total, *chunk_values[0].shape[1:]), np.float32)
    for c, plan in enumerate(plans):
        first, last = valid_frames(plan, hop, total)
        if last <= first:
            continue
        offset = plan.start // hop
        out[first:last] = chunk_values[c][first - offset:last - offset].numpy()
    return out
