"""Dynamic batching across the consumer threads of a rank: rows from several items share one model call."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class _Request:
    x: torch.Tensor
    done: threading.Event = field(default_factory=threading.Event)
    result: torch.Tensor | None = None
    error: BaseException | None = None


class DynamicBatcher:
    """Concatenates concurrent requests (along dim 0) into batches of at most ``max_batch`` rows.

    There is no extra thread: a caller that finds a free runner slot becomes the runner, waits up to
    ``max_wait_s`` for the batch to fill, runs it, and hands every request its slice. ``runners`` slots (one per
    model instance) let batches run concurrently. An error in a batch is raised in every request of that batch.

    Args:
        run_batch: the model call on a batch (acquires its model instance itself).
        max_batch: rows per batch.
        max_wait_s: how long a runner waits for more rows before running a partial batch.
        runners: batches that may run at once.
    """

    def __init__(self, run_batch: Callable[[torch.Tensor], torch.Tensor], max_batch: int, max_wait_s: float = 0.01,
                 runners: int = 1):
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._lock = threading.Lock()
        self._pending: list[_Request] = []
        self._slots = threading.Semaphore(runners)
        self.batches_run = 0
        self.rows_run = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Run ``x`` (``[n, ...]``, n <= max_batch) through the model, batched with other callers' rows."""
        if x.shape[0] > self.max_batch:
            return torch.cat([self(c) for c in torch.split(x, self.max_batch)])
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

    def _rows(self) -> int:
        return sum(r.x.shape[0] for r in self._pending)

    def _take(self) -> list[_Request]:
        deadline = time.monotonic() + self.max_wait_s
        while True:
            with self._lock:
                if self._rows() >= self.max_batch or time.monotonic() >= deadline or not self._pending:
                    batch, rows = [], 0
                    while self._pending and rows + self._pending[0].x.shape[0] <= self.max_batch:
                        req = self._pending.pop(0)
                        batch.append(req)
                        rows += req.x.shape[0]
                    return batch
            time.sleep(0.0005)

    def _run(self, batch: list[_Request]) -> None:
        try:
            out = self.run_batch(torch.cat([r.x for r in batch]))
            self.batches_run += 1
            self.rows_run += out.shape[0]
            start = 0
            for r in batch:
                r.result = out[start:start + r.x.shape[0]]
                start += r.x.shape[0]
        except BaseException as e:  # noqa: BLE001 - handed to each caller, who raises it as its item's error
            for r in batch:
                r.error = e
        finally:
            for r in batch:
                r.done.set()
