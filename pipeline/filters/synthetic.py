"""Filters without media work: ``noop`` for control-plane runs and ``cpu_burn`` for overlap benchmarks."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.filters.base import Filter, FilterContext
from pipeline.media.item import MediaItem


@dataclass(frozen=True)
class NoopParams:
    sleep_s: float = 0.0
    """Seconds to sleep per item (to make a run last long enough to be interrupted in tests)."""


class NoopFilter(Filter):
    """Does nothing with the media; records the file size the runtime handed over."""

    params_type = NoopParams
    output_type = pa.struct([("bytes", pa.int64())])

    def apply(self, media: MediaItem, ctx: FilterContext) -> dict:
        if self.params.sleep_s:
            time.sleep(self.params.sleep_s)
        return {"bytes": media.size_bytes}


@dataclass(frozen=True)
class CpuBurnParams:
    ms: float = 50.0
    """Target compute per item, in milliseconds of a single-threaded float64 matrix loop."""
    size: int = 96
    """Matrix side of each multiply."""


class CpuBurnFilter(Filter):
    """A compute-bound filter of fixed cost, for benchmarks of fetch/compute overlap."""

    params_type = CpuBurnParams
    output_type = pa.struct([("checksum", pa.float64()), ("iterations", pa.int64())])

    def apply(self, media: MediaItem, ctx: FilterContext) -> dict:
        rng = np.random.default_rng(len(media.item_id))
        a = rng.standard_normal((self.params.size, self.params.size)) / self.params.size
        deadline = time.thread_time() + self.params.ms / 1000.0
        acc, n = a, 0
        while time.thread_time() < deadline:  # CPU time of this thread: waiting on the GIL does not count
            acc = np.tanh(acc @ a)
            n += 1
        return {"checksum": float(acc.sum()), "iterations": n}
