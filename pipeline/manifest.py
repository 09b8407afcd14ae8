"""Read the input manifest (Parquet, JSONL, CSV at any fsspec URL) or list a storage prefix.

The manifest is streamed once per node, batch by batch, into a node-local Parquet spill with small row groups; the
rows of a work unit are read back from the spill when the unit is taken. Its ids (and the mask of rows to process)
are written beside it as an uncompressed Arrow IPC file that every rank of the node memory-maps: the node holds one
copy of them, in the page cache, however many ranks it runs, and only the ranks that read them page them in.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import posixpath
import socket
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from pipeline.config import InputConfig
from pipeline.errors import ConfigError, ManifestError, MediasieveError
from pipeline.proc import is_alive, parse_process_tag, process_tag

log = logging.getLogger(__name__)

ID = "video_id"
BATCH_ROWS = 65_536
SPILL_GROUP_ROWS = 8_192
SPILL_DIR = "_manifest"


def _format_of(url: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    name = url.split("?", 1)[0].lower()
    for suffix, kind in ((".parquet", "parquet"), (".pq", "parquet"), (".jsonl", "jsonl"), (".ndjson", "jsonl"),
                         (".json", "jsonl"), (".csv", "csv"), (".tsv", "csv")):
        if name.endswith(suffix):
            return kind
    raise ConfigError(f"input.format=auto cannot tell the format of {url}; set input.format")


def check_input_exists(cfg: InputConfig) -> None:
    """Fail fast (ConfigError) when the manifest URL does not exist."""
    if cfg.manifest:
        fs, path = fsspec.core.url_to_fs(cfg.manifest, **cfg.storage_options)
        try:
            exists = fs.exists(path)
        except Exception as e:  # noqa: BLE001 - any error here means the manifest is not readable
            raise ConfigError(f"input.manifest {cfg.manifest} cannot be reached: {type(e).__name__}: {e}") from e
        if not exists:
            raise ConfigError(f"input.manifest {cfg.manifest} does not exist")
        _format_of(cfg.manifest, cfg.format)


def _file_batches(cfg: InputConfig) -> Iterator[pa.RecordBatch]:
    url = cfg.manifest
    fmt = _format_of(url, cfg.format)
    fs, path = fsspec.core.url_to_fs(url, **cfg.storage_options)
    try:
        with fs.open(path, "rb") as f:
            if fmt == "parquet":
                yield from pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS)
            elif fmt == "jsonl":
                yield from pajson.open_json(f)
            else:
                delimiter = "\t" if url.lower().endswith(".tsv") else ","
                # ids and paths stay strings even when they look like numbers
                opts = pacsv.ConvertOptions(column_types={cfg.id_column: pa.string(), cfg.path_column: pa.string()})
                yield from pacsv.open_csv(f, parse_options=pacsv.ParseOptions(delimiter=delimiter),
                                          convert_options=opts)
    except FileNotFoundError as e:
        raise ConfigError(f"input.manifest {url} does not exist") from e
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"cannot read manifest {url} as {fmt}: {e}") from e


def _listing_batches(cfg: InputConfig) -> Iterator[pa.RecordBatch]:
    pattern = cfg.listing_glob
    fs, path = fsspec.core.url_to_fs(pattern, **cfg.storage_options)
    proto = pattern.split("://", 1)[0] + "://" if "://" in pattern else ""
    base = path
    for i, ch in enumerate(path):
        if ch in "*?[":
            base = path[: path.rfind("/", 0, i) + 1]
            break
    try:
        found = sorted(fs.glob(path))
    except ValueError as e:
        raise ConfigError(f"input.listing_glob {pattern!r}: {e}") from e
    files = [p for p in found if not fs.isdir(p)]
    ids = [posixpath.relpath(p, base) if base else p for p in files]
    paths = [proto + p if proto else p for p in files]
    yield pa.record_batch({cfg.id_column: pa.array(ids, pa.string()), cfg.path_column: pa.array(paths, pa.string())})


def list_glob(cfg: InputConfig) -> pa.Table:
    """The objects ``cfg.listing_glob`` matches, as a manifest (id: the path below the glob's fixed prefix).

    Raises:
        ConfigError: a glob the filesystem refuses.
    """
    return pa.Table.from_batches(list(_listing_batches(cfg)))


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


def _normalise(batch: pa.RecordBatch, cfg: InputConfig, offset: int) -> pa.RecordBatch:
    for col in (cfg.id_column, cfg.path_column):
        if col not in batch.schema.names:
            raise ManifestError(f"manifest has no column {col!r}; columns are {batch.schema.names}")
    arrays = list(batch.columns)
    for col in (cfg.id_column, cfg.path_column):
        i = batch.schema.get_field_index(col)
        arrays[i] = pc.cast(arrays[i], pa.string())
    batch = pa.RecordBatch.from_arrays(arrays, names=batch.schema.names)
    nulls = batch.column(cfg.id_column).null_count
    if nulls:
        first = offset + pc.index(pc.is_null(batch.column(cfg.id_column)), True).as_py()
        raise ManifestError(f"manifest has {nulls} row(s) with a null {cfg.id_column} (the first at row {first})")
    return batch


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
        self.protocols = frozenset(json.loads((table.schema.metadata or {}).get(b"protocols", b"[]")))
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


def _write_ids(path: str, ids: pa.ChunkedArray, keep: pa.Array | None, protocols: set[str]) -> None:
    """The ids (and the keep mask) as an uncompressed Arrow IPC file, for ``pa.memory_map``."""
    columns = {"id": ids} if keep is None else {"id": ids, "keep": pa.chunked_array([keep])}  # chunked apart: no copy
    table = pa.table(columns).replace_schema_metadata({"protocols": json.dumps(sorted(protocols))})
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
    batches = _listing_batches(cfg) if cfg.listing_glob else _file_batches(cfg)
    writer: pq.ParquetWriter | None = None
    id_chunks: list[pa.Array] = []
    protocols: set[str] = set()
    n = 0
    try:
        for raw in batches:
            batch = _normalise(raw, cfg, n)
            if writer is None:
                writer = pq.ParquetWriter(spill_path, batch.schema, compression="lz4")
            elif batch.schema != writer.schema:
                try:
                    batch = batch.cast(writer.schema)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as e:
                    raise ManifestError(f"manifest rows from {n} on have another schema than the first rows: "
                                        f"{batch.schema} vs {writer.schema}: {e}") from e
            writer.write_batch(batch, row_group_size=SPILL_GROUP_ROWS)
            id_chunks.append(batch.column(cfg.id_column))
            protocols |= url_schemes(batch.column(cfg.path_column))
            n += batch.num_rows
        if writer is None:  # an empty manifest (or an empty listing) still has its columns
            schema = pa.schema([(cfg.id_column, pa.string()), (cfg.path_column, pa.string())])
            writer = pq.ParquetWriter(spill_path, schema)
        writer.close()
    except BaseException as e:
        if writer is not None:
            try:
                writer.close()
            except OSError:
                pass
        remove_spill(spill_path)
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
            # reading errors are ManifestErrors already: an OSError here is the spill's disk (full, gone)
            raise MediasieveError(f"cannot write the manifest spill {spill_path}: {e}") from e
        raise
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
        _write_ids(ids_path(spill_path), ids, keep, protocols)
    except BaseException as e:
        remove_spill(spill_path)
        if isinstance(e, OSError):
            raise MediasieveError(f"cannot write the manifest spill {ids_path(spill_path)}: {e}") from e
        raise
    log.info("manifest spill built: %d rows in %s", len(ids), spill_path)
    return spill_path
