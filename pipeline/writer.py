"""Result rows to Parquet part files under the output directory, each committed atomically."""

from __future__ import annotations

import io
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
import pyarrow as pa

from pipeline import part_format
from pipeline.errors import OutputHungError

log = logging.getLogger(__name__)
T = TypeVar("T")

PARTS_DIR = "parts"
TMP_DIR = "_tmp"

RESULT_INFO_TYPE = pa.struct([
    ("succeed", pa.bool_()),
    ("error_type", pa.string()),
    ("error_message", pa.string()),
    ("retryable", pa.bool_()),
    ("start_time", pa.timestamp("us", tz="UTC")),
    ("end_time", pa.timestamp("us", tz="UTC")),
    ("cost_s", pa.float64()),
    ("fetch_s", pa.float64()),
    ("filter_s", pa.map_(pa.string(), pa.float64())),
    ("storage_tier", pa.string()),
    ("bytes", pa.int64()),
    ("fetch_attempts", pa.int32()),
    ("decode_backend", pa.string()),
    ("frames_decoded", pa.int64()),
    ("video_frames_lost", pa.int64()),
    ("audio_packets_lost", pa.int64()),
    ("corrupt_spans", pa.list_(pa.struct([("stream", pa.string()), ("start_s", pa.float64()),
                                          ("end_s", pa.float64())]))),
    ("rank", pa.int32()),
    ("host", pa.string()),
    ("device", pa.string()),
    ("run_id", pa.string()),
])


def result_schema(manifest_schema: pa.Schema, filter_columns: list[tuple[str, pa.DataType]]) -> pa.Schema:
    """Manifest columns (passed through), one struct column per filter, then ``result_info``."""
    names = set(manifest_schema.names)
    fields = list(manifest_schema)
    for name, typ in filter_columns:
        if name in names or name == "result_info":
            from pipeline.errors import ConfigError

            raise ConfigError(f"filter name {name!r} clashes with a manifest column; rename the filter")
        fields.append(pa.field(name, typ))
    fields.append(pa.field("result_info", RESULT_INFO_TYPE))
    return pa.schema(fields)


def case_clashes(fields: list[pa.Field] | pa.Schema, prefix: str = "") -> list[str]:
    """Names of ``fields`` (at any depth of structs) that differ only in case, as ``a / A`` pairs: Spark, whose
    column names are case-insensitive unless ``spark.sql.caseSensitive`` is set, refuses such a file ("The column
    `lang` already exists"), where pyarrow, DuckDB and Polars read it."""
    out, seen = [], {}
    for f in fields:
        name = f"{prefix}{f.name}"
        other = seen.setdefault(f.name.lower(), name)
        if other != name:
            out.append(f"{other} / {name}")
        if pa.types.is_struct(f.type):
            out += case_clashes(list(f.type), f"{name}.")
    return out


