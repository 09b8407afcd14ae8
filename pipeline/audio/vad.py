"""Silero VAD (the weights its pip package ships), many chunks batched step by step, and segment merging."""

from __future__ import annotations

import threading

import numpy as np
import torch

_IMPORT_LOCK = threading.Lock()


def frame_samples(sample_rate: int) -> int:
    """Samples per VAD frame: 512 at 16 kHz, 256 at 8 kHz."""
    if sample_rate not in (8000, 16000):
        raise ValueError("Silero VAD supports 8000 and 16000 Hz")
    return 512 if sample_rate == 16000 else 256


class SileroVAD:
    """One Silero VAD instance (TorchScript from the silero-vad package; no download).

    The model keeps a recurrent state per batch row, so a batch of chunks runs frame by frame with every row
    independent: row ``b`` gets exactly what a run of chunk ``b`` alone would get.

    Args:
        sample_rate: 16000 or 8000.
        device: ``cpu`` or ``cuda:N``.
    """

    def __init__(self, sample_rate: int = 16000, device: str = "cpu"):
        with _IMPORT_LOCK:
            threads = torch.get_num_threads()
            from silero_vad import load_silero_vad  # importing it sets torch.set_num_threads(1)

            self.model = load_silero_vad()
            torch.set_num_threads(threads)  # restore the configured count
        self.sample_rate = sample_rate
        self.frame = frame_samples(sample_rate)
        self.device = device
        if device != "cpu":
            self.model = self.model.to(device)

    @torch.inference_mode()
    def probs(self, chunks: torch.Tensor, to_cpu: bool = True) -> torch.Tensor:
        """Speech probability per frame for a batch of chunks ``[B, L]`` (L a multiple of the frame): ``[B, L/f]``
        (left on the model's device with ``to_cpu=False``, for callers that order streams themselves)."""
        b, length = chunks.shape
        if length % self.frame:
            raise ValueError(f"chunk length {length} is not a multiple of {self.frame}")
        x = chunks.to(self.device, non_blocking=True)
        self.model.reset_states()
        out = torch.empty(b, length // self.frame, device=x.device)
        for i in range(length // self.frame):
            out[:, i] = self.model(x[:, i * self.frame:(i + 1) * self.frame], self.sample_rate)[:, 0]
        return out.cpu() if to_cpu else out


def whole_file_probs(model: SileroVAD, audio: np.ndarray) -> np.ndarray:
    """Frame probabilities of one file in one pass (the reference the chunked run is compared with)."""
    f = model.frame
    n = int(np.ceil(len(audio) / f))
    padded = np.zeros(n * f, np.float32)
    padded[: len(audio)] = audio
    return model.probs(torch.from_numpy(padded)[None])[0].numpy()


def speech_segments(probs: np.ndarray, n_samples: int, sample_rate: int = 16000, threshold: float = 0.5,
                    min_speech_ms: int = 250, min_silence_ms: int = 100, speech_pad_ms: int = 30) -> list[tuple[float, float]]:
    """Speech segments in seconds from per-frame probabilities, with silero-vad's own state machine
    (``get_speech_timestamps_from_probs``), so whole-file probabilities give exactly ``get_speech_timestamps``."""
    from silero_vad import get_speech_timestamps_from_probs

    stamps = get_speech_timestamps_from_probs(
        [float(p) for p in probs], sampling_rate=sample_rate, threshold=threshold,
        min_speech_duration_ms=min_speech_ms, min_silence_duration_ms=min_silence_ms, speech_pad_ms=speech_pad_ms,
        audio_length_samples=n_samples)
    return [(s["start"] / sample_rate, s["end"] / sample_rate) for s in stamps]


def merge_segments(segments: list[tuple[float, float]], min_gap_s: float = 0.12) -> list[tuple[float, float]]:
    """Union overlapping segments and merge those separated by a gap shorter than ``min_gap_s``."""
    out: list[list[float]] = []
    for start, end in sorted(segments):
        if out and start - out[-1][1] < min_gap_s:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]
