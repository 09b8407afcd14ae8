"""The bounded queue between fetch and decode: producers block when it is full, every wait has a limit."""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable

from pipeline.errors import StallError

_POLL_S = 0.2


class BoundedTaskQueue:
    """A FIFO of fetched items with a fixed depth, so memory stays bounded by depth x item size.

    Waits poll a stop event, so shutdown never waits on a blocked ``put`` or ``get``, and give up after
    ``stall_timeout_s`` with a ``StallError`` that names the side that stopped moving.

    Args:
        depth: maximum items waiting.
        stall_timeout_s: longest wait of a ``put`` (consumers dead or hung) or ``get`` (producers dead or hung).
        busy_until: the ``time.monotonic()`` deadline of the latest item in the consumers' hands (0: none); a full
            queue is no stall before it (a consumer within its item's limit is working, however long the item),
            and a ``put`` waits up to ``stall_timeout_s`` past it.
    """

    def __init__(self, depth: int, stall_timeout_s: float, busy_until: Callable[[], float] = lambda: 0.0):
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self.depth = depth
        self.stall_timeout_s = stall_timeout_s
        self.busy_until = busy_until

    def qsize(self) -> int:
        return self._q.qsize()

    def put(self, item: Any, stop: threading.Event) -> bool:
        """Enqueue ``item``; False when ``stop`` was set first (the caller keeps the item)."""
        start = time.monotonic()
        while not stop.is_set():
            try:
                self._q.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                now = time.monotonic()
                if now - max(start, self.busy_until()) > self.stall_timeout_s:
                    raise StallError(f"task queue full for {now - start:.0f}s: consumers are not taking items (none "
                                     f"for {self.stall_timeout_s:g}s past the last item's limit)") from None
        return False

    def get(self, stop: threading.Event, producers_done: Callable[[], bool]) -> Any | None:
        """Dequeue the next item; None at end of input (producers done and queue empty) or on ``stop``."""
        start = time.monotonic()
        while not stop.is_set():
            try:
                return self._q.get(timeout=_POLL_S)
            except queue.Empty:
                if producers_done() and self._q.empty():
                    return None
                if time.monotonic() - start > self.stall_timeout_s:
                    raise StallError(f"task queue empty for {self.stall_timeout_s:.0f}s while producers are "
                                     "running") from None
        return None

    def drain(self) -> list[Any]:
        """Remove and return everything still queued (abandoned on shutdown)."""
        out = []
        while True:
            try:
                out.append(self._q.get_nowait())
            except queue.Empty:
                return out
