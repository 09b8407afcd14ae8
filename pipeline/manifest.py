"""Read the input manifest (Parquet, JSONL, CSV at any fsspec URL: a file, a dataset's directory, a glob) or list a
storage prefix.

The manifest is streamed once per node, batch by batch, into a node-local Parquet spill with small row groups; the
rows of a work unit are read back from the spill when the unit is taken. Its ids (and the mask of rows to process)
are written beside it as an uncompressed Arrow IPC file that every rank of the node memory-maps: the node holds one
copy of them, in the page cache, however many ranks it runs, and only the ranks that read them page them in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import posixpath
import re
import socket
import urllib.parse
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import fsspec
from fsspec.utils import glob_translate
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from pipeline.config import InputConfig
from pipeline.errors import ConfigError, ManifestError, MediasieveError
from pipeline.portable import changes, portable_batch, portable_type, to_portable
from pipeline.proc import is_alive, parse_process_tag, process_tag

log = logging.getLogger(__name__)

ID = "video_id"
BATCH_ROWS = 65_536
SPILL_GROUP_ROWS = 8_192
SPILL_DIR = "_manifest"


_FORMATS = ((".parquet", "parquet"), (".pq", "parquet"), (".jsonl", "jsonl"), (".ndjson", "jsonl"),
            (".json", "jsonl"), (".csv", "csv"), (".tsv", "csv"))
_COMPRESSED = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}  # what JSONL and CSV exports come in
GLOB_CHARS = "*?["
HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"  # Spark's and Hive's directory name for a null partition value
READ_AHEAD_FILES = 8
READ_AHEAD_MAX_BYTES = 16 << 20  # larger files are streamed batch by batch, one at a time (8 x 16 MB in flight)


@dataclasses.dataclass(frozen=True)
class ManifestFile:
    """One file of the manifest, as read.

    Attributes:
        path: its path on the manifest's filesystem.
        name: its URL, for messages.
        fmt: ``parquet``, ``jsonl`` or ``csv``.
        compression: fsspec's name of the codec the file is wrapped in (``gzip``), or None.
        partition: the ``key=value`` directories between the manifest's root and the file (a Hive or Spark
            partitioned dataset), as (column, value or None) pairs, in path order.
        size: its size as listed (None: not listed), which decides whether it is read ahead.
    """

    path: str
    name: str
    fmt: str
    compression: str | None
    partition: tuple[tuple[str, str | None], ...] = ()
    size: int | None = None


def _glob_base(path: str) -> tuple[int | None, str]:
    """Where a glob's first wildcard is (None: no wildcard), and its fixed part up to the last ``/`` before it (the
    directory an id is taken below; "" where the wildcard is in the first segment or there is none)."""
    magic = min((path.index(ch) for ch in GLOB_CHARS if ch in path), default=None)
    return magic, "" if magic is None else path[: path.rfind("/", 0, magic) + 1]


def _split_compression(url: str) -> tuple[str, str | None]:
    """The name without a compression suffix, and the codec that suffix names (None: none)."""
    name = url.split("?", 1)[0].lower()
    for suffix, codec in _COMPRESSED.items():
        if name.endswith(suffix):
            return name[: -len(suffix)], codec
    return name, None


def _format_of(url: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    name, _codec = _split_compression(url)
    for suffix, kind in _FORMATS:
        if name.endswith(suffix):
            return kind
    raise ConfigError(f"input.format=auto cannot tell the format of {url}; set input.format")


def _compression_of(url: str) -> str | None:
    _name, codec = _split_compression(url)
    if codec is not None and codec not in fsspec.available_compressions():
        raise ConfigError(f"input.manifest {url} is compressed with {codec}, which fsspec cannot read here: "
                          f"pip install {'zstandard' if codec == 'zstd' else codec}")
    return codec


def _hidden(rel: str) -> bool:
    """Hadoop's rule, which Spark, Hive, DuckDB and pyarrow follow: a name beginning with ``_`` or ``.`` at any level
    below the root is not data (``_SUCCESS``, ``_temporary/``, ``.part-0.crc``, ``_committed_*``)."""
    return any(seg.startswith(("_", ".")) for seg in rel.split("/"))


def _partition(rel: str) -> tuple[tuple[str, str | None], ...]:
    found = []
    for seg in rel.split("/")[:-1]:
        key, eq, value = seg.partition("=")
        if eq and key:
            value = urllib.parse.unquote(value)
            found.append((urllib.parse.unquote(key), None if value == HIVE_NULL else value))
    return tuple(found)


def _refuse_table_formats(url: str, rels: list[str]) -> None:
    """A Delta or Iceberg table's directory holds the files its log has removed (overwritten, deleted rows): read
    as plain files, it would bring them back."""
    for rel in rels:
        segs = rel.split("/")
        if "_delta_log" in segs[:-1]:
            raise ConfigError(f"input.manifest {url} is a Delta Lake table (it has a _delta_log): its directory also "
                              "holds the files its log removed; write the table's current snapshot to Parquet "
                              "(Spark, DuckDB's delta extension) and name that")
        if len(segs) >= 2 and segs[-2] == "metadata" and segs[-1].endswith(".metadata.json"):
            raise ConfigError(f"input.manifest {url} is an Apache Iceberg table ({rel}): its data directory also holds "
                              "the files its snapshots removed; write its current snapshot to Parquet and name that")


def _forget_listing(fs: fsspec.AbstractFileSystem, root: str) -> None:
    """Drop what listing ``root`` left in the filesystem's directory cache, its subdirectories' listings included
    (``invalidate_cache`` drops a path and its parents only): an object store's listing is not kept for the life of
    the process."""
    fs.invalidate_cache(root)
    below = fs._strip_protocol(root).rstrip("/") + "/"
    for key in [k for k in fs.dircache if k.startswith(below)]:
        fs.dircache.pop(key, None)


def manifest_files(cfg: InputConfig) -> tuple[fsspec.AbstractFileSystem, list[ManifestFile]]:
    """The files of ``cfg.manifest``: one file; every data file under a directory (a dataset that Spark, DuckDB or
    pyarrow wrote: hidden names skipped, ``key=value`` directories read as partition columns); or those a glob
    matches. Sorted by path, so that every node reads the rows in one order.

    Raises:
        ConfigError: the URL cannot be reached, names nothing, a directory or glob with no data files, a file whose
            format cannot be told, a compression fsspec cannot read, a Delta or Iceberg table.
    """
    url = cfg.manifest
    fs, path = fsspec.core.url_to_fs(url, **cfg.storage_options)
    proto = url.split("://", 1)[0] + "://" if "://" in url else ""
    magic, base = _glob_base(path)
    try:
        if magic is not None and not fs.isfile(path):  # a file named "m[1].parquet" is a file
            listed = {p: info for p, info in fs.glob(path, detail=True).items() if info.get("type") != "directory"}
        elif fs.isdir(path):
            base = path.rstrip("/") + "/"
            listed = fs.find(path, detail=True)
        else:
            if not fs.exists(path):
                raise ConfigError(f"input.manifest {url} does not exist")
            return fs, [ManifestFile(path, url, _format_of(url, cfg.format), _compression_of(url))]
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - any error here means the manifest is not readable
        raise ConfigError(f"input.manifest {url} cannot be reached: {type(e).__name__}: {e}") from e
    finally:
        _forget_listing(fs, base or path)
    found = sorted(listed)
    rels = [p[len(base):] if p.startswith(base) else posixpath.basename(p) for p in found]
    _refuse_table_formats(url, rels)
    files = []
    for p, rel in zip(found, rels):
        if _hidden(rel):
            continue
        name = proto + p if proto else p
        files.append(ManifestFile(p, name, _format_of(name, cfg.format), _compression_of(name), _partition(rel),
                                  listed[p].get("size")))
    if not files:
        raise ConfigError(f"input.manifest {url} holds no data files"
                          f"{f' ({len(found)} hidden: names beginning with _ or .)' if found else ''}")
    keys = [k for k, _v in files[0].partition]
    for f in files[1:]:
        if [k for k, _v in f.partition] != keys:
            raise ConfigError(f"input.manifest {url}: {f.name} is partitioned by {[k for k, _v in f.partition]}, "
                              f"{files[0].name} by {keys}: one dataset has one layout of key=value directories")
    return fs, files


def check_input_exists(cfg: InputConfig) -> None:
    """Fail fast (ConfigError) when the manifest names no readable data file (``manifest_files``)."""
    if cfg.manifest:
        manifest_files(cfg)


class _TypesChange(Exception):
    """A CSV or JSONL file whose columns change type after the reader's first block (internal: the spill is built
    again with the file read whole)."""

    def __init__(self, file: ManifestFile, error: Exception):
        super().__init__(f"{file.name}: {error}")
        self.file = file


_TYPE_CHANGES = ("CSV conversion error to", "changed from", "unexpected field", "Failed to convert JSON to")
"""What pyarrow's streaming CSV and JSON readers say where a later block's values do not fit the types they took
from the first (a column empty in the first megabyte and filled later, a number then ``2.5`` or ``unknown``, a
JSON field that first appears later)."""


def _csv_options(f: ManifestFile, cfg: InputConfig) -> tuple[pacsv.ParseOptions, pacsv.ConvertOptions]:
    delimiter = "\t" if _split_compression(f.name)[0].endswith(".tsv") else ","
    # ids and paths stay strings even when they look like numbers
    return (pacsv.ParseOptions(delimiter=delimiter),
            pacsv.ConvertOptions(column_types={cfg.id_column: pa.string(), cfg.path_column: pa.string()}))


def _read_whole(src, f: ManifestFile, cfg: InputConfig) -> Iterator[pa.RecordBatch]:
    """A CSV or JSONL file read at once, its columns' types unified over all its rows (pyarrow's whole-file readers
    widen a type where a later block needs it: null to a number, an integer to a float, anything to a string in a
    CSV, a struct to one with more fields); a JSON field holding values of two kinds (a number, then "n/a") is
    read with Python's json, its values as strings (JSON text for what is not one)."""
    if f.fmt == "csv":
        parse, convert = _csv_options(f, cfg)
        table = pacsv.read_csv(src, parse_options=parse, convert_options=convert)
    else:
        data = src.read()
        try:
            table = pajson.read_json(pa.BufferReader(data))
        except pa.ArrowInvalid:
            table = _json_lines(data, f)
    yield from table.to_batches(BATCH_ROWS)


