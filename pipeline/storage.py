"""Tiered fetch: node-local cache, then shared-filesystem tiers, then the object store, through fsspec.

Ids never become paths: cache entries are named by a hash of the source URI, and relative manifest paths
that would climb out of their tier's root are rejected.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import random
import re
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import fsspec
from fsspec.callbacks import Callback

from pipeline.config import StorageConfig, TierConfig
from pipeline.errors import (
    AccessDeniedError,
    BadInputError,
    FetchError,
    NotFoundError,
    TransientFetchError,
)

log = logging.getLogger(__name__)

_EXT_RE = re.compile(r"^\.[A-Za-z0-9]{1,10}$")


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
    """

    def __init__(self, root: str, max_bytes: int):
        self.root = root
        self.max_bytes = max_bytes
        self.tmp_dir = os.path.join(root, ".tmp")
        os.makedirs(self.tmp_dir, exist_ok=True)
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, int] = OrderedDict()  # name -> bytes, oldest access first
        self._pins: dict[str, int] = {}
        self._bytes = 0
        self.evictions = 0

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
            if name in self._entries:
                self._bytes -= self._entries.pop(name)
            self._entries[name] = size
            self._bytes += size
            self._pins[name] = self._pins.get(name, 0) + 1
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

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def _forget(self, name: str) -> None:
        if name in self._entries:
            self._bytes -= self._entries.pop(name)

    def _evict_locked(self, incoming: int, keep: str) -> None:
        for name in list(self._entries):
            if self._bytes + incoming <= self.max_bytes:
                return
            if name in self._pins or name == keep:
                continue
            size = self._entries.pop(name)
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


class TieredFetcher:
    """Fetch an item through ordered tiers with retries, landing it in the node cache.

    Args:
        cfg: the storage section of the config.
        cache_share: fraction of the cache byte limit this process may use (1 / local world size).
        sleep: injectable sleep for retry delays.
    """

    def __init__(self, cfg: StorageConfig, cache_share: float = 1.0, sleep: Callable[[float], None] = time.sleep):
        self.cfg = cfg
        self.tiers: list[TierConfig] = list(cfg.tiers)
        self.cache = NodeCache(cfg.cache_dir, int(cfg.cache_max_bytes * cache_share)) if cfg.use_cache else None
        self._sleep = sleep
        self._fs_lock = threading.Lock()
        self._fs: dict[tuple, fsspec.AbstractFileSystem] = {}
        self.retries_done = 0
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

    def fetch(self, path: str, should_stop: Callable[[], bool] = lambda: False) -> FetchedItem:
        """Fetch ``path`` through the cache and the tiers.

        Args:
            path: the manifest path (absolute URL or tier-relative).
            should_stop: polled between retries so shutdown is not held up by backoff.

        Returns:
            The local file with its serving tier.

        Raises:
            BadInputError: unusable path.
            FetchError: the most informative failure over all tiers (transient beats denied beats not found).
        """
        candidates = self.candidates(path)
        errors: list[FetchError] = []
        for tier, url, options in candidates:
            if self.cache is not None:
                hit = self.cache.lookup(url)
                if hit is not None:
                    return FetchedItem(hit[0], "cache", hit[1], url, 0, lambda u=url: self.cache.release(u))
            try:
                return self._fetch_from_tier(tier, url, options, should_stop)
            except FetchError as e:
                errors.append(e)
        rank = {TransientFetchError: 3, AccessDeniedError: 2, FetchError: 1, NotFoundError: 0}
        worst = max(errors, key=lambda e: rank.get(type(e), 1))
        if len(errors) > 1:
            detail = "; ".join(f"{t}: {type(e).__name__}: {e}" for (t, _, _), e in zip(candidates, errors))
            raise type(worst)(f"no tier served {path!r} ({detail})") from worst
        raise worst

    def _fetch_from_tier(self, tier: str, url: str, options: dict, should_stop: Callable[[], bool]) -> FetchedItem:
        delays = backoff_delays(self.cfg.retries, self.cfg.backoff_base_s, self.cfg.backoff_max_s)
        attempt = 0
        while True:
            attempt += 1
            try:
                return self._fetch_once(tier, url, options, attempt)
            except Exception as e:  # noqa: BLE001 - every storage error is classified below
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

    def _fetch_once(self, tier: str, url: str, options: dict, attempt: int) -> FetchedItem:
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
        try:
            # the cap holds while the bytes stream too, where no size was listed (an endless response cannot fill
            # the disk); an http(s) body cut short of its Content-Length raises the HTTP stack's payload error
            fs.get_file(rpath, tmp, callback=_ByteCap(self.cfg.max_item_bytes, f"{tier}: {url}"))
            got = os.path.getsize(tmp)
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
