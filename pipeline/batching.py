"""Dynamic batching across the consumer threads of a rank: rows from several items share one model call.

A batch that runs out of memory (a CUDA OOM in torch, ONNX Runtime's arena failing to allocate, the host allocator
refusing) is split in halves and run again, and the batcher keeps to the size that fitted for a while: the other
models on the GPU, the concurrent batches of the other instances and fragmentation make the memory a batch finds
vary over a week-long job, and one OOM should cost a smaller batch, not the rows of every item in it. Only a row
that does not fit alone fails, and only its item, with ``OutOfMemory`` (retryable: a rerun tries it again).
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from models.circuit_breaker import is_out_of_memory
from pipeline.errors import OutOfMemory, error_chain

log = logging.getLogger(__name__)


def release_memory() -> None:
    """Return what an out-of-memory batch left behind: the tensors of its frames (collected with it) and the CUDA
    caching allocator's free blocks, so the retry finds the memory in one piece."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


@dataclass(eq=False)  # identity, not the payload, tells requests apart
class _Request:
    x: torch.Tensor | list
    done: threading.Event = field(default_factory=threading.Event)
    result: torch.Tensor | None = None
    error: BaseException | None = None


class DynamicBatcher:
    """Concatenates concurrent requests (tensors along dim 0, or lists) into batches of at most ``max_batch`` rows.

    There is no extra thread: a caller that finds a free runner slot becomes the runner, waits up to
    ``max_wait_s`` for the batch to fill, runs it, and hands every request its slice. ``runners`` slots (one per
    model instance) let batches run concurrently. An error in a batch is raised in every request with rows in it;
    an out-of-memory batch is split instead (see the module docstring), so rows must be independent of each other
    (every model here gives the same row batched and alone).

    Args:
        run_batch: the model call on a batch (acquires its model instance itself).
        max_batch: rows per batch.
        max_wait_s: how long a runner waits for more rows before running a partial batch.
        runners: batches that may run at once.
        group_key: only requests with equal keys share a batch (e.g. the frame size, where a model pads a mixed
            batch differently than it pads each input alone).
        regrow_after: after an out-of-memory split, batches stay at the size that fitted; every ``regrow_after``
            batches in a row without one, the limit doubles again, up to ``max_batch``. A regrown size that runs out
            of memory again doubles the wait before the next try (up to 64 times), so memory that stays short costs
            ever fewer failed batches.
    """

    def __init__(self, run_batch: Callable[[torch.Tensor], torch.Tensor], max_batch: int, max_wait_s: float = 0.01,
                 runners: int = 1, group_key: Callable[[object], object] | None = None, regrow_after: int = 50):
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._lock = threading.Lock()
        self._pending: list[_Request] = []
        self._slots = threading.Semaphore(runners)
        self.group_key = group_key
        self.regrow_after = regrow_after
        self.batch_limit = max_batch  # lowered after an out-of-memory split, regrown after clean batches
        self._clean_batches = 0
        self._regrow_wait = regrow_after  # batches to wait before the next regrowth; backs off
        self._regrown = False  # the limit grew since the last out-of-memory error
        self.batches_run = 0
        self.rows_run = 0
        self.oom_splits = 0
        self.oom_rows_failed = 0

    def __call__(self, x):
        """Run ``x`` (a ``[n, ...]`` tensor, or a list of n inputs of any shapes) through the model, batched with
        other callers' rows; returns the same kind, n rows."""
        if len(x) > self.max_batch:
            parts = [self(x[i:i + self.max_batch]) for i in range(0, len(x), self.max_batch)]
            return torch.cat(parts) if isinstance(x, torch.Tensor) else [r for p in parts for r in p]
        req = _Request(x)
        with self._lock:
            self._pending.append(req)
        while not req.done.is_set():
            if self._slots.acquire(blocking=False):
                try:
                    batch = self._take()
                    if batch:
                        self._run(batch)
                finally:
                    self._slots.release()
            else:
                req.done.wait(0.002)
        if req.error is not None:
            raise req.error
        return req.result

    def _group(self) -> list[_Request]:
        """Pending requests that may share a batch with the oldest one."""
        if self.group_key is None or not self._pending:
            return list(self._pending)
        key = self.group_key(self._pending[0].x)
        return [r for r in self._pending if self.group_key(r.x) == key]

    def _rows(self) -> int:
        return sum(len(r.x) for r in self._group())

    def _take(self) -> list[_Request]:
        deadline = time.monotonic() + self.max_wait_s
        while True:
            with self._lock:
                limit = self.batch_limit
                if self._rows() >= limit or time.monotonic() >= deadline or not self._pending:
                    batch, rows = [], 0
                    for req in self._group():
                        if rows + len(req.x) > limit and batch:
                            break
                        batch.append(req)
                        rows += len(req.x)
                    for req in batch:
                        self._pending.remove(req)
                    return batch
            time.sleep(0.0005)

    def _run(self, batch: list[_Request]) -> None:
        try:
            tensors = isinstance(batch[0].x, torch.Tensor)
            rows = torch.cat([r.x for r in batch]) if tensors else [item for r in batch for item in r.x]
            segments = self._run_rows(rows, 0, len(rows))
            start = 0
            for r in batch:
                end = start + len(r.x)
                pieces = [(lo, hi, out) for lo, hi, out in segments if lo < end and hi > start]
                failed = next((out for _, _, out in pieces if isinstance(out, BaseException)), None)
                if failed is not None:
                    r.error = failed
                else:
                    parts = [out[max(start, lo) - lo:min(end, hi) - lo] for lo, hi, out in pieces]
                    r.result = (parts[0] if len(parts) == 1 else torch.cat(parts)) if tensors else \
                        [row for p in parts for row in p]
                start = end
        except BaseException as e:  # noqa: BLE001 - handed to each caller, who raises it as its item's error
            for r in batch:
                if r.result is None and r.error is None:
                    r.error = e
        finally:
            for r in batch:
                r.done.set()

    def _run_rows(self, rows, lo: int, hi: int) -> list[tuple[int, int, object]]:
        """Run rows ``lo:hi`` as one batch; on an out-of-memory error run each half instead. Returns
        ``(lo, hi, output or error)`` segments covering the range: an error only where a batch failed for another
        reason, or where one row alone did not fit (then ``OutOfMemory``)."""
        limit = self.batch_limit
        if hi - lo > limit:  # one item's rows beyond the limit, or the limit lowered meanwhile (by a concurrent batch)
            return [seg for start in range(lo, hi, limit)
                    for seg in self._run_rows(rows, start, min(start + limit, hi))]
        try:
            out = self.run_batch(rows[lo:hi])
        except Exception as e:  # noqa: BLE001 - out-of-memory is split below; any other error goes to its rows
            if not is_out_of_memory(e):
                return [(lo, hi, e)]
            failure = _without_frames(e)
        else:
            self.batches_run += 1
            self.rows_run += len(out)
            with self._lock:
                self._clean_batches += 1
                if self.batch_limit < self.max_batch and self._clean_batches >= self._regrow_wait:
                    self.batch_limit = min(self.max_batch, self.batch_limit * 2)
                    self._clean_batches = 0
                    self._regrown = True
            return [(lo, hi, out)]
        release_memory()  # outside the except block: its traceback held the failed call's tensors until now
        if hi - lo == 1:
            self.oom_rows_failed += 1
            log.warning("out of memory on a batch of one row: %s", first_line(failure))
            error = OutOfMemory(f"out of memory on one row of this item alone in a batch: {first_line(failure)}")
            error.__cause__ = failure
            return [(lo, hi, error)]
        mid = (lo + hi) // 2
        with self._lock:
            self.oom_splits += 1
            if self._regrown:  # the size it grew back to did not fit either: wait longer before the next try
                self._regrow_wait = min(self._regrow_wait * 2, self.regrow_after * 64)
                self._regrown = False
            if mid - lo < self.batch_limit:
                log.warning("out of memory on a batch of %d rows; batches of at most %d from now on: %s",
                            hi - lo, mid - lo, first_line(failure))
                self.batch_limit = mid - lo
            self._clean_batches = 0
        return self._run_rows(rows, lo, mid) + self._run_rows(rows, mid, hi)


def _without_frames(error: BaseException) -> BaseException:
    """``error`` and its causes without their tracebacks, whose frames hold the tensors of the call that failed (the
    memory a retry needs); the message and the chain of causes stay."""
    for e in error_chain(error):
        e.__traceback__ = None
    return error


def first_line(error: BaseException) -> str:
    """``Type: message`` cut to its first line and 300 characters (never empty: ``MemoryError()`` has no message)."""
    text = f"{type(error).__name__}: {error}"
    return text.splitlines()[0][:300]
