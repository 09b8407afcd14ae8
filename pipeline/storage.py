"""Tiered fetch: node-local cache, then shared-filesystem tiers, then the object store, through fsspec.

Ids never become paths: cache entries are named by a hash of the source URI, and relative manifest paths
that would climb out of their tier's root are rejected.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import posixpath
import random
import re
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable

import fsspec
from fsspec.callbacks import Callback

from pipeline.config import StorageConfig, TierConfig
from pipeline.errors import (
    AccessDeniedError,
    BadInputError,
    CacheFullError,
    FetchError,
    FetchTimeout,
    NotFoundError,
    TransientFetchError,
    error_chain,
)
from pipeline.proc import boot_time

log = logging.getLogger(__name__)

_EXT_RE = re.compile(r"^\.[A-Za-z0-9]{1,10}$")
SCRATCH_DIR = ".tmp"
"""Under the node cache: downloads in progress and other work files (``*.part``), swept once nobody writes them."""
_ENTRY_RE = re.compile(r"^[0-9a-f]{40}(\.[a-z0-9]{1,10})?$")  # what NodeCache.name_for makes


def check_protocols(protocols: set[str] | frozenset[str]) -> None:
    """Fail before any work when the manifest names URLs whose fsspec filesystem is not installed (``gs://``
    without gcsfs), instead of failing every such item one by one. A scheme fsspec does not know is left to the
    items: each fails with its own error.

    Raises:
        ConfigError: naming the scheme and the pip package fsspec asks for.
    """
    from pipeline.errors import ConfigError

    for proto in sorted(protocols):
        try:
            fsspec.get_filesystem_class(proto)
        except ImportError as e:
            raise ConfigError(f"the manifest has {proto}:// paths, but their filesystem is not installed: {e}") from e
        except ValueError:
            continue


def is_absolute(path: str) -> bool:
    """True for a URL with a scheme (``s3://...``) or an absolute local path."""
    return "://" in path or path.startswith("/")


def safe_relative(path: str) -> str:
    """Normalise a manifest-relative path and refuse one that leaves its root.

    Args:
        path: the manifest's path value.

    Returns:
        The normalised POSIX path.

    Raises:
        BadInputError: for an empty path, a NUL byte or a path that climbs above the root.
    """
    if not path or "\x00" in path:
        raise BadInputError("empty path or NUL byte in path")
    norm = posixpath.normpath(path.replace("\\", "/"))
    if norm.startswith("/") or norm == ".." or norm.startswith("../") or norm == ".":
        raise BadInputError(f"relative path {path!r} leaves its storage root")
    return norm


def classify_fs_error(error: BaseException) -> type[FetchError]:
    """Map an fsspec/s3fs/OS error to a typed fetch error class (permanent or transient)."""
    if isinstance(error, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return NotFoundError
    if isinstance(error, PermissionError):
        return AccessDeniedError
    status = getattr(error, "status", None)  # an HTTP status (aiohttp's ClientResponseError, from http(s) URLs)
    if isinstance(status, int) and 400 <= status < 500 and status not in (408, 425, 429):
        if status in (404, 410):
            return NotFoundError
        return AccessDeniedError if status in (401, 403) else FetchError
    text = str(error)
    if "NoSuchKey" in text or "NoSuchBucket" in text or "404" in text and "Not Found" in text:
        return NotFoundError
    if "AccessDenied" in text or "Forbidden" in text:
        return AccessDeniedError
    # Timeouts, connection resets, 5xx and SlowDown/throttling (s3fs raises these as OSError subclasses, or as
    # the HTTP stack's own errors) are worth a retry; a programming or option error is not.
    module = type(error).__module__.split(".", 1)[0]
    if isinstance(error, (OSError, TimeoutError, ConnectionError)) or module in ("botocore", "aiobotocore", "aiohttp"):
        return TransientFetchError
    import asyncio

    if isinstance(error, asyncio.TimeoutError):
        return TransientFetchError
    return FetchError


def backoff_delays(retries: int, base_s: float, max_s: float, rng: random.Random | None = None) -> list[float]:
    """Exponential backoff with full jitter: retry ``i`` waits uniform(0, min(max, base * 2**i)).

    Args:
        retries: number of retries.
        base_s: first ceiling.
        max_s: cap on a ceiling.
        rng: random source (tests pass a seeded one).

    Returns:
        One delay per retry.
    """
    rng = rng or random
    return [rng.uniform(0.0, min(max_s, base_s * (2**i))) for i in range(retries)]


def _disk_full(error: BaseException) -> bool:
    """Whether ``error`` or an error it came from is ENOSPC or EDQUOT (a full disk or quota)."""
    return any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in error_chain(error))


def _disk_full_message(cfg: StorageConfig, cache: NodeCache, url: str, error: BaseException) -> str:
    import shutil
    import socket

    try:
        usage = shutil.disk_usage(cache.root)
        free = f"{usage.free} of {usage.total} bytes free"
    except OSError:
        free = "free space unknown"
    return (f"node-local cache storage.cache_dir={cfg.cache_dir} on {socket.gethostname()} is full ({free}; this "
            f"process holds {cache.bytes_used} bytes in use, storage.cache_max_bytes={cfg.cache_max_bytes}) while "
            f"fetching {url}: {type(error).__name__}: {error}. Free the disk or lower storage.cache_max_bytes; "
            "committed rows are kept, rerun to resume")


class _ByteCap(Callback):
    """Stops a download (raising from fsspec's progress callback) once it announces or passes ``cap`` bytes."""

    def __init__(self, cap: int, what: str):
        super().__init__()
        self.cap, self.what = cap, what

    def set_size(self, size):
        if size is not None and size > self.cap:
            raise FetchError(f"{self.what} is {size} bytes, over storage.max_item_bytes ({self.cap})")

    def relative_update(self, inc=1):
        self.value += inc
        if self.value > self.cap:
            raise FetchError(f"{self.what} sent more than storage.max_item_bytes ({self.cap} bytes)")


def _protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


class NodeCache:
    """Byte-limited node-local cache of fetched items.

    Entries are files named ``sha256(source_uri)[:40] + ext``. Each process tracks the entries it knows and
    pins those in use; eviction (oldest access first) never removes a pinned entry. Ranks of one node share
    the directory; each process evicts within its share of the byte limit.

    What earlier runs left behind (a crash, a restart, a finished job) belongs to no process, so one process
    per node tends it (``tend=True``, local rank 0): at start it adopts the entries on disk into its own
    accounting, oldest first, so that they count towards the limit and are the first evicted; and it removes
    partial downloads (``.tmp/*.part``) that nobody has written to for ``orphan_age_s``, at start and then
    every ``orphan_age_s / 2``. The age, not a process id, decides what is abandoned, because another job may
    share the directory (pids mean nothing across containers): an adopted entry is removed only once it has
    not been used for ``orphan_age_s``, and one that another process looks up (which touches it) is left to
    that process.

    Args:
        root: the cache directory.
        max_bytes: this process's share of the byte limit.
        tend: adopt leftovers and sweep stale partial downloads (one process per node).
        orphan_age_s: how long an unused entry or a silent partial download must be left before it counts as
            abandoned.
        clock: wall-clock source, compared with file modification times.
    """

    def __init__(self, root: str, max_bytes: int, tend: bool = False, orphan_age_s: float = 1800.0,
                 clock: Callable[[], float] = time.time):
        self.root = root
        self.max_bytes = max_bytes
        self.tmp_dir = os.path.join(root, SCRATCH_DIR)
        os.makedirs(self.tmp_dir, exist_ok=True)
        self.orphan_age_s = orphan_age_s
        self._tend = tend
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, int] = OrderedDict()  # name -> bytes, oldest access first
        self._pins: dict[str, int] = {}
        self._adopted: dict[str, float] = {}  # leftover entry -> its mtime when adopted
        self._bytes = 0
        self._last_sweep = 0.0
        self._booted = boot_time()
        self.evictions = 0
        self.parts_removed = 0
        if tend:
            self._adopt_leftovers()

    @staticmethod
    def name_for(uri: str) -> str:
        ext = posixpath.splitext(uri.split("?", 1)[0])[1]
        ext = ext if _EXT_RE.match(ext) else ""
        return hashlib.sha256(uri.encode("utf-8", "surrogatepass")).hexdigest()[:40] + ext.lower()

    def path_of(self, name: str) -> str:
        return os.path.join(self.root, name)

    def lookup(self, uri: str) -> tuple[str, int] | None:
        """Return ``(path, bytes)`` and pin the entry when the cache holds ``uri``."""
        name = self.name_for(uri)
        path = self.path_of(name)
        with self._lock:
            try:
                size = os.stat(path).st_size
            except FileNotFoundError:
                self._forget(name)
                return None
            self._adopted.pop(name, None)  # in use by this process now
            if name in self._entries:
                self._entries.move_to_end(name)
            else:
                self._entries[name] = size
                self._bytes += size
            self._pins[name] = self._pins.get(name, 0) + 1
        try:
            os.utime(path)  # other ranks of the node evict by their own order; a touch marks recent use
        except OSError:
            pass
        return path, size

    def suspect(self, uri: str) -> bool:
        """Whether the cache's copy of ``uri`` may have lost its bytes: it is empty, or it was written before this
        machine last booted (ask before ``lookup``, which touches it). A rename is atomic, but a new file's data
        reaches the disk up to half a minute later (ext4, XFS), so a node that lost power or panicked (a GPU's Xid
        error) can come back with the last entries it wrote empty or cut short, and syncing every download would
        cost a large file's write-back on the fetch path. ``TieredFetcher`` checks a suspect's size against its
        source once; the touch of its use then clears it."""
        try:
            st = os.stat(self.path_of(self.name_for(uri)))
        except FileNotFoundError:
            return False
        return st.st_size == 0 or (self._booted is not None and st.st_mtime < self._booted)

    def discard(self, uri: str) -> None:
        """Unpin (as ``release``) and remove the cache's copy of ``uri`` (it lost bytes: ``suspect``)."""
        self.release(uri)
        name = self.name_for(uri)
        with self._lock:
            self._forget(name)
            try:
                os.remove(self.path_of(name))
            except FileNotFoundError:
                pass

    def tmp_path(self, uri: str) -> str:
        """A unique temporary name in the cache for a download in progress."""
        return os.path.join(self.tmp_dir, f"{self.name_for(uri)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part")

    def commit(self, uri: str, tmp: str, size: int) -> str:
        """Move a completed download into place (atomic rename), pin it, and evict to stay in budget."""
        name = self.name_for(uri)
        path = self.path_of(name)
        with self._lock:
            self._evict_locked(size, keep=name)
            os.replace(tmp, path)
            self._forget(name)
            self._entries[name] = size
            self._bytes += size
            self._pins[name] = self._pins.get(name, 0) + 1
        if self._tend and self._clock() - self._last_sweep > self.orphan_age_s / 2:
            self.sweep_parts()
        return path

    def release(self, uri: str) -> None:
        """Unpin an entry after its item is finished."""
        name = self.name_for(uri)
        with self._lock:
            count = self._pins.get(name, 0) - 1
            if count <= 0:
                self._pins.pop(name, None)
            else:
                self._pins[name] = count

    def make_room(self) -> int:
        """Evict every entry that may go (the disk is full); return the bytes freed."""
        with self._lock:
            before = self._bytes
            self._evict_locked(0, keep="", budget=0)
            return before - self._bytes

    def sweep_parts(self) -> int:
        """Remove partial downloads nobody has written to for ``orphan_age_s``; return how many."""
        self._last_sweep = now = self._clock()
        removed = 0
        try:
            names = os.listdir(self.tmp_dir)
        except FileNotFoundError:
            return 0
        for name in names:
            if not name.endswith(".part"):
                continue
            path = os.path.join(self.tmp_dir, name)
            try:
                if now - os.stat(path).st_mtime >= self.orphan_age_s:
                    os.remove(path)
                    removed += 1
            except FileNotFoundError:
                pass  # its download finished or failed meanwhile
        self.parts_removed += removed
        return removed

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def _adopt_leftovers(self) -> None:
        found = []
        with os.scandir(self.root) as it:
            for entry in it:
                if not _ENTRY_RE.match(entry.name):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if entry.is_file(follow_symlinks=False):
                    found.append((st.st_mtime, entry.name, st.st_size))
        found.sort()
        with self._lock:
            for mtime, name, size in found:
                if name not in self._entries:
                    self._entries[name] = size
                    self._bytes += size
                    self._adopted[name] = mtime
            adopted = self._bytes
            self._evict_locked(0, keep="")
        parts = self.sweep_parts()
        if found or parts:
            log.info("node cache %s: adopted %d leftover entries (%d bytes), evicted to %d of %d bytes; removed %d "
                     "stale partial downloads", self.root, len(found), adopted, self._bytes, self.max_bytes, parts)

    def _forget(self, name: str) -> None:
        self._adopted.pop(name, None)
        if name in self._entries:
            self._bytes -= self._entries.pop(name)

    def _evict_locked(self, incoming: int, keep: str, budget: int | None = None) -> None:
        budget = self.max_bytes if budget is None else budget
        now = None
        for name in list(self._entries):
            if self._bytes + incoming <= budget:
                return
            if name in self._pins or name == keep:
                continue
            if name in self._adopted:
                try:
                    mtime = os.stat(self.path_of(name)).st_mtime
                except FileNotFoundError:
                    self._forget(name)
                    continue
                if mtime != self._adopted[name]:
                    self._forget(name)  # another process looked it up: it counts it, and evicts it, now
                    continue
                now = self._clock() if now is None else now
                if now - mtime < self.orphan_age_s:
                    continue  # perhaps in use by another job that shares the directory: left until it ages
            size = self._entries.pop(name)
            self._adopted.pop(name, None)
            self._bytes -= size
            try:
                os.remove(self.path_of(name))
            except FileNotFoundError:
                pass
            self.evictions += 1


