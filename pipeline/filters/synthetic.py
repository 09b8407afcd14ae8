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
    hang_ids: tuple[str, ...] = ()
    """Items that hang for ``hang_s`` (fault injection: a file that sends a decoder into a loop)."""
    hang_s: float = 0.0
    """How long those items hang, in seconds."""
    crash_ids: tuple[str, ...] = ()
    """Items that kill their process with a real segmentation fault (fault injection: a poison file that crashes
    a native decoder)."""
    crash_in_rehearsal: bool = True
    """Whether those items crash the rehearsal child too (``pipeline.crashes``); False: only the job process, as
    a crash inside a model would."""


class NoopFilter(Filter):
    """Does nothing with the media; records the file size the runtime handed over."""

    weight_free = True
    params_type = NoopParams
    output_type = pa.struct([("bytes", pa.int64())])

    def apply(self, media: MediaItem, ctx: FilterContext) -> dict:
        if self.params.sleep_s:
            time.sleep(self.params.sleep_s)
        if media.item_id in self.params.hang_ids:
            time.sleep(self.params.hang_s)
        if media.item_id in self.params.crash_ids:
            _segfault()
        return {"bytes": media.size_bytes}

    def rehearse(self, media: MediaItem, ctx: FilterContext) -> None:
        if self.params.crash_in_rehearsal or media.item_id not in self.params.crash_ids:
            self.apply(media, ctx)


def _segfault() -> None:
    """Read address 0: the kernel sends SIGSEGV, as it does to a decoder that follows a corrupt pointer."""
    import ctypes

    ctypes.string_at(0)


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


@dataclass(frozen=True)
class CrashOnceParams:
    marker: str = ""
    """A file path; the first process to reach ``after_items`` creates it and dies, later ones carry on."""
    after_items: int = 5
    """Items this process finishes before it dies."""


class CrashOnceFilter(Filter):
    """A fault-injection aid for elastic-restart tests: SIGKILLs its own process once per marker file."""

    params_type = CrashOnceParams
    output_type = pa.struct([("survived", pa.bool_())])

    def __init__(self, name, params):
        super().__init__(name, params)
        if not params.marker:
            from pipeline.errors import ConfigError

            raise ConfigError(f"filters.{name}.marker is required")
        self._seen = 0
        import threading

        self._lock = threading.Lock()

    def apply(self, media: MediaItem, ctx: FilterContext) -> dict:
        import os
        import signal

        with self._lock:
            self._seen += 1
            due = self._seen >= self.params.after_items
            if due:
                try:
                    fd = os.open(self.params.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    due = False
                else:
                    os.close(fd)
        if due:
            os.kill(os.getpid(), signal.SIGKILL)
        return {"survived": True}
