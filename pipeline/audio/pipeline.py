"""The audio pipeline per item: decode, chunk, batched VAD, STFT cache, cut points; chunking-independent results.

The same code runs the reference: ``chunked=False`` is one chunk over the whole file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from pipeline.audio.cuts import Cut, CutParams, cut_points, pieces
from pipeline.audio.features import FeatureCache, chunked_stft, stitch_frames
from pipeline.audio.schedule import ChunkPlan, chunk_schedule
from pipeline.audio.vad import frame_samples, merge_segments, speech_segments


@dataclass(frozen=True)
class GpuPipelineParams:
    """The users' ``gpu_pipeline:`` block."""

    enable: bool = True
    """Chunked, batched pipeline (False: one chunk over the whole file, the reference behaviour)."""
    chunk_seconds: float = 10.0
    overlap_seconds: float = 2.5
    halo_seconds: float = 0.5
    align_hop: int = 4096
    """Boundaries are multiples of this many samples (a multiple of the VAD frame and the STFT hop)."""
    batch_chunks: int = 128
    """Chunks (of one file and of several) per VAD batch."""


@dataclass(frozen=True)
class AudioParams:
    sample_rate: int = 16000
    """16000, or 8000 where asked (Silero VAD supports both)."""
    max_seconds: float = 4 * 3600.0
    """Longer audio fails the item (a cap a hostile file cannot pass)."""
    threshold: float = 0.5
    min_speech_ms: int = 250
    min_silence_ms: int = 100
    speech_pad_ms: int = 30
    merge_gap_ms: int = 120
    """Speech segments closer than this are merged."""
    n_fft: int = 1024
    stft_hop: int = 256
    cuts: CutParams = field(default_factory=CutParams)
    gpu_pipeline: GpuPipelineParams = field(default_factory=GpuPipelineParams)


@dataclass
class AudioResult:
    duration_s: float
    speech: list[tuple[float, float]]
    cuts: list[Cut]
    probs: np.ndarray
    features: FeatureCache
    plans: list[ChunkPlan]

    @property
    def speech_ratio(self) -> float:
        return sum(e - s for s, e in self.speech) / self.duration_s if self.duration_s > 0 else 0.0

    def pieces(self) -> list[tuple[float, float]]:
        return pieces(self.cuts, self.duration_s)


def _plans(n: int, p: AudioParams, chunked: bool) -> list[ChunkPlan]:
    g = p.gpu_pipeline
    hop = math.lcm(g.align_hop, frame_samples(p.sample_rate), p.stft_hop)
    if not (chunked and g.enable):  # one chunk covering the file (the reference)
        length = int(math.ceil(max(n, 1) / hop)) * hop + hop
        return [ChunkPlan(0, 0, length, 0, n)]
    return chunk_schedule(n / p.sample_rate, g.chunk_seconds, g.overlap_seconds, g.halo_seconds, hop, p.sample_rate)


def chunk_tensor(audio: np.ndarray, plans: list[ChunkPlan]) -> torch.Tensor:
    """``[C, L]`` chunk audio, zeros where a chunk runs past the file."""
    length = plans[0].length
    out = torch.zeros(len(plans), length)
    src = torch.from_numpy(audio)
    for i, p in enumerate(plans):
        piece = src[p.start:p.start + length]
        out[i, :len(piece)] = piece
    return out


def run_audio(audios: list[np.ndarray], params: AudioParams, vad_batch: Callable[[torch.Tensor], torch.Tensor],
              chunked: bool = True, device: str = "cpu") -> list[AudioResult]:
    """Run the pipeline on several files at once: all their chunks go through the VAD in shared batches.

    Args:
        audios: mono float32 waveforms at ``params.sample_rate``.
        params: pipeline settings.
        vad_batch: ``[B, L] -> [B, L / frame]`` speech probabilities (a ``SileroVAD.probs``, or a batcher over it).
        chunked: False runs each file as one chunk (the whole-file reference).
        device: where the STFT runs.

    Returns:
        One result per file, in the global time base of that file.
    """
    sr, f = params.sample_rate, frame_samples(params.sample_rate)
    plans = [_plans(len(a), params, chunked) for a in audios]
    results = []
    # Chunks of equal length from every file share VAD batches (whole-file chunks differ per file).
    groups: dict[int, list[tuple[int, int]]] = {}
    tensors = [chunk_tensor(a, p) if p else None for a, p in zip(audios, plans)]
    for fi, p in enumerate(plans):
        for ci in range(len(p)):
            groups.setdefault(p[ci].length, []).append((fi, ci))
    probs_by_chunk: dict[tuple[int, int], torch.Tensor] = {}
    step = params.gpu_pipeline.batch_chunks
    for _length, members in groups.items():
        for s in range(0, len(members), step):
            batch = members[s:s + step]
            out = vad_batch(torch.stack([tensors[fi][ci] for fi, ci in batch]))
            for (fi, ci), row in zip(batch, out):
                probs_by_chunk[(fi, ci)] = row
    for fi, audio in enumerate(audios):
        n = len(audio)
        if n == 0:
            raise ValueError("empty audio")
        p = plans[fi]
        chunk_probs = torch.stack([probs_by_chunk[(fi, ci)] for ci in range(len(p))])
        probs = stitch_frames(chunk_probs, p, f, int(math.ceil(n / f)))
        feats = FeatureCache(chunked_stft(audio, p, params.n_fft, params.stft_hop, device), params.stft_hop, sr)
        speech = merge_segments(speech_segments(probs, n, sr, params.threshold, params.min_speech_ms,
                                                params.min_silence_ms, params.speech_pad_ms),
                                params.merge_gap_ms / 1000.0)
        times = feats.frame_times()
        # speech probability at each feature frame (VAD frames are 2x the STFT hop at the defaults)
        idx = np.minimum((times * sr / f).astype(int), len(probs) - 1)
        cuts = cut_points(audio, sr, speech, times, probs[idx], feats.log_energy(), params.cuts)
        results.append(AudioResult(n / sr, speech, cuts, probs, feats, p))
    return results