@dataclass
class FetchedItem:
    """A fetched item's local file, the tier that served it, and how to release it."""

    local_path: str
    tier: str
    bytes: int
    source_uri: str
    attempts: int = 1
    _release: Callable[[], None] | None = field(default=None, repr=False)

    def release(self) -> None:
        """Unpin the cache entry (idempotent)."""
        if self._release is not None:
            self._release()
            self._release = None


class FetchProgress:
    """What a fetch in flight did last, for a watchdog on another thread: the attempt it is on (tier, URL) and the
    partial download's size. The size is read from the file in the node cache, so a byte counts whatever the
    filesystem (s3fs, http, a local copy, which reports no progress of its own)."""

    def __init__(self) -> None:
        self.tier: str | None = None
        self.url: str | None = None
        self.tmp: str | None = None
        self.abandoned = False
        self._mark = time.monotonic()
        self._size = -1
        self._attempts = 0
        self._samples: deque = deque()  # (time, size) of this attempt: the watchdog's own
        self._sampled_attempt = 0

    def attempt(self, tier: str, url: str) -> None:
        """A new attempt starts (on the fetch's thread): it counts as progress."""
        self.tier, self.url, self.tmp = tier, url, None
        self._mark, self._size = time.monotonic(), -1
        self._attempts += 1

    @property
    def size(self) -> int:
        """The partial download's size when last looked at (-1: none yet)."""
        return self._size

    def silent_for(self, now: float) -> float:
        """Seconds since the last attempt began or the download last grew (on the watchdog's thread)."""
        tmp = self.tmp
        try:
            size = os.path.getsize(tmp) if tmp else -1
        except OSError:
            size = -1
        if size != self._size:
            self._size, self._mark = size, now
        return now - self._mark

    def stalled(self, now: float, window_s: float, min_bytes_per_s: float) -> str | None:
        """Why the fetch counts as hung now, or None (on the watchdog's thread, every poll): silent for
        ``window_s`` (no byte, no new attempt), or, once its attempt is ``window_s`` old, fewer than
        ``min_bytes_per_s`` on average over the last ``window_s`` (a link that trickles)."""
        silent = self.silent_for(now)
        if silent >= window_s:
            return f"no byte and no new attempt for {silent:.1f}s"
        if not min_bytes_per_s or self.tmp is None:  # nothing to measure a rate on
            return None
        if self._sampled_attempt != self._attempts:  # a new attempt: its own window
            self._sampled_attempt = self._attempts
            self._samples.clear()
        samples = self._samples
        samples.append((now, max(self._size, 0)))
        while len(samples) > 1 and samples[1][0] <= now - window_s:
            samples.popleft()
        span = now - samples[0][0]
        if span < window_s:  # the attempt is younger than the window
            return None
        got = samples[-1][1] - samples[0][1]
        if got >= min_bytes_per_s * span:
            return None
        return (f"{got} bytes in the last {span:.0f}s ({got / span:.0f} B/s, below storage.fetch_min_bytes_per_s="
                f"{min_bytes_per_s:g})")