def is_local_fs(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def bounded(fn: Callable[[], T], timeout_s: float | None, what: str,
            abandoned: threading.Event | None = None, setting: str = "output.commit_timeout_s") -> T:
    """``fn()`` on a thread of its own, given up after ``timeout_s`` (None: waited for) with ``OutputHungError``:
    a write to a hung mount blocks in the kernel, and no timeout of the filesystem's own ends it. The thread is left
    behind (Python cannot kill it); ``abandoned`` is set when it is, for ``fn`` to check before each step it takes
    once the mount answers again (``commit_bytes``'s ``proceed``: a part given up must not land late). ``setting``
    names the limit in the error."""
    if timeout_s is None:
        return fn()
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - raised on the caller's thread below
            box["error"] = e

    thread = threading.Thread(target=work, daemon=True, name=f"{threading.current_thread().name}-output")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        if abandoned is not None:
            abandoned.set()
        raise OutputHungError(f"{what} did not finish in {setting}={timeout_s:g}s: the output storage "
                              "looks hung (a hung mount, an endpoint that does not answer)")
    if "error" in box:
        raise box["error"]
    return box["value"]


def commit_bytes(fs: fsspec.AbstractFileSystem, final_path: str, data: bytes, tmp_dir: str,
                 proceed: Callable[[], bool] | None = None) -> None:
    """Write ``data`` so that ``final_path`` appears whole or not at all.

    On a filesystem: a temporary file in ``tmp_dir`` renamed into place, unless ``proceed()`` says no once the
    temporary file is written (a commit given up as hung: the file is removed, OutputHungError raised). On an object
    store: one PUT of the final key (never a streaming upload, which commits a partial object when the writer fails
    mid-way).
    """
    if is_local_fs(fs):
        _rename_into_place(fs, final_path, tmp_dir, lambda tmp: fs.pipe_file(tmp, data), proceed)
    else:
        fs.pipe_file(final_path, data)


def commit_file(fs: fsspec.AbstractFileSystem, final_path: str, local_path: str, tmp_dir: str) -> None:
    """``commit_bytes`` for a local file too large to hold in memory: on a filesystem a temporary copy renamed into
    place; on an object store one upload (a multipart one creates the object only when it completes)."""
    if is_local_fs(fs):
        _rename_into_place(fs, final_path, tmp_dir, lambda tmp: fs.put_file(local_path, tmp))
    else:
        fs.put_file(local_path, final_path)


def sync_to_disk(path: str, directory: bool = False) -> None:
    """Flush a local file's data (or a directory's entries) to its disk before the commit counts as done.

    A rename is atomic, but ext4 and XFS write a new file's data late (NFS and Lustre clients cache it): a node that
    lost power after renaming a part into place left its name with zero bytes or cut short, which every later read
    of the output failed on (``pipeline.quarantine`` moves such a part aside where one is met). A filesystem that
    cannot sync a directory (some network ones) is let be; one that cannot sync a file's data fails the commit,
    which is retried.
    """
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if not directory:
            raise
        log.debug("cannot sync the directory %s: %s", path, e)
    finally:
        os.close(fd)


def _rename_into_place(fs: fsspec.AbstractFileSystem, final_path: str, tmp_dir: str, write,
                       proceed: Callable[[], bool] | None = None) -> None:
    """``write(tmp)`` a temporary file in ``tmp_dir``, then rename it to ``final_path`` (if ``proceed()``); on any
    failure the temporary file goes (a full disk would otherwise keep a partial file per retry)."""
    fs.makedirs(tmp_dir, exist_ok=True)
    tmp = f"{tmp_dir}/{final_path.rsplit('/', 1)[-1]}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        write(tmp)
        sync_to_disk(tmp)  # its data before its name: see sync_to_disk
        if proceed is not None and not proceed():
            raise OutputHungError(f"the commit of {final_path} was given up as hung: not renamed into place")
        fs.mv(tmp, final_path)
        sync_to_disk(final_path.rsplit("/", 1)[0] or "/", directory=True)  # the new name
    except BaseException:
        try:
            fs.rm_file(tmp)
        except OSError:
            pass
        raise


def commit_latest_table(fs: fsspec.AbstractFileSystem, root: str, folder: str, run_id: str, table: pa.Table,
                        **parquet_options: Any) -> str:
    """Commit ``table`` as ``<root>/<folder>/<run_id>.parquet`` (whole or not at all) and remove the files earlier
    runs left in that folder (one per run: only the latest is read). Returns the path written."""
    directory = f"{root.rstrip('/')}/{folder}"
    if is_local_fs(fs):
        fs.makedirs(directory, exist_ok=True)
    sink = pa.BufferOutputStream()
    part_format.write_table(table, sink, **{"compression": "zstd", **parquet_options})
    path = f"{directory}/{run_id}.parquet"
    commit_bytes(fs, path, sink.getvalue().to_pybytes(), f"{root.rstrip('/')}/{TMP_DIR}")
    try:
        old = [p for p in fs.ls(directory, detail=False) if p.rstrip("/").rsplit("/", 1)[-1] != f"{run_id}.parquet"]
        if old:
            fs.rm(old)
    except OSError as e:  # an earlier run's file left behind is only disk space
        log.warning("could not remove earlier files in %s: %s", directory, e)
    return path


class ResultWriter:
    """Buffers rows and commits them as ``parts/part-<run>-r<rank>-<seq>.parquet``.

    A part is committed every ``rows_per_file`` rows or ``flush_interval_s`` seconds. A failed commit keeps its
    rows and retries under the same name, so a retry never leaves an orphan with a fresh name.

    Args:
        out_dir: output directory URL.
        storage_options: fsspec options.
        schema: the table schema (see ``result_schema``).
        run_id: this run attempt's id.
        rank: this process's rank.
        rows_per_file: rows per part.
        flush_interval_s: maximum age of buffered rows.
        compression: Parquet codec.
        commit_timeout_s: a part's commit, with its retries, that has not finished after this long raises
            ``OutputHungError``, now and at every later flush (None: no limit).
    """

    def __init__(self, out_dir: str, storage_options: dict, schema: pa.Schema, run_id: str, rank: int,
                 rows_per_file: int = 2000, flush_interval_s: float = 120.0, compression: str = "zstd",
                 commit_retries: int = 5, commit_timeout_s: float | None = None):
        self.fs, self.root = fsspec.core.url_to_fs(out_dir, **storage_options)
        self.root = self.root.rstrip("/")
        self.schema = schema
        self.run_id = run_id
        self.rank = rank
        self.rows_per_file = rows_per_file
        self.flush_interval_s = flush_interval_s
        self.compression = None if compression == "none" else compression
        self.commit_retries = commit_retries
        self.commit_timeout_s = commit_timeout_s
        self._hung: OutputHungError | None = None
        self._rows: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._commit_lock = threading.Lock()
        self._seq = 0
        self._oldest: float | None = None
        self._discarding = False
        self.rows_committed = 0
        self.files_committed = 0
        self.fs.makedirs(f"{self.root}/{PARTS_DIR}", exist_ok=True)
        if is_local_fs(self.fs):
            self.fs.makedirs(f"{self.root}/{TMP_DIR}", exist_ok=True)

    def add(self, row: dict[str, Any]) -> None:
        """Buffer one row; commits a part when the buffer is full."""
        with self._lock:
            if self._discarding:
                return
            self._rows.append(row)
            if self._oldest is None:
                self._oldest = time.monotonic()
            full = len(self._rows) >= self.rows_per_file
        if full:
            self.flush(full_parts_only=True)

    def flush_if_due(self) -> None:
        """Commit buffered rows older than ``flush_interval_s``."""
        with self._lock:
            due = self._oldest is not None and time.monotonic() - self._oldest >= self.flush_interval_s
        if due:
            self.flush()

    @property
    def buffered(self) -> int:
        return len(self._rows)

    def flush(self, full_parts_only: bool = False) -> None:
        """Commit what is buffered as parts of ``rows_per_file`` rows; the remainder too unless
        ``full_parts_only`` (a part is cut by size, so a busy writer does not leave small files behind)."""
        with self._commit_lock:
            while True:
                with self._lock:
                    rows = [] if self._discarding else self._rows[: self.rows_per_file]
                if not rows or (full_parts_only and len(rows) < self.rows_per_file):
                    return
                self._commit(rows)
                with self._lock:
                    del self._rows[: len(rows)]
                    self._oldest = time.monotonic() if self._rows else None

    def _commit(self, rows: list[dict[str, Any]]) -> None:
        if self._hung is not None:
            raise self._hung  # the output hung at an earlier commit: no part is built, no thread is started
        table = pa.Table.from_pylist(rows, schema=self.schema)
        buf = io.BytesIO()
        part_format.write_table(table, buf, compression=self.compression)
        data = buf.getvalue()
        name = f"part-{self.run_id}-r{self.rank:05d}-{self._seq:06d}.parquet"
        final = f"{self.root}/{PARTS_DIR}/{name}"

        abandoned = threading.Event()

        def commit() -> None:
            delay = 0.5
            for attempt in range(self.commit_retries + 1):
                if abandoned.is_set():
                    return  # given up as hung: the rows stay uncommitted, so the part must not land late
                try:
                    commit_bytes(self.fs, final, data, f"{self.root}/{TMP_DIR}", lambda: not abandoned.is_set())
                    return
                except OutputHungError:
                    return  # given up meanwhile: the temporary file was removed, not renamed into place
                except Exception as e:  # noqa: BLE001 - retried, then raised loudly with the rows still buffered
                    if attempt == self.commit_retries:
                        raise
                    log.warning("commit of %s failed (%s: %s), retrying in %.1fs", name, type(e).__name__, e, delay)
                    time.sleep(delay)
                    delay *= 2

        try:
            bounded(commit, self.commit_timeout_s, f"the commit of {final}", abandoned)
        except OutputHungError as e:
            self._hung = e  # every later flush fails at once: the rows stay buffered, for the rerun to redo
            raise
        self._seq += 1
        self.rows_committed += len(rows)
        self.files_committed += 1
        log.debug("committed %s (%d rows)", name, len(rows))

    def discard(self) -> int:
        """Drop the rows not yet committed, and every row added from now on (the output is no longer this run's);
        returns how many were buffered."""
        with self._lock:
            self._discarding = True
            n = len(self._rows)
            self._rows.clear()
            self._oldest = None
        if n:
            log.warning("dropped %d rows not yet committed", n)
        return n

    def close(self) -> None:
        """Commit what is left."""
        self.flush()