def _json_lines(data: bytes, f: ManifestFile) -> pa.Table:
    rows = [json.loads(line) for line in data.splitlines() if line.strip()]
    columns: dict[str, pa.Array] = {}
    for key in dict.fromkeys(k for row in rows for k in row):
        values = [row.get(key) for row in rows]
        try:
            columns[key] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            log.warning("manifest %s: field %r holds values of more than one kind: read as strings", f.name, key)
            columns[key] = pa.array([v if v is None or isinstance(v, str) else json.dumps(v) for v in values],
                                    pa.string())
    return pa.table(columns)


def _read_file(fs: fsspec.AbstractFileSystem, f: ManifestFile, cfg: InputConfig,
               whole: frozenset[str] = frozenset()) -> Iterator[pa.RecordBatch]:
    try:
        with fs.open(f.path, "rb", compression=f.compression) as src:
            if f.fmt == "parquet":
                yield from pq.ParquetFile(src).iter_batches(batch_size=BATCH_ROWS)
            elif f.path in whole or (f.size is not None and f.size <= READ_AHEAD_MAX_BYTES):
                # a small file is held whole anyway (read ahead): its types unified at once, where a type change
                # after its first block would have the whole manifest read again (in a dataset of thousands of
                # such files, once per file)
                yield from _read_whole(src, f, cfg)
            else:
                try:
                    if f.fmt == "jsonl":
                        yield from pajson.open_json(src)
                    else:
                        parse, convert = _csv_options(f, cfg)
                        yield from pacsv.open_csv(src, parse_options=parse, convert_options=convert)
                except pa.ArrowInvalid as e:
                    if any(said in str(e) for said in _TYPE_CHANGES):
                        raise _TypesChange(f, e) from e
                    raise
    except FileNotFoundError as e:
        raise ManifestError(f"manifest file {f.name} is gone (listed at the start, then removed: is the manifest "
                            "being rewritten?)") from e
    except (pa.ArrowInvalid, OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"cannot read manifest {f.name} as {f.fmt}: {e}") from e