class TieredFetcher:
    """Fetch an item through ordered tiers with retries, landing it in the node cache.

    Args:
        cfg: the storage section of the config.
        cache_share: fraction of the cache byte limit this process may use (1 / local world size).
        sleep: injectable sleep for retry delays.
        tend_cache: this process tends the node cache's leftovers (local rank 0; see ``NodeCache``).
        orphan_age_s: unused time after which a leftover cache entry or partial download counts as abandoned.
    """

    def __init__(self, cfg: StorageConfig, cache_share: float = 1.0, sleep: Callable[[float], None] = time.sleep,
                 tend_cache: bool = False, orphan_age_s: float = 1800.0):
        self.cfg = cfg
        self.tiers: list[TierConfig] = list(cfg.tiers)
        self.cache = None
        if cfg.use_cache:
            self.cache = NodeCache(cfg.cache_dir, int(cfg.cache_max_bytes * cache_share), tend_cache, orphan_age_s)
        self._sleep = sleep
        self._fs_lock = threading.Lock()
        self._fs: dict[tuple, fsspec.AbstractFileSystem] = {}
        self.retries_done = 0
        self.silent_in_a_row = 0
        """Fetches abandoned as silent since the last one a tier served (``fetch_watched``)."""
        self.hung_fetches = 0
        """Abandoned fetches whose threads have not returned yet."""
        self.cache_discarded = 0
        """Node-cache copies found to have lost bytes in a crash, fetched again (``_cached``)."""
        self._skips: dict[str, tuple[float, float]] = {}  # tier -> (skipped until, monotonic; length of the skip)
        self._counter_lock = threading.Lock()
        for tier in self.tiers:  # bad tier options are a config error before any work, not an item failure
            try:
                self._filesystem(tier.root, tier.storage_options)
            except Exception as e:  # noqa: BLE001 - anything here is the config's fault
                from pipeline.errors import ConfigError

                raise ConfigError(f"storage tier {tier.name!r} ({tier.root}): {type(e).__name__}: {e}") from e

    def _filesystem(self, url: str, options: dict) -> tuple[fsspec.AbstractFileSystem, str]:
        key = (_protocol(url), repr(sorted(options.items())))
        with self._fs_lock:
            fs = self._fs.get(key)
            if fs is None:
                fs, _ = fsspec.core.url_to_fs(url, **self._with_http_timeouts(url, options))
                self._fs[key] = fs
        return fs, fs._strip_protocol(url)

    def _with_http_timeouts(self, url: str, options: dict) -> dict:
        """For http(s): no limit on a whole download (aiohttp's default of 5 minutes fails every large file on a
        slow link) but one on silence (``storage.http_read_timeout_s``), unless the options set their own."""
        client = dict(options.get("client_kwargs") or {})
        if _protocol(url) not in ("http", "https") or "timeout" in client:
            return options
        import aiohttp

        client["timeout"] = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=self.cfg.http_read_timeout_s)
        return {**options, "client_kwargs": client}

    def candidates(self, path: str) -> list[tuple[str, str, dict]]:
        """The ``(tier name, url, storage options)`` to try, in order, for a manifest path."""
        if is_absolute(path):
            proto = _protocol(path)
            options = next((t.storage_options for t in self.tiers if _protocol(t.root) == proto), {})
            return [("local" if proto == "file" else proto, path, options)]
        rel = safe_relative(path)
        if not self.tiers:
            raise BadInputError(f"relative path {path!r} but no storage tiers are configured")
        return [(t.name, t.root.rstrip("/") + "/" + rel, t.storage_options) for t in self.tiers]

    def _cached(self, candidates: list[tuple[str, str, dict]]) -> FetchedItem | None:
        """The node cache's copy of any of the candidate URLs (pinned), before any tier is asked; a copy that may
        have lost bytes in a crash (``NodeCache.suspect``) only where its source still lists its size."""
        for tier, url, options in candidates if self.cache is not None else ():
            suspect = self.cache.suspect(url)
            hit = self.cache.lookup(url)
            if hit is None:
                continue
            if suspect and not self._same_size(tier, url, options, hit[1]):
                self.cache.discard(url)
                with self._counter_lock:
                    self.cache_discarded += 1
                log.warning("the node cache's copy of %s (%d bytes, written before this machine last booted or "
                            "empty) is not the size of its source: fetched again", url, hit[1])
                return None
            return FetchedItem(hit[0], "cache", hit[1], url, 0, lambda u=url: self.cache.release(u))
        return None

    def _same_size(self, tier: str, url: str, options: dict, size: int) -> bool:
        """Whether ``url``'s source lists ``size`` bytes (True where it cannot say: its copy is used as before)."""
        try:
            fs, rpath = self._filesystem(url, options)
            listed = fs.info(rpath).get("size")
        except Exception as e:  # noqa: BLE001 - an unanswered check keeps the copy; the fetch would fail the same
            log.warning("cannot check the node cache's copy of %s against %s: %s: %s", url, tier, type(e).__name__, e)
            return True
        return listed is None or int(listed) == size

    def fetch_watched(self, path: str, should_stop: Callable[[], bool], silence_s: float,
                      poll_s: float = 0.5, min_bytes_per_s: float = 0.0) -> FetchedItem:
        """``fetch`` on a thread of its own, given up once it goes silent for ``silence_s``: no byte and no new
        attempt (a hung mount, an endpoint that holds the connection and sends nothing), or once it gets fewer than
        ``min_bytes_per_s`` on average over ``silence_s`` (a link that trickles a byte now and then). Python cannot
        kill the thread: it is left behind, told to stop at its next retry, and what it fetches late is released.

        A tier that goes silent while later tiers remain is skipped (``storage.hung_tier_skip_s``) and the item is
        fetched from the tiers after it: a hung shared filesystem costs one wait per producer, not the job.

        Raises:
            FetchTimeout: the fetch went silent on its last tier (counted in ``silent_in_a_row`` until a tier
                serves one again).
            BadInputError, FetchError: as ``fetch``.
        """
        candidates = self.candidates(path)
        hit = self._cached(candidates)  # no thread for what the node has already
        if hit is not None:
            return hit
        candidates = self._not_skipped(candidates)
        while True:
            item, progress, why = self._watch(path, candidates, should_stop, silence_s, poll_s, min_bytes_per_s)
            if item is not None:
                if item.tier != "cache":
                    with self._counter_lock:
                        self.silent_in_a_row = 0
                return item
            names = [c[0] for c in candidates]
            later = candidates[names.index(progress.tier) + 1:] if progress.tier in names else []
            if later:
                self._skip(progress.tier, f"a fetch of {progress.url} got {why}")
                candidates = later
                continue
            with self._counter_lock:
                self.silent_in_a_row += 1
            where = f"{progress.tier}: {progress.url}" if progress.url else repr(path)
            got = f"after {progress.size} bytes" if progress.size > 0 else "before any byte"
            raise FetchTimeout(f"{where}: {why} ({got}; storage.fetch_silence_s={silence_s:g}): the storage looks "
                               "hung; the fetch was abandoned")

    def _watch(self, path: str, candidates: list[tuple[str, str, dict]], should_stop: Callable[[], bool],
               silence_s: float, poll_s: float, min_bytes_per_s: float) -> tuple[FetchedItem | None, FetchProgress,
                                                                                 str]:
        """Run ``fetch`` over ``candidates`` on a new thread: its item, or None with the progress of a fetch that
        stalled and why (``FetchProgress.stalled``; abandoned: counted in ``hung_fetches`` until its thread
        returns)."""
        progress = FetchProgress()
        box: dict[str, object] = {}
        done = threading.Event()
        lock = threading.Lock()

        def work() -> None:
            try:
                box["item"] = self.fetch(path, lambda: should_stop() or progress.abandoned, progress, candidates)
            except BaseException as e:  # noqa: BLE001 - handed to the waiting producer, or dropped if it left
                box["error"] = e
            with lock:
                done.set()
                late = progress.abandoned
            if late:
                with self._counter_lock:
                    self.hung_fetches -= 1
                if "item" in box:
                    box["item"].release()
                log.warning("an abandoned fetch of %r returned after all (%s)", path,
                            "fetched" if "item" in box else type(box.get("error")).__name__)

        threading.Thread(target=work, daemon=True, name=f"{threading.current_thread().name}-fetch").start()
        while not done.wait(poll_s):
            why = progress.stalled(time.monotonic(), silence_s, min_bytes_per_s)
            if why is None:
                continue
            with lock:
                if done.is_set():
                    break
                progress.abandoned = True
            with self._counter_lock:
                self.hung_fetches += 1
            return None, progress, why
        if "error" in box:
            raise box["error"]  # type: ignore[misc]
        return box["item"], progress, ""  # type: ignore[return-value]

    @property
    def skipped_tiers(self) -> dict[str, float]:
        """The tiers skipped now (a fetch from them went silent), with the seconds until each is tried again."""
        now = time.monotonic()
        with self._counter_lock:
            return {t: round(until - now, 1) for t, (until, _) in sorted(self._skips.items()) if until > now}

    def _not_skipped(self, candidates: list[tuple[str, str, dict]]) -> list[tuple[str, str, dict]]:
        """``candidates`` less the skipped tiers; all of them where every one is skipped (the item is tried)."""
        now = time.monotonic()
        with self._counter_lock:
            live = [c for c in candidates if self._skips.get(c[0], (0.0, 0.0))[0] <= now]
        return live or candidates

    def _skip(self, tier: str, why: str) -> None:
        """Skip ``tier`` for ``hung_tier_skip_s``, twice as long each time it is still silent when tried again (up
        to 16 times), until it serves a fetch."""
        now = time.monotonic()
        with self._counter_lock:
            until, length = self._skips.get(tier, (0.0, 0.0))
            if until > now:
                return  # already skipped: other fetches that were on it when it went silent
            length = min(2 * length, 16 * self.cfg.hung_tier_skip_s) if length else self.cfg.hung_tier_skip_s
            self._skips[tier] = (now + length, length)
        log.warning("storage tier %r skipped for %.0fs: %s; its items are fetched from the tiers after it, and it is "
                    "tried again after that", tier, length, why)

    def _served(self, tier: str) -> None:
        with self._counter_lock:
            skipped = self._skips.pop(tier, None)
        if skipped is not None:
            log.warning("storage tier %r serves again: no longer skipped", tier)

    def fetch(self, path: str, should_stop: Callable[[], bool] = lambda: False,
              progress: FetchProgress | None = None,
              candidates: list[tuple[str, str, dict]] | None = None) -> FetchedItem:
        """Fetch ``path`` through the cache and the tiers.

        Args:
            path: the manifest path (absolute URL or tier-relative).
            should_stop: polled between retries so shutdown is not held up by backoff.
            progress: told of each attempt and of the partial download, for ``fetch_watched``.
            candidates: the tiers to try (default: ``candidates(path)`` less the skipped ones).

        Returns:
            The local file with its serving tier.

        Raises:
            BadInputError: unusable path.
            FetchError: the most informative failure over all tiers (transient beats denied beats not found).
        """
        if candidates is None:
            candidates = self.candidates(path)
            hit = self._cached(candidates)
            if hit is not None:
                return hit
            candidates = self._not_skipped(candidates)
        errors: list[FetchError] = []
        for tier, url, options in candidates:
            try:
                item = self._fetch_from_tier(tier, url, options, should_stop, progress or FetchProgress())
            except FetchError as e:
                errors.append(e)
                continue
            self._served(tier)
            return item
        rank = {TransientFetchError: 3, AccessDeniedError: 2, FetchError: 1, NotFoundError: 0}
        worst = max(errors, key=lambda e: rank.get(type(e), 1))
        if len(errors) > 1:
            detail = "; ".join(f"{t}: {type(e).__name__}: {e}" for (t, _, _), e in zip(candidates, errors))
            raise type(worst)(f"no tier served {path!r} ({detail})") from worst
        raise worst

    def _fetch_from_tier(self, tier: str, url: str, options: dict, should_stop: Callable[[], bool],
                         progress: FetchProgress) -> FetchedItem:
        delays = backoff_delays(self.cfg.retries, self.cfg.backoff_base_s, self.cfg.backoff_max_s)
        attempt = 0
        made_room = False
        while True:
            attempt += 1
            progress.attempt(tier, url)
            try:
                return self._fetch_once(tier, url, options, attempt, progress)
            except Exception as e:  # noqa: BLE001 - every storage error is classified below
                if self.cache is not None and _disk_full(e):
                    # the node's disk, not the item: make room once, else stop the rank (see CacheFullError)
                    freed = 0 if made_room else self.cache.make_room()
                    made_room = True
                    if freed:
                        log.warning("node cache disk full while fetching %s: evicted %d bytes, trying again", url,
                                    freed)
                        continue
                    raise CacheFullError(_disk_full_message(self.cfg, self.cache, url, e)) from e
                cls = type(e) if isinstance(e, FetchError) else classify_fs_error(e)
                if cls is not TransientFetchError or attempt > len(delays) or should_stop():
                    if isinstance(e, FetchError):
                        raise
                    raise cls(f"{tier}: {type(e).__name__}: {e}") from e
                with self._counter_lock:
                    self.retries_done += 1
                delay = delays[attempt - 1]
                log.debug("transient error on %s (attempt %d), retrying in %.2fs: %s", url, attempt, delay, e)
                self._sleep(delay)

    def _fetch_once(self, tier: str, url: str, options: dict, attempt: int, progress: FetchProgress) -> FetchedItem:
        fs, rpath = self._filesystem(url, options)
        size = None
        if _protocol(url) not in ("http", "https"):
            # fsspec's HTTP info turns every failure, a 503 too, into FileNotFoundError, and a dynamic endpoint
            # sends no length: an http(s) body is streamed instead, and its GET's status says what went wrong
            info = fs.info(rpath)
            if info.get("type") == "directory":
                raise NotFoundError(f"{tier}: {url} is a directory")
            size = int(info.get("size") or 0)
            if size > self.cfg.max_item_bytes:
                raise FetchError(f"{tier}: {url} is {size} bytes, over storage.max_item_bytes")
        if self.cache is None:
            if _protocol(url) != "file":
                raise FetchError("storage.use_cache=false supports local-filesystem tiers only")
            return FetchedItem(rpath, tier, size, url, attempt)
        tmp = self.cache.tmp_path(url)
        progress.tmp = tmp
        try:
            # the cap holds while the bytes stream too, where no size was listed (an endless response cannot fill
            # the disk); an http(s) body cut short of its Content-Length raises the HTTP stack's payload error
            fs.get_file(rpath, tmp, callback=_ByteCap(self.cfg.max_item_bytes, f"{tier}: {url}"))
            try:
                got = os.path.getsize(tmp)
            except FileNotFoundError as e:  # swept as abandoned while the download was silent (a hung mount)
                raise TransientFetchError(f"{tier}: the partial download of {url} was removed: {e}") from e
            if size is not None and got != size:
                raise TransientFetchError(f"{tier}: short read of {url}: got {got} bytes, listed size {size}")
            path = self.cache.commit(url, tmp, got)
        except BaseException:
            try:
                os.remove(tmp)
            except FileNotFoundError:
                pass
            raise
        return FetchedItem(path, tier, got, url, attempt, lambda: self.cache.release(url))
