"""Rank identity, torch.distributed set-up under torchrun, and dynamic work units through the c10d store."""

from __future__ import annotations

import datetime
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable

log = logging.getLogger(__name__)


def ranks_shown(ranks: list[int]) -> str:
    """Ranks for a message: ``1,3,5``, the first eight and ``,...`` after them."""
    return ",".join(map(str, ranks[:8])) + (",..." if len(ranks) > 8 else "")


def ranks_by_value(pairs: Iterable[tuple[int, Any]]) -> list[tuple[Any, list[int]]]:
    """The distinct values among ``(rank, value)`` pairs, in the order first seen, each with the ranks that hold it
    (for a summary: the runtimes of a model, the software versions, across the ranks)."""
    out: list[tuple[Any, list[int]]] = []
    for rank, value in pairs:
        for seen, ranks in out:
            if seen == value:
                ranks.append(rank)
                break
        else:
            out.append((value, [rank]))
    return out


@dataclass
class DistContext:
    """Who this process is and how it talks to the others (``store`` is None with one process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    restart_count: int = 0
    host: str = socket.gethostname()
    store: Any = None
    initialized: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (no-op with one process)."""
        if self.initialized:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.initialized:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.initialized:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.initialized:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.initialized = False


def env_context() -> DistContext:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, ...) without initialising anything."""
    env = os.environ
    return DistContext(
        rank=int(env.get("RANK", 0)),
        world_size=int(env.get("WORLD_SIZE", 1)),
        local_rank=int(env.get("LOCAL_RANK", 0)),
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", 1)),
        node_rank=int(env.get("GROUP_RANK", 0)),
        restart_count=int(env.get("TORCHELASTIC_RESTART_COUNT", 0)),
    )


def resolve_device(choice: str, local_rank: int) -> str:
    """``auto``: this rank's LOCAL_RANK GPU when CUDA is present, else ``cpu``."""
    import torch

    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if not torch.cuda.is_available():
        from pipeline.errors import ConfigError

        raise ConfigError("runtime.device=cuda but CUDA is not available")
    index = local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return f"cuda:{index}"


def init_distributed(device: str, timeout_s: float) -> DistContext:
    """Initialise torch.distributed when launched by torchrun with more than one process.

    Args:
        device: the rank's device (``cpu`` picks gloo, ``cuda:N`` nccl).
        timeout_s: collective timeout.

    Returns:
        The rank's context; with one process nothing is initialised.
    """
    ctx = env_context()
    if ctx.world_size <= 1 or "MASTER_ADDR" not in os.environ:
        return ctx
    import torch
    import torch.distributed as dist

    backend = "nccl" if device.startswith("cuda") else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    # torchrun's agent store (shared with the workers, torch's default) outlives a restart: the process group's
    # keys go under a prefix of the restart attempt, else a restarted rank can read a dead rank's address from the
    # last attempt (gloo then fails with "connection refused" or hangs in connectFullMesh). That count is each
    # node's own, though: a node whose workers were healthy when another's failed restarts without counting, and a
    # replacement node starts at 0, so across nodes the prefixes differ and every rank waits for the others until
    # the timeout. Without sharing (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, set by the launchers), rank 0 hosts a
    # new store on a new port at every attempt: nothing stale to read, and the prefix is one for all.
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), ctx.world_size,
                         is_master=ctx.rank == 0 and not agent_store, timeout=timeout)
    store = dist.PrefixStore(f"mediasieve/attempt_{ctx.restart_count}" if agent_store else "mediasieve", base)
    if agent_store and int(os.environ.get("GROUP_WORLD_SIZE", 1)) > 1 and ctx.rank == 0:
        log.warning("torchrun shares its rendezvous store with the workers on %s nodes: a node restarted or replaced "
                    "alone (another's workers failed, a pod evicted) would wait at its restart until "
                    "runtime.dist_timeout_s; set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 where torchrun is "
                    "launched (the launchers in launch/ do)", os.environ["GROUP_WORLD_SIZE"])
    kwargs: dict[str, Any] = {"backend": backend, "timeout": timeout, "store": store, "rank": ctx.rank,
                              "world_size": ctx.world_size}
    if backend == "nccl":
        kwargs["device_id"] = torch.device(device)
    dist.init_process_group(**kwargs)
    ctx.initialized = True
    ctx.store = store
    log.info("torch.distributed up: backend=%s world=%d local=%d/%d", backend, ctx.world_size, ctx.local_rank,
             ctx.local_world_size)
    return ctx


class WorkUnitCounter:
    """Hands out work-unit indices 0, 1, 2, ... to whichever rank asks next.

    Across ranks it is the c10d store's atomic ``add`` (the store torchrun already runs), so a fast rank simply
    takes more units and no rank idles while another has a backlog. With one process it is a local counter.

    Args:
        n_units: number of units in this run.
        store: the c10d store, or None.
        key: store key unique to this run attempt.
    """

    def __init__(self, n_units: int, store: Any = None, key: str = "mediasieve/units"):
        self.n_units = n_units
        self.store = store
        self.key = key
        self._lock = threading.Lock()
        self._next = 0

    def next_unit(self) -> int | None:
        """The next unclaimed unit index, or None when all are claimed."""
        if self.store is not None:
            idx = int(self.store.add(self.key, 1)) - 1
        else:
            with self._lock:
                idx = self._next
                self._next += 1
        return idx if idx < self.n_units else None


class GlobalCounter:
    """A shared running total (items finished over all ranks), for rank 0's progress bar."""

    def __init__(self, store: Any = None, key: str = "mediasieve/done"):
        self.store = store
        self.key = key
        self._local = 0

    def add(self, n: int) -> int:
        if self.store is None:
            self._local += n
            return self._local
        return int(self.store.add(self.key, n))


class StopFlag:
    """A reason to stop that one rank raises and every rank sees: a key in torchrun's store (a local value with one
    process). Polled, not waited on: a rank checks it every couple of seconds in its supervision loop.

    The store may be held by the raising rank's own process (rank 0's, where torchrun does not share its rendezvous
    store): a rank that has not read the flag when that process exits can no longer read it. So a rank that reads
    the flag says so (once, beside it in the store), and the raiser waits for the other ``ranks - 1``
    (``wait_seen``) before it stops."""

    def __init__(self, store: Any = None, key: str = "mediasieve/stop", ranks: int = 1):
        self.store = store
        self.key = key
        self.ranks = ranks
        self._local: str | None = None
        self._said = False

    def raise_flag(self, reason: str) -> None:
        if self.store is None:
            self._local = reason
        else:
            self.store.set(self.key, reason)

    def reason(self) -> str | None:
        """The reason, once some rank raised the flag; else None. Reading it tells the raiser this rank saw it."""
        if self.store is None:
            return self._local
        if not self.store.check([self.key]):
            return None
        if not self._said:
            self.store.add(f"{self.key}/seen", 1)
            self._said = True
        return self.store.get(self.key).decode()

    def wait_seen(self, timeout_s: float) -> bool:
        """Wait until the other ranks read the flag; False where ``timeout_s`` passed first."""
        if self.store is None or self.ranks <= 1:
            return True
        deadline = time.monotonic() + timeout_s
        while int(self.store.add(f"{self.key}/seen", 0)) < self.ranks - 1:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True