def _file_batches(cfg: InputConfig, whole: frozenset[str] = frozenset()) -> Iterator[tuple[pa.RecordBatch,
                                                                                            ManifestFile]]:
    """Every file's batches, in path order; up to ``READ_AHEAD_FILES`` small files are read ahead in threads (a
    dataset of thousands of files on an object store otherwise waits out a request's latency for each in turn).
    The CSV and JSONL files in ``whole`` are read at once (``_read_whole``)."""
    fs, files = manifest_files(cfg)

    def at_once(f: ManifestFile) -> list[pa.RecordBatch]:
        return list(_read_file(fs, f, cfg, whole))

    with ThreadPoolExecutor(READ_AHEAD_FILES, thread_name_prefix="manifest-read") as pool:
        ahead: dict[int, Future] = {}
        try:
            for i, f in enumerate(files):
                for j in range(i, min(i + READ_AHEAD_FILES, len(files))):
                    small = files[j].size is not None and files[j].size <= READ_AHEAD_MAX_BYTES
                    if small and j not in ahead and len(files) > 1:
                        ahead[j] = pool.submit(at_once, files[j])
                read = ahead.pop(i, None)
                for batch in read.result() if read is not None else _read_file(fs, f, cfg, whole):
                    for key, value in f.partition:
                        if key not in batch.schema.names:  # Spark leaves partition columns out of the files
                            batch = batch.append_column(key, pa.array([value] * batch.num_rows, pa.string()))
                    yield batch, f
        finally:
            for read in ahead.values():
                read.cancel()


LIST_PAGE = 1000  # S3's largest page of a listing


