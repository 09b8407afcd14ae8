"""Per-device pool of exclusive model instances, and node-local copies of model files from any URI."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import posixpath
import queue
import shutil
import threading
import time
import uuid
from typing import Any, Callable, Iterator

import fsspec

from pipeline.errors import ConfigError, ModelTimeout

log = logging.getLogger(__name__)


class ModelPool:
    """K exclusive instances per model on this rank's device, built and warmed up once per process.

    Args:
        device: the rank's device string.
        instances: default instance count per model.
        acquire_timeout_s: default wait for a free instance.
    """

    def __init__(self, device: str, instances: int = 6, acquire_timeout_s: float = 300.0, empty_cache_every: int = 10):
        self.device = device
        self.instances = instances
        self.acquire_timeout_s = acquire_timeout_s
        self.empty_cache_every = empty_cache_every
        self._free: dict[str, queue.LifoQueue] = {}
        self._lock = threading.Lock()
        self._releases = 0
        self.wait_seconds = 0.0

    def add(self, name: str, factory: Callable[[str], Any], warmup: Callable[[Any], None] | None = None,
            instances: int | None = None) -> None:
        """Build ``instances`` copies of a model with ``factory(device)`` and warm each one up.

        Args:
            name: pool key; adding the same name twice keeps the first.
            factory: builds one instance on the device.
            warmup: optional call run once per instance (first-call costs paid before timing starts).
            instances: overrides the pool's default count.
        """
        if name in self._free:
            return
        q: queue.LifoQueue = queue.LifoQueue()
        count = instances or self.instances
        start = time.perf_counter()
        for _ in range(count):
            model = factory(self.device)
            if warmup is not None:
                warmup(model)
            q.put(model)
        self._free[name] = q
        log.info("model %s: %d instance(s) on %s ready in %.2fs", name, count, self.device, time.perf_counter() - start)

    def names(self) -> list[str]:
        return list(self._free)

    @contextlib.contextmanager
    def acquire(self, name: str, timeout: float | None = None) -> Iterator[Any]:
        """Check out one instance exclusively for the ``with`` block.

        Args:
            name: the model's pool key.
            timeout: seconds to wait for a free instance (default: the pool's).

        Raises:
            ModelTimeout: no instance was free in time (the item fails; nothing deadlocks).
        """
        if name not in self._free:
            raise KeyError(f"model {name!r} is not in the pool (have {self.names()})")
        q = self._free[name]
        wait = self.acquire_timeout_s if timeout is None else timeout
        start = time.perf_counter()
        try:
            model = q.get(timeout=wait)
        except queue.Empty:
            raise ModelTimeout(f"no free instance of {name!r} within {wait:.1f}s") from None
        with self._lock:
            self.wait_seconds += time.perf_counter() - start
        try:
            yield model
        finally:
            q.put(model)
            self._after_release()

    def _after_release(self) -> None:
        with self._lock:
            self._releases += 1
            due = self._releases % self.empty_cache_every == 0
        if due and self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()


def is_local(uri: str) -> bool:
    """A local path (plain or ``file://``), used in place rather than copied."""
    return uri.startswith("file://") or "://" not in uri


_VERSION_KEYS = ("ETag", "etag", "md5Hash", "crc32c", "generation", "VersionId", "LastModified", "last_modified",
                 "updated", "mtime", "Content-MD5", "Digest", "Last-Modified")
"""What an fsspec listing says of a file's version, where it says any (S3's ETag, GCS's md5Hash, a mount's mtime,
an HTTP server's ETag or Last-Modified)."""


def source_files(fs, path: str) -> list[tuple[str, int | None, str]]:
    """``(path relative to the model, bytes, version)`` of each file of a model file or directory at its source (a
    file's relative path is ""; bytes None where the source does not say, as for a body served without a length).
    An http(s) URL is a file: its ``isdir`` GETs the URL to look for links, which reads a body served without a type
    whole, on every rank."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if not {"http", "https"} & set(protocols) and fs.isdir(path):
        base = path.rstrip("/") + "/"
        listed = [(p[len(base):], info) for p, info in sorted(fs.find(base, detail=True).items())]
    else:
        listed = [("", fs.info(path))]
    return [(rel, None if info.get("size") is None else int(info["size"]),
             "/".join(str(info[k]) for k in _VERSION_KEYS if info.get(k) is not None)) for rel, info in listed]


def list_source(uri: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str, list]:
    """A model's filesystem, path and ``source_files`` (a local path's too), listed afresh.

    Raises:
        ConfigError: the model does not exist.
    """
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    fs.invalidate_cache(path)  # fsspec shares one instance per options: its listings may predate the file
    if not fs.exists(path):
        raise ConfigError(f"model file {uri} does not exist")
    return fs, path, source_files(fs, path)


def one_file(files: list[tuple[str, int | None, str]]) -> bool:
    """Whether ``source_files`` listed a single file (not a directory)."""
    return len(files) == 1 and files[0][0] == ""


def lists_versions(files: list[tuple[str, int | None, str]]) -> bool:
    """Whether the source says every file's size and version: where it does not (an HTTP server without ETag or
    Last-Modified), the same listing can hide other bytes."""
    return all(size is not None and version for _, size, version in files)


def _copy_holds(target: str, files: list[tuple[str, int | None, str]]) -> bool:
    """Whether the node's copy holds every file of the model at its source's size, where the source says it (a copy
    the node wrote just before it lost power can be empty or cut short: its data reaches the disk after its
    rename)."""
    for rel, size, _version in files:
        try:
            held = os.path.getsize(os.path.join(target, rel) if rel else target)
            if size is not None and held != size:
                return False
        except OSError:
            return False
    return True


SOURCE_SUFFIX = ".source"
"""Beside each node copy, the URL it was copied from: which copies are of the same model."""

EARLIER_COPY_GRACE_S = 600.0
"""An earlier version's copy younger than this stays: a rank of another job that listed the source just before it
changed may be about to load it."""


def _remove_earlier_copies(cache_dir: str, uri: str, kept: str) -> None:
    """Remove this node's copies of earlier versions of ``uri``: no run loads them again, since every run names its
    copy by what the source lists now (copies made before ``SOURCE_SUFFIX`` existed are not known, and stay)."""
    now = time.time()
    for name in os.listdir(cache_dir):
        if not name.endswith(SOURCE_SUFFIX):
            continue
        copy = os.path.join(cache_dir, name[: -len(SOURCE_SUFFIX)])
        if copy == kept:
            continue
        try:
            with open(copy + SOURCE_SUFFIX) as f:
                same = f.read() == uri
            if not same or now - os.path.getmtime(copy) < EARLIER_COPY_GRACE_S:
                continue
        except OSError:  # removed meanwhile (another job's rank on this node), or the copy is gone
            continue
        _remove(copy)
        _remove(copy + SOURCE_SUFFIX)
        log.info("removed the node's copy %s of an earlier version of model %s", copy, uri)


def _remove(path: str) -> None:
    """A file or directory, where it is."""
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def localize_model(uri: str, cache_dir: str, local_rank: int, barrier: Callable[[], None],
                   storage_options: dict | None = None) -> str:
    """Make a model file or directory available on this node and return its local path.

    Local paths are used in place. Remote ones (any fsspec URL) are downloaded once per node by local rank 0
    into ``cache_dir`` (temporary name, then rename) while the node's other ranks wait at ``barrier``; all ranks
    then load the same copy. The copy is named by the URL and by what the source lists of its files (sizes, and
    an ETag or modification time), so weights replaced at the same URL are copied again, not read stale from a
    copy made before; and a copy whose sizes differ from the source's (cut short when the node lost power) is
    replaced. A source that lists no version (or no size) for a file is copied at every call.

    Args:
        uri: a local path or any fsspec URL of a file or directory.
        cache_dir: node-local directory for model copies.
        local_rank: this process's rank on its node.
        barrier: called by every rank after local rank 0's download (a no-op with one process).
        storage_options: fsspec options for the URI.

    Returns:
        The local path.

    Raises:
        ConfigError: the URI does not exist.
    """
    if is_local(uri):
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        if not os.path.exists(path):
            raise ConfigError(f"model file {uri} does not exist")
        return path
    error: Exception | None = None
    target = ""
    try:  # whatever fails, every rank reaches the barrier (the others would wait there for local rank 0)
        fs, path, files = list_source(uri, storage_options)  # every rank lists it (one small request) to name the copy
        digest = hashlib.sha256(repr((uri, files)).encode()).hexdigest()[:16]
        target = os.path.join(cache_dir, f"{digest}-{posixpath.basename(uri.rstrip('/')) or 'model'}")
        # a source that can change unseen under the same listing is copied at every start, over the last copy
        versioned = lists_versions(files)
        if local_rank == 0 and not (versioned and os.path.exists(target) and _copy_holds(target, files)):
            os.makedirs(cache_dir, exist_ok=True)
            if versioned and os.path.exists(target):
                log.warning("the node's copy %s of model %s is not the size of its source (cut short when the node "
                            "lost power?): copied again", target, uri)
                _remove(target)
            tmp = f"{target}.{uuid.uuid4().hex[:8]}.part"
            try:
                if not one_file(files):
                    fs.get(path.rstrip("/") + "/", tmp, recursive=True)
                else:
                    fs.get_file(path, tmp)
                if not _copy_holds(tmp, files):  # a body that ended early without an error
                    raise OSError(f"the copy of model {uri} is not the size its source lists")
            except BaseException:  # cut short, denied: no partial copy left behind in the cache
                _remove(tmp)
                raise
            try:
                os.rename(tmp, target)
            except OSError:  # a concurrent copy won (two jobs on one node): keep theirs
                _remove(tmp)
            with open(target + SOURCE_SUFFIX, "w") as f:
                f.write(uri)
            log.info("model %s copied to node cache %s", uri, target)
            _remove_earlier_copies(cache_dir, uri, target)
    except Exception as e:  # noqa: BLE001 - re-raised after the barrier so other ranks are not left waiting
        error = e
    barrier()
    if error is not None:
        raise error
    if not os.path.exists(target):
        raise ConfigError(f"model {uri} was not copied to {target} by local rank 0")
    return target
