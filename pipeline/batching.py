"""Dynamic batching across the consumer threads of a rank: rows from several items share one model call."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


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
    model instance) let batches run concurrently. An error in a batch is raised in every request of that batch.

    Args:
        run_batch: the model call on a batch (acquires its model instance itself).
        max_batch: rows per batch.
        max_wait_s: how long a runner waits for more rows before running a partial batch.
        runners: batches that may run at once.
        group_key: only requests with equal keys share a batch (e.g. the frame size, where a model pads a mixed
            batch differently than it pads each input alone).
    """

    def __init__(self, run_batch: Callable[[torch.Tensor], torch.Tensor], max_batch: int, max_wait_s: float = 0.01,
                 runners: int = 1, group_key: Callable[[object], object] | None = None):
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._lock = threading.Lock()
        self._pending: list[_Request] = []
        self._slots = threading.Semaphore(runners)
        self.group_key = group_key
        self.batches_run = 0
        self.rows_run = 0

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
                if self._rows() >= self.max_batch or time.monotonic() >= deadline or not self._pending:
                    batch, rows = [], 0
                    for req in self._group():
                        if rows + len(req.x) > self.max_batch and batch:
                            break
                        batch.append(req)
                        rows += len(req.x)
                    for req in batch:
                        self._pending.remove(req)
                    return batch
            time.sleep(0.0005)

    def _run(self, batch: list[_Request]) -> None:
        try:
            if isinstance(batch[0].x, torch.Tensor):
                out = self.run_batch(torch.cat([r.x for r in batch]))
            else:
                out = self.run_batch([item for r in batch for item in r.x])
            self.batches_run += 1
            self.rows_run += len(out)
            start = 0
            for r in batch:
                r.result = out[start:start + len(r.x)]
                start += len(r.x)
        except BaseException as e:  # noqa: BLE001 - handed to each caller, who raises it as its item's error
            for r in batch:
                r.error = e
        finally:
            for r in batch:
                r.done.set()
