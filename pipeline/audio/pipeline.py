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
from pipeline.audio.features import FeatureCache, chunked_stft, n_frames, stft_magnitude, stitch_frames
from pipeline.audio.schedule import ChunkPlan, causal_length, chunk_schedule
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
    use_cuda_streams: bool = False
    """On GPU: host-to-device copies, VAD and features on their own CUDA streams, ordered by events. Off by
    default: on an H100 it measured slower than the plain GPU path (the VAD loop is bound by kernel launches on
    the one host thread, and the stream path moves whole-chunk spectra to the host); see bench_vad.py."""
    prefetch_pinned_buffers: bool = True
    """On GPU: stage chunk audio in a ring of pinned host buffers (asynchronous copies)."""
    inflight_chunks_limit: int = 2
    """On GPU: chunk batches on the device at once (bounds device memory)."""


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


def vad_length(plans: list[ChunkPlan], p: AudioParams, chunked: bool, margin: int = 0) -> int:
    """Samples of each chunk the VAD reads: the VAD is causal, so chunked runs stop at the furthest valid end
    (``causal_length``) plus ``margin`` (an STFT window, where the features come from the same chunks)."""
    g = p.gpu_pipeline
    if not (chunked and g.enable):
        return plans[0].length
    hop = math.lcm(g.align_hop, frame_samples(p.sample_rate), p.stft_hop)
    need = causal_length(g.chunk_seconds, g.overlap_seconds, g.halo_seconds, hop, p.sample_rate) + margin
    return min(plans[0].length, -(-need // hop) * hop)


def chunk_tensor(audio: np.ndarray, plans: list[ChunkPlan], length: int | None = None) -> torch.Tensor:
    """``[C, length]`` chunk audio from each chunk's start (default: the plan length), zeros past the file."""
    length = length or plans[0].length
    out = torch.empty(len(plans), length)
    src = torch.from_numpy(audio)
    for i, p in enumerate(plans):
        piece = src[p.start:p.start + length]
        out[i, :len(piece)] = piece
        out[i, len(piece):] = 0.0
    return out


def gpu_stages(batches: list[torch.Tensor], vad, n_fft: int, hop: int, device: str, inflight: int = 2,
               pinned: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """VAD probabilities and STFT magnitudes of chunk batches on a GPU, the stages on their own CUDA streams.

    Each batch is staged in a ring of ``inflight`` pinned host buffers, copied on a copy stream, and the VAD and
    feature streams wait on the copy's event (no implicit synchronisation); at most ``inflight`` batches live on
    the device at once. Returns ``(probs [B, L/frame], magnitudes [B, frames, bins])`` on the host per batch.
    """
    dev = torch.device(device)
    copy_s, vad_s, feat_s = (torch.cuda.Stream(dev) for _ in range(3))
    ring: list[torch.Tensor | None] = [None] * inflight
    ring_free: list[torch.cuda.Event | None] = [None] * inflight
    pending: list[tuple] = []
    results: list = [None] * len(batches)

    def finish(entry) -> None:
        i, probs, mags, done_vad, done_feat = entry
        done_vad.synchronize()
        done_feat.synchronize()  # the magnitudes' copy to the host was queued on the feature stream
        results[i] = (probs.cpu(), mags)

    for i, batch in enumerate(batches):
        while len(pending) >= inflight:  # bound device memory
            finish(pending.pop(0))
        k = i % inflight
        if pinned:
            if ring_free[k] is not None:
                ring_free[k].synchronize()  # the last copy out of this slot has finished
            if ring[k] is None or ring[k].numel() < batch.numel():
                ring[k] = torch.empty(batch.numel(), pin_memory=True)
            host = ring[k][: batch.numel()].view_as(batch)
            host.copy_(batch)
        else:
            host = batch
        with torch.cuda.stream(copy_s):
            gpu = host.to(dev, non_blocking=pinned)
            copied = torch.cuda.Event()
            copied.record(copy_s)
        ring_free[k] = copied
        vad_s.wait_event(copied)
        feat_s.wait_event(copied)
        # features first: a few large kernels that run while this thread launches the VAD's many small steps
        with torch.cuda.stream(feat_s):
            mags = stft_magnitude(gpu, n_fft, hop).to("cpu", non_blocking=pinned)
            done_feat = torch.cuda.Event()
            done_feat.record(feat_s)
        with torch.cuda.stream(vad_s):
            probs = vad.probs(gpu, to_cpu=False)
            done_vad = torch.cuda.Event()
            done_vad.record(vad_s)
        gpu.record_stream(vad_s)  # the allocator must not reuse the input before both streams are done with it
        gpu.record_stream(feat_s)
        pending.append((i, probs, mags, done_vad, done_feat))
    for entry in pending:
        finish(entry)
    return results


def _batch(tensors: list[torch.Tensor | None], members: list[tuple[int, int]]) -> torch.Tensor:
    """The chunks of one VAD batch: a view when they are consecutive chunks of one file (no copy), else stacked."""
    fi, c0 = members[0]
    if all(f == fi and c == c0 + k for k, (f, c) in enumerate(members)):
        return tensors[fi][c0:c0 + len(members)]
    return torch.stack([tensors[f][c] for f, c in members])


def run_audio(audios: list[np.ndarray], params: AudioParams, vad_batch: Callable[[torch.Tensor], torch.Tensor],
              chunked: bool = True, device: str = "cpu", vad=None) -> list[AudioResult]:
    """Run the pipeline on several files at once: all their chunks go through the VAD in shared batches.

    Args:
        audios: mono float32 waveforms at ``params.sample_rate``.
        params: pipeline settings.
        vad_batch: ``[B, L] -> [B, L / frame]`` speech probabilities (a ``SileroVAD.probs``, or a batcher over it).
        chunked: False runs each file as one chunk (the whole-file reference).
        device: where the STFT runs.
        vad: the ``SileroVAD`` itself; on a GPU with ``use_cuda_streams`` the stages then run on CUDA streams
            (``gpu_stages``) instead of through ``vad_batch``.

    Returns:
        One result per file, in the global time base of that file.
    """
    sr, f = params.sample_rate, frame_samples(params.sample_rate)
    plans = [_plans(len(a), params, chunked) for a in audios]
    results = []
    # Chunks of equal length from every file share VAD batches (whole-file chunks differ per file).
    groups: dict[int, list[tuple[int, int]]] = {}
    g = params.gpu_pipeline
    streams = vad is not None and device.startswith("cuda") and g.use_cuda_streams
    lengths = [vad_length(p, params, chunked, params.n_fft if streams else 0) if p else 0 for p in plans]
    tensors = [chunk_tensor(a, p, n) if p else None for a, p, n in zip(audios, plans, lengths)]
    for fi, p in enumerate(plans):
        for ci in range(len(p)):
            groups.setdefault(lengths[fi], []).append((fi, ci))
    probs_by_chunk: dict[tuple[int, int], torch.Tensor] = {}
    mags_by_chunk: dict[tuple[int, int], torch.Tensor] = {}
    batches = [members[s:s + g.batch_chunks] for members in groups.values()
               for s in range(0, len(members), g.batch_chunks)]
    if streams:
        outs = gpu_stages([_batch(tensors, b) for b in batches], vad, params.n_fft,
                          params.stft_hop, device, g.inflight_chunks_limit, g.prefetch_pinned_buffers)
        for b, (probs, mags) in zip(batches, outs, strict=True):
            for (fi, ci), prow, mrow in zip(b, probs, mags, strict=True):
                probs_by_chunk[(fi, ci)] = prow
                mags_by_chunk[(fi, ci)] = mrow
    else:
        for b in batches:
            out = vad_batch(_batch(tensors, b))
            for (fi, ci), row in zip(b, out, strict=True):
                probs_by_chunk[(fi, ci)] = row
    del tensors  # the chunks' copies of the audio (1.4x it) before the features are made: an hour is 0.3 GB
    for fi, audio in enumerate(audios):
        n = len(audio)
        if n == 0:
            raise ValueError("empty audio")
        p = plans[fi]
        chunk_probs = [probs_by_chunk[(fi, ci)] for ci in range(len(p))]
        probs = stitch_frames(chunk_probs, p, f, int(math.ceil(n / f)))
        if streams:  # whole-chunk magnitudes from the feature stream, valid frames stitched
            mags = [mags_by_chunk[(fi, ci)] for ci in range(len(p))]
            feats = FeatureCache(stitch_frames(mags, p, params.stft_hop, n_frames(n, params.n_fft, params.stft_hop)),
                                 params.stft_hop, sr)
        else:
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