def _s3_listing(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[list[str]]:
    """Pages of the objects a glob matches on S3, in key order, one LIST page at a time.

    ``fs.glob`` builds an info dict of every object below the glob's fixed prefix (1.4 KB each in
    ``bench_listing.py``: some 14 GB for 10M objects) and keeps the listing in the filesystem's directory cache for
    the life of the process; this holds one page, and the ids and paths of one batch as Python strings.
    """
    magic, _base = _glob_base(path)
    bucket, slash, _rest = path.partition("/")
    if not slash or magic <= len(bucket):
        raise ConfigError(f"a glob over S3 names its bucket without wildcards, not {path!r}")
    match = re.compile(glob_translate(path)).match
    request = {"Bucket": bucket, "Prefix": path[len(bucket) + 1:magic], "MaxKeys": LIST_PAGE}
    if "**" not in path and "/" not in path[magic:]:
        request["Delimiter"] = "/"  # one level: what lies deeper cannot match
    while True:
        page = fs.call_s3("list_objects_v2", **request)
        names = (f"{bucket}/{o['Key']}" for o in page.get("Contents", []) if not o["Key"].endswith("/"))
        yield [name for name in names if match(name)]
        if not page.get("IsTruncated"):
            return
        request["ContinuationToken"] = page["NextContinuationToken"]


def _listing_batches(cfg: InputConfig) -> Iterator[tuple[pa.RecordBatch, ManifestFile]]:
    pattern = cfg.listing_glob
    fs, path = fsspec.core.url_to_fs(pattern, **cfg.storage_options)
    proto = pattern.split("://", 1)[0] + "://" if "://" in pattern else ""
    magic, base = _glob_base(path)
    try:
        if magic is not None and "s3" in fs.protocol and hasattr(fs, "call_s3"):
            pages = _s3_listing(fs, path)
        else:  # a shared filesystem, another store: its own glob, whole
            found = fs.glob(path, detail=True)
            pages = iter([sorted(p for p, info in found.items() if info.get("type") != "directory")])
        listing = ManifestFile(pattern, f"the listing of {pattern}", "listing", None)
        ids: list[str] = []
        paths: list[str] = []
        sent = False
        for page in pages:
            for name in page:
                ids.append(name[len(base):] if base and name.startswith(base) else name)
                paths.append(proto + name if proto else name)
            while len(ids) >= BATCH_ROWS:
                yield (pa.record_batch({cfg.id_column: pa.array(ids[:BATCH_ROWS], pa.string()),
                                        cfg.path_column: pa.array(paths[:BATCH_ROWS], pa.string())}), listing)
                del ids[:BATCH_ROWS], paths[:BATCH_ROWS]
                sent = True
        if ids or not sent:  # an empty listing is still a manifest with its columns
            yield (pa.record_batch({cfg.id_column: pa.array(ids, pa.string()),
                                    cfg.path_column: pa.array(paths, pa.string())}), listing)
    except ValueError as e:  # a glob the filesystem refuses
        raise ConfigError(f"input.listing_glob {pattern!r}: {e}") from e


def list_glob(cfg: InputConfig) -> pa.Table:
    """The objects ``cfg.listing_glob`` matches, as a manifest (id: the path below the glob's fixed prefix).

    Raises:
        ConfigError: a glob the filesystem refuses.
    """
    return pa.Table.from_batches([batch for batch, _listing in _listing_batches(cfg)])


LISTING_DIR = "_listing"


def snapshot_listing(cfg: InputConfig, out_dir: str, storage_options: dict, run_id: str) -> InputConfig:
    """Rank 0: list ``cfg.listing_glob`` once for the whole run into ``<output>/_listing/<run_id>.parquet`` and
    return an input config that reads that file. Every rank listing a prefix of millions of objects itself would
    multiply the LIST requests, and the start of every attempt, by the world size. Earlier runs' snapshots go.

    Args:
        cfg: the input section, in listing mode.
        out_dir: the output directory URL (every rank of every node reads it).
        storage_options: its fsspec options.
        run_id: this run's id.

    Returns:
        ``cfg`` with ``manifest`` the snapshot and no ``listing_glob``.

    Raises:
        ConfigError: a glob the filesystem refuses.
        ManifestError: the listing or the snapshot failed (typed, so that every rank stops with it).
    """
    from pipeline.writer import commit_latest_table

    fs, root = fsspec.core.url_to_fs(out_dir, **storage_options)
    path = f"{root.rstrip('/')}/{LISTING_DIR}/{run_id}.parquet"
    try:
        table = list_glob(cfg)
        commit_latest_table(fs, root, LISTING_DIR, run_id, table)
    except MediasieveError:
        raise
    except Exception as e:  # noqa: BLE001 - typed, so that every rank stops with it instead of waiting for rank 0
        raise ManifestError(f"cannot list {cfg.listing_glob} into {path}: {type(e).__name__}: {e}") from e
    log.info("listed %d objects under %s once for every rank: %s", table.num_rows, cfg.listing_glob, path)
    url = out_dir.rstrip("/") + f"/{LISTING_DIR}/{run_id}.parquet"
    return dataclasses.replace(cfg, manifest=url, format="parquet", listing_glob=None, storage_options=storage_options)


def _normalise(batch: pa.RecordBatch, cfg: InputConfig, row: int, source: ManifestFile) -> pa.RecordBatch:
    """Id and path as strings, no null id; ``row``: the batch's first row within ``source``."""
    for col in (cfg.id_column, cfg.path_column):
        if col not in batch.schema.names:
            raise ManifestError(f"manifest {source.name} has no column {col!r}; its columns are {batch.schema.names}")
    arrays = list(batch.columns)
    for col in (cfg.id_column, cfg.path_column):
        i = batch.schema.get_field_index(col)
        # a UUID as its canonical string (cast as it is, its 16 bytes were taken for UTF-8)
        arrays[i] = pc.cast(to_portable(arrays[i], portable_type(arrays[i].type)), pa.string())
    batch = pa.RecordBatch.from_arrays(arrays, names=batch.schema.names)
    nulls = batch.column(cfg.id_column).null_count
    if nulls:
        first = row + pc.index(pc.is_null(batch.column(cfg.id_column)), True).as_py()
        raise ManifestError(f"manifest {source.name} has a null {cfg.id_column} at its row {first}")
    return batch


def _say_retyped(schema: pa.Schema, keep: set[str], said: set[str], source: ManifestFile) -> None:
    """Log, once per column, that a manifest column will be written in another type (``pipeline.portable``)."""
    new = [c for c in changes(pa.schema([f for f in schema if f.name not in keep])) if c not in said]
    if new:
        said.update(new)
        log.warning("manifest %s: column(s) %s written to the rows in types that every reader of the output reads "
                    "(Spark refuses nanosecond timestamps, times of day, float16 and UUIDs; input.portable_types="
                    "false keeps them as read)", source.name, "; ".join(new))


class _Widen(Exception):
    """A later file of the manifest holds a column the spill's schema lacks, or one of a wider type (internal: the
    spill is built again in the wider schema)."""

    def __init__(self, columns: dict[str, pa.DataType], source: ManifestFile):
        super().__init__(f"{source.name}: {', '.join(f'{n} ({t})' for n, t in columns.items())}")
        self.columns = columns
        self.source = source


def _widened(field: pa.Field, other: pa.DataType) -> pa.DataType | None:
    """The type that holds values of ``field``'s type and ``other`` (Arrow's permissive promotion: null to
    anything, a narrower integer or float to a wider one, an integer to a float, a struct to one with more fields),
    or None where none does (a number and a string)."""
    try:
        return pa.unify_schemas([pa.schema([field]), pa.schema([field.with_type(other)])],
                                promote_options="permissive").field(0).type
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return None


def _conform(batch: pa.RecordBatch, schema: pa.Schema, source: ManifestFile, first: ManifestFile,
             missing_said: set[str]) -> pa.RecordBatch:
    """``batch`` in the spill's schema (the first file's, widened where later files need it): a column that the
    schema has and this file lacks is null in its rows (a dataset whose later files were written before a column was
    added); a column the schema lacks, or one of a wider type (a column all null in the first file, int32 then
    int64), raises ``_Widen`` for the spill to be built again in the wider schema; a column whose values do not cast
    to the schema's type (a number, then a string) stops the job."""
    if batch.schema == schema:
        return batch
    wider: dict[str, pa.DataType] = {}
    for field in batch.schema:
        if field.name not in schema.names:
            wider[field.name] = field.type
            continue
        mine = schema.field(field.name)
        if field.type.equals(mine.type):
            continue
        promoted = _widened(mine, field.type)  # None: no wider type; the values may still cast (below)
        if promoted is not None and not promoted.equals(mine.type):
            wider[field.name] = promoted
    if wider:
        raise _Widen(wider, source)
    missing = [n for n in schema.names if n not in batch.schema.names]
    if missing and source.name not in missing_said:
        missing_said.add(source.name)
        log.warning("manifest %s has no column(s) %s: null in its rows", source.name, missing)
    arrays = []
    for field in schema:
        if field.name in missing:
            arrays.append(pa.nulls(batch.num_rows, field.type))
            continue
        column = batch.column(field.name)
        try:
            arrays.append(column if column.type == field.type else pc.cast(column, field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as e:
            raise ManifestError(f"manifest {source.name}: column {field.name!r} is {column.type}, in {first.name} "
                                f"{field.type}, and does not cast: {e}") from e
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _widen_first(batch: pa.RecordBatch, widen: dict[str, pa.DataType]) -> pa.RecordBatch:
    """The first batch in the schema that later files need: its columns cast to their wider types, and the columns
    only later files have added (null in its rows)."""
    if not widen:
        return batch
    arrays = [pc.cast(c, widen[n]) if n in widen else c for n, c in zip(batch.schema.names, batch.columns)]
    names = list(batch.schema.names)
    for name, typ in widen.items():
        if name not in names:
            arrays.append(pa.nulls(batch.num_rows, typ))
            names.append(name)
    return pa.RecordBatch.from_arrays(arrays, names=names)


class ManifestDigest:
    """What a node read of the manifest: its rows, files and a digest of every id and path in order. Nodes that read
    different rows (a manifest rewritten, or files added, while the job started; a mount that shows a node other
    files) would otherwise process different items at the same positions.

    The digest does not depend on how the rows were cut into batches (a value stream and a length stream per
    column), so nodes whose readers batch differently agree where the rows do.
    """

    def __init__(self) -> None:
        self.rows = 0
        self.files = 0
        self._streams = [hashlib.sha256() for _ in range(5)]  # SHA-NI: about twice BLAKE2's pace here

    def update(self, ids: pa.Array, paths: pa.Array) -> None:
        """Add a batch's ids (no nulls) and paths (strings)."""
        first = self.rows
        self.rows += len(ids)
        values_id, lengths_id, values_path, lengths_path, nulls = self._streams
        for column, values, lengths in ((ids, values_id, lengths_id), (paths, values_path, lengths_path)):
            if column.null_count:  # where the nulls are, by row of the whole manifest
                mask = column.is_null().to_numpy(zero_copy_only=False)
                nulls.update((np.flatnonzero(mask) + first).astype("<i8").tobytes())
                column = pc.fill_null(column, "")
            offsets = np.frombuffer(column.buffers()[1], np.int32, len(column) + 1, column.offset * 4)
            data = column.buffers()[2]
            if data is not None and offsets[-1] > offsets[0]:
                values.update(memoryview(data)[offsets[0]:offsets[-1]])
            lengths.update(np.diff(offsets).astype("<i8").tobytes())

    def summary(self) -> dict[str, Any]:
        """``rows``, ``files`` and ``digest`` (hex), as JSON."""
        whole = hashlib.sha256()
        for stream in self._streams:
            whole.update(stream.digest())
        return {"rows": self.rows, "files": self.files, "digest": whole.hexdigest()[:32]}


def _duplicates(ids: pa.ChunkedArray) -> tuple[np.ndarray, list[str], int]:
    """Positions of later occurrences of repeated ids, some repeated ids, and how many ids repeat.

    Sort-based, in slices: no hash table over every id and no second copy of the column.
    """
    order = pc.sort_indices(ids)  # stable: equal ids keep manifest order, so the first occurrence comes first
    later: list[np.ndarray] = []
    names: list[str] = []
    n_repeated = 0
    carry = False  # whether the previous slice ended inside a run of equal ids (slices overlap by one id)
    step = BATCH_ROWS
    for start in range(0, len(order) - 1, step):
        idx = order.slice(start, step + 1)
        run = ids.take(idx)
        same = pc.equal(run.slice(1), run.slice(0, len(run) - 1)).to_numpy(zero_copy_only=False)
        if same.any():
            hit = np.flatnonzero(same) + 1
            later.append(idx.to_numpy()[hit])
            prev_same = np.concatenate([[carry], same[:-1]])
            starts = np.flatnonzero(same & ~prev_same)  # the first repeat of each run of equal ids
            n_repeated += len(starts)
            if len(names) < 10:
                names.extend(run.take(pa.array(starts[: 10 - len(names)])).to_pylist())
        carry = bool(same[-1]) if len(same) else False
    pos = np.sort(np.concatenate(later)) if later else np.empty(0, np.int64)
    return pos, names, n_repeated


class Manifest:
    """The manifest of one run, attached to a spill that ``build_spill`` made: the ids memory-mapped, every row read
    back from the spill per work unit.

    Attributes:
        ids: the id column (strings, manifest order, duplicates included), memory-mapped from the ids file.
        keep: a boolean mask over ``ids`` of the rows to process (None when every row is kept).
        schema: the manifest's schema with id and path cast to strings.
        protocols: the URL schemes of the absolute paths (``s3``, ``gs``, ``https``; plain paths are not counted).
        read: what the node read (``ManifestDigest.summary``: rows, files, digest), which every node compares.
        spill_path: the spill's path (the ids file is ``ids_path(spill_path)``).
    """

    def __init__(self, spill_path: str, owner: bool = True):
        """Attach to ``spill_path``; ``owner``: ``close`` removes the spill and its ids file (the rank that built
        them; the node's other ranks only close their handles, which stay valid after the owner's removal)."""
        self.spill_path = spill_path
        self.owner = owner
        self._file = pq.ParquetFile(spill_path)
        try:
            with pa.memory_map(ids_path(spill_path), "r") as source:
                table = pa.ipc.open_file(source).read_all()  # zero-copy: the arrays point into the mapping
        except BaseException:
            self._file.close()
            raise
        self.ids = table.column("id")
        self.keep = table.column("keep").combine_chunks() if "keep" in table.column_names else None
        said = table.schema.metadata or {}
        self.protocols = frozenset(json.loads(said.get(b"protocols", b"[]")))
        self.read: dict[str, Any] = json.loads(said.get(b"read", b"{}"))
        self.schema = self._file.schema_arrow
        meta = self._file.metadata
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._cache: OrderedDict[int, pa.Table] = OrderedDict()

    def __len__(self) -> int:
        """Rows to process (after dropping duplicates and applying the limit)."""
        return len(self.ids) if self.keep is None else int(pc.sum(self.keep).as_py() or 0)

    def kept_ids(self) -> pa.ChunkedArray | pa.Array:
        """The ids of the rows to process."""
        return self.ids if self.keep is None else self.ids.filter(self.keep)

    def _group(self, g: int) -> pa.Table:
        table = self._cache.pop(g, None)
        if table is None:
            table = self._file.read_row_group(g)
            if len(self._cache) >= 2:
                self._cache.popitem(last=False)
        self._cache[g] = table
        return table

    def rows(self, positions: pa.Array | np.ndarray) -> list[dict[str, Any]]:
        """The rows at ascending positions of ``ids``, as dicts, read from the spill (not thread-safe)."""
        pos = np.asarray(positions.to_numpy() if isinstance(positions, pa.Array) else positions, np.int64)
        if len(pos) and np.any(np.diff(pos) < 0):
            raise ValueError("manifest rows are read at ascending positions")
        groups = np.searchsorted(self._starts, pos, side="right") - 1
        out: list[dict[str, Any]] = []
        for g in np.unique(groups):
            local = pos[groups == g] - self._starts[g]
            out.extend(self._group(int(g)).take(pa.array(local)).to_pylist())
        return out

    def to_table(self) -> pa.Table:
        """Every kept row (small manifests and tests; the job reads per unit)."""
        table = self._file.read()
        return table if self.keep is None else table.filter(self.keep)

    def close(self) -> None:
        """Close the spill; the owner also removes it and its ids file."""
        self._cache.clear()
        self._file.close()
        self.ids = self.keep = None  # the mapping is unmapped once nothing points into it
        if self.owner:
            remove_spill(self.spill_path)


def spill_read(spill_path: str) -> dict[str, Any]:
    """What the node read into ``spill_path`` (``ManifestDigest.summary``), from its ids file's metadata."""
    with pa.memory_map(ids_path(spill_path), "r") as source:
        said = pa.ipc.open_file(source).schema.metadata or {}
    return json.loads(said.get(b"read", b"{}"))


def nodes_disagree(reads: dict[int, tuple[str, dict[str, Any]]]) -> str | None:
    """Why the nodes' manifests differ, or None where every node read the same rows.

    Args:
        reads: by node rank, its host and what it read (``ManifestDigest.summary``).
    """
    if not reads:
        return None
    first = min(reads)
    host0, read0 = reads[first]
    others = [(node, host, read) for node, (host, read) in sorted(reads.items()) if read != read0]
    if not others:
        return None

    def said(read: dict[str, Any]) -> str:
        return f"{read.get('rows', 0):,} rows from {read.get('files', 0)} file(s)"

    shown = [f"node {node} ({host}) {said(read) if said(read) != said(read0) else 'as many, with other ids or paths'}"
             for node, host, read in others[:4]]
    more = f" and {len(others) - 4} more" if len(others) > 4 else ""
    return (f"the nodes read different manifests: node {first} ({host0}) read {said(read0)}, {', '.join(shown)}{more}. "
            "The manifest changed while the job started (files still being written or replaced?) or the nodes see "
            "different files (another mount, a stale cache); they would process different items at the same "
            "positions. Every rank stops before any work: rerun once the manifest is whole and the same on every "
            "node")


def ids_path(spill_path: str) -> str:
    """The ids file beside a spill: ``<tag>-ids__<host>__<process>.arrow`` (the stale-spill sweep reads the same
    host and process fields)."""
    folder, name = os.path.split(spill_path)
    tag, rest = name.split("__", 1)
    return os.path.join(folder, f"{tag}-ids__{rest.rsplit('.', 1)[0]}.arrow")


def remove_spill(spill_path: str) -> None:
    """Remove a spill and its ids file (either may be missing)."""
    for path in (spill_path, ids_path(spill_path)):
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def _write_ids(path: str, ids: pa.ChunkedArray, keep: pa.Array | None, protocols: set[str],
               read: dict[str, Any]) -> None:
    """The ids (and the keep mask) as an uncompressed Arrow IPC file, for ``pa.memory_map``; ``read``: the
    ``ManifestDigest`` summary of what was read."""
    columns = {"id": ids} if keep is None else {"id": ids, "keep": pa.chunked_array([keep])}  # chunked apart: no copy
    table = pa.table(columns).replace_schema_metadata({"protocols": json.dumps(sorted(protocols)),
                                                       "read": json.dumps(read)})
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def url_schemes(paths: pa.Array) -> set[str]:
    """The distinct URL schemes (lower case) among ``paths``: one vectorised pass, no Python loop per row."""
    found = pc.extract_regex(paths, r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://")
    schemes = pc.unique(pc.utf8_lower(pc.struct_field(found, "scheme"))).drop_null()
    return set(schemes.to_pylist())


def _remove_stale_spills(spill_dir: str) -> None:
    """Remove spills of dead processes on this host (a crashed run leaves its spill behind)."""
    host = socket.gethostname()
    try:
        names = os.listdir(spill_dir)
    except FileNotFoundError:
        return
    for name in names:
        parts = name.rsplit(".", 1)[0].split("__")
        if len(parts) != 3 or parts[1] != host:
            continue
        try:
            pid, ticks = parse_process_tag(parts[2])
        except ValueError:
            continue
        if not is_alive(pid, ticks):
            try:
                os.remove(os.path.join(spill_dir, name))
            except FileNotFoundError:
                pass


def open_manifest(cfg: InputConfig, spill_dir: str, tag: str = "manifest") -> Manifest:
    """Stream the manifest into a node-local spill and attach to it (one process: ``status``, tests; the job builds
    one spill per node with ``build_spill`` and every rank of the node attaches with ``Manifest(path, owner)``).

    Args:
        cfg: the input section of the config.
        spill_dir: a node-local directory for the spill (``<storage.cache_dir>/_manifest`` in the job).
        tag: a name for the spill file.

    Returns:
        The manifest; close it to remove the spill.

    Raises:
        as ``build_spill``.
    """
    spill_path = build_spill(cfg, spill_dir, tag)
    try:
        return Manifest(spill_path, owner=True)
    except BaseException:
        remove_spill(spill_path)
        raise


def build_spill(cfg: InputConfig, spill_dir: str, tag: str = "manifest") -> str:
    """Stream the manifest into a node-local spill, with its ids and the mask of rows to process in an ids file
    beside it, and return the spill's path (``Manifest`` attaches to it).

    Args:
        cfg: the input section of the config.
        spill_dir: a node-local directory for the spill.
        tag: a name for the spill file (the job uses the run id and node).

    Raises:
        ConfigError: the spill directory cannot be made.
        ManifestError: unreadable file, missing id/path column, null ids, or duplicate ids when
            ``on_duplicate_ids=error``.
        MediasieveError: the spill cannot be written (a full disk); nothing is left behind.
    """
    try:
        os.makedirs(spill_dir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the manifest spill directory {spill_dir}: {e} "
                          "(storage.cache_dir must be a writable node-local directory)") from e
    _remove_stale_spills(spill_dir)
    spill_path = os.path.join(spill_dir, f"{tag}__{socket.gethostname()}__{process_tag()}.parquet")
    whole: set[str] = set()
    widen: dict[str, pa.DataType] = {}
    while True:  # the rows read so far went into the spill in types a later value does not fit: built again
        try:
            return _build_spill(cfg, spill_path, frozenset(whole), dict(widen))
        except _TypesChange as e:
            whole.add(e.file.path)
            log.warning("manifest %s: values that do not fit the types its reader took from its first block (%s): "
                        "the manifest is read again, that file whole, its types unified over all its rows (held in "
                        "memory while read)", e.file.name, e.__cause__)
        except _Widen as e:
            if all(widen.get(n) is not None and widen[n].equals(t) for n, t in e.columns.items()):
                raise ManifestError(f"manifest {e}: the columns do not widen") from e  # never: no loop for good
            widen.update(e.columns)
            log.warning("manifest %s has column(s) %s that the files before it do not hold, or in a wider type: "
                        "the manifest is read again with them (null in the rows of files without them)",
                        e.source.name, "; ".join(f"{n} ({t})" for n, t in e.columns.items()))


def _build_spill(cfg: InputConfig, spill_path: str, whole: frozenset[str], widen: dict[str, pa.DataType]) -> str:
    batches = _listing_batches(cfg) if cfg.listing_glob else _file_batches(cfg, whole)
    writer: pq.ParquetWriter | None = None
    id_chunks: list[pa.Array] = []
    protocols: set[str] = set()
    digest = ManifestDigest()
    first: ManifestFile | None = None
    current: ManifestFile | None = None
    row = 0  # within the current file
    missing_said: set[str] = set()
    retyped: set[str] = set()  # "column (type -> type)", said once
    truncated: set[str] = set()
    strings = {cfg.id_column, cfg.path_column}  # made strings by _normalise
    try:
        for raw, source in batches:
            if source is not current:
                current, row = source, 0
                digest.files += 1
                if cfg.portable_types:
                    _say_retyped(raw.schema, strings, retyped, source)
            batch = _normalise(raw, cfg, row, source)
            if cfg.portable_types:
                batch = portable_batch(batch, strings, truncated)
            row += batch.num_rows
            if writer is None:
                first = source
                batch = _widen_first(batch, widen)
                writer = pq.ParquetWriter(spill_path, batch.schema, compression="lz4")
            else:
                batch = _conform(batch, writer.schema, source, first, missing_said)
            writer.write_batch(batch, row_group_size=SPILL_GROUP_ROWS)
            id_chunks.append(batch.column(cfg.id_column))
            digest.update(batch.column(cfg.id_column), batch.column(cfg.path_column))
            protocols |= url_schemes(batch.column(cfg.path_column))
        if writer is None:  # an empty manifest (or an empty listing) still has its columns
            schema = pa.schema([(cfg.id_column, pa.string()), (cfg.path_column, pa.string())])
            writer = pq.ParquetWriter(spill_path, schema)
        writer.close()
    except BaseException as e:
        if writer is not None:
            try:
                writer.close()
            except (OSError, pa.ArrowException):
                pass
        remove_spill(spill_path)
        if isinstance(e, pa.ArrowNotImplementedError):  # a type Parquet cannot hold: the spill's, and the output's
            fix = "" if cfg.portable_types else "input.portable_types=true writes it in a type that it can, or "
            raise ManifestError(f"the manifest has a column that Parquet cannot hold ({e}); {fix}drop it from the "
                                "manifest") from e
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
            # reading errors are ManifestErrors already: an OSError here is the spill's disk (full, gone)
            raise MediasieveError(f"cannot write the manifest spill {spill_path}: {e}") from e
        raise
    if truncated:
        log.warning("manifest column(s) %s hold times below a microsecond: written to the rows in microseconds, "
                    "the digits below dropped", sorted(truncated))
    ids = pa.chunked_array(id_chunks, pa.string())
    keep = None
    later, names, n_repeated = _duplicates(ids)
    if len(later):
        if cfg.on_duplicate_ids == "error":
            os.remove(spill_path)
            shown = ", ".join(repr(d) for d in names)
            raise ManifestError(
                f"manifest has {n_repeated} duplicate id(s): {shown}{' ...' if n_repeated > len(names) else ''} "
                "(set input.on_duplicate_ids=drop to keep the first of each)"
            )
        log.warning("dropping later rows of %d duplicate id(s), e.g. %r", n_repeated, names[:5])
        mask = np.ones(len(ids), bool)
        mask[later] = False
        keep = pa.array(mask)
    if cfg.limit is not None and cfg.limit < len(ids):
        mask = np.ones(len(ids), bool) if keep is None else keep.to_numpy(zero_copy_only=False).copy()
        kept = np.flatnonzero(mask)
        mask[kept[cfg.limit:]] = False
        keep = pa.array(mask)
    try:
        _write_ids(ids_path(spill_path), ids, keep, protocols, digest.summary())
    except BaseException as e:
        remove_spill(spill_path)
        if isinstance(e, OSError):
            raise MediasieveError(f"cannot write the manifest spill {ids_path(spill_path)}: {e}") from e
        raise
    log.info("manifest spill built: %d rows in %s", len(ids), spill_path)
    return spill_path
