"""The chunk schedule: chunks whose valid regions tile the file exactly, aligned to a common hop.

Every boundary is a multiple of ``align_hop`` samples, and the hop is a multiple of the VAD frame (512) and of
the STFT hop (256), so a chunk's frames are the whole file's frames: results are written only inside each chunk's
valid region, and stitched they cover every frame once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ChunkPlan:
    """One chunk, in samples of the file's global time base."""

    index: int
    start: int
    """First sample processed (the halo and half the overlap before ``valid_start`` are warm-up context)."""
    length: int
    """Samples processed from ``start`` (the same for every chunk; past the file's end they are zeros)."""
    valid_start: int
    valid_end: int
    """Results for ``[valid_start, valid_end)`` come from this chunk and no other."""


def _sizes(chunk_s: float, overlap_s: float, halo_s: float, align_hop: int, sample_rate: int
           ) -> tuple[int, int, int]:
    """Core chunk, half overlap and halo in samples, each a multiple of ``align_hop``."""
    hop = align_hop

    def up(x: float) -> int:
        return int(math.ceil(x * sample_rate / hop)) * hop

    chunk = max(hop, up(chunk_s))
    half = int(round(overlap_s * sample_rate / 2 / hop)) * hop
    if 2 * half >= chunk:
        raise ValueError(f"overlap_s={overlap_s} must be shorter than chunk_s={chunk_s}")
    return chunk, half, up(halo_s) if halo_s > 0 else 0


def causal_length(chunk_s: float = 10.0, overlap_s: float = 2.5, halo_s: float = 0.5, align_hop: int = 4096,
                  sample_rate: int = 16000) -> int:
    """Samples from a chunk's start to the furthest valid end any chunk of ``chunk_schedule`` has.

    A causal stage (the VAD) needs nothing after a chunk's valid end, so it reads this many samples of every chunk
    instead of ``ChunkPlan.length``: the trailing half overlap, context only for a non-causal stage, is skipped.
    """
    chunk, half, halo = _sizes(chunk_s, overlap_s, halo_s, align_hop, sample_rate)
    return chunk - half + halo


def chunk_schedule(total_s: float, chunk_s: float = 10.0, overlap_s: float = 2.5, halo_s: float = 0.5,
                   align_hop: int = 4096, sample_rate: int = 16000) -> list[ChunkPlan]:
    """Plan the chunks of a file of ``total_s`` seconds.

    Args:
        total_s: file duration.
        chunk_s: core chunk length (rounded up to the hop).
        overlap_s: overlap of consecutive cores; half of it is context on each side of a valid boundary.
        halo_s: extra warm-up before each core (stateful models start from the same state the whole file has).
        align_hop: every boundary is a multiple of this many samples.
        sample_rate: samples per second.

    Returns:
        Chunks in order; their valid regions tile ``[0, total samples)`` with no gap and no double coverage.
    """
    n = int(round(total_s * sample_rate))
    if n <= 0:
        return []
    chunk, half, halo = _sizes(chunk_s, overlap_s, halo_s, align_hop, sample_rate)
    step = chunk - 2 * half
    # The last chunk's valid region ends at the file's end; it is kept within step + half of its core's start, so
    # that no chunk's valid end lies past ``causal_length`` samples from its start (a causal stage reads no more).
    count = 1 if n <= step + half else 1 + math.ceil((n - step - half) / step)
    plans = []
    for i in range(count):
        core = i * step
        valid_start = 0 if i == 0 else core + half
        valid_end = n if i == count - 1 else (i + 1) * step + half
        start = max(0, core - halo)
        plans.append(ChunkPlan(i, start, chunk + halo, valid_start, valid_end))
    return plans
