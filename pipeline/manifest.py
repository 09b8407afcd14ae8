"""Read the input manifest (Parquet, JSONL, CSV at any fsspec URL) or list a storage prefix."""

from __future__ import annotations

import logging
import posixpath

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from pipeline.config import InputConfig
from pipeline.errors import ConfigError, ManifestError

log = logging.getLogger(__name__)

ID = "video_id"


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


def _read_table(cfg: InputConfig) -> pa.Table:
    url = cfg.manifest
    fmt = _format_of(url, cfg.format)
    fs, path = fsspec.core.url_to_fs(url, **cfg.storage_options)
    try:
        with fs.open(path, "rb") as f:
            if fmt == "parquet":
                return pq.read_table(f)
            if fmt == "jsonl":
                return pajson.read_json(f)
            delimiter = "\t" if url.lower().endswith(".tsv") else ","
            # ids and paths stay strings even when they look like numbers
            opts = pacsv.ConvertOptions(column_types={cfg.id_column: pa.string(), cfg.path_column: pa.string()})
            return pacsv.read_csv(f, parse_options=pacsv.ParseOptions(delimiter=delimiter), convert_options=opts)
    except FileNotFoundError as e:
        raise ConfigError(f"input.manifest {url} does not exist") from e
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"cannot read manifest {url} as {fmt}: {e}") from e


def _listing_table(cfg: InputConfig) -> pa.Table:
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
    return pa.table({cfg.id_column: pa.array(ids, pa.string()), cfg.path_column: pa.array(paths, pa.string())})


def read_manifest(cfg: InputConfig) -> pa.Table:
    """Read the manifest into a table whose id and path columns are strings, in manifest order.

    Args:
        cfg: the input section of the config.

    Returns:
        The manifest table; other columns pass through unchanged.

    Raises:
        ManifestError: missing id/path column, null ids, or duplicate ids when ``on_duplicate_ids=error``.
    """
    table = _listing_table(cfg) if cfg.listing_glob else _read_table(cfg)
    for col in (cfg.id_column, cfg.path_column):
        if col not in table.column_names:
            raise ManifestError(f"manifest has no column {col!r}; columns are {table.column_names}")
    table = table.set_column(table.schema.get_field_index(cfg.id_column), cfg.id_column,
                             pc.cast(table[cfg.id_column], pa.string()))
    table = table.set_column(table.schema.get_field_index(cfg.path_column), cfg.path_column,
                             pc.cast(table[cfg.path_column], pa.string()))
    nulls = table[cfg.id_column].null_count
    if nulls:
        raise ManifestError(f"manifest has {nulls} row(s) with a null {cfg.id_column}")
    table = table.combine_chunks()
    counts = pc.value_counts(table[cfg.id_column])
    dup_mask = pc.greater(counts.field("counts"), 1)
    dups = counts.filter(dup_mask).field("values").to_pylist()
    if dups:
        if cfg.on_duplicate_ids == "error":
            shown = ", ".join(repr(d) for d in dups[:10])
            raise ManifestError(
                f"manifest has {len(dups)} duplicate id(s): {shown}{' ...' if len(dups) > 10 else ''} "
                "(set input.on_duplicate_ids=drop to keep the first of each)"
            )
        log.warning("dropping later rows of %d duplicate id(s), e.g. %r", len(dups), dups[:5])
        ids = table[cfg.id_column].to_pylist()
        seen: set[str] = set()
        keep = []
        for i in ids:
            keep.append(i not in seen)
            seen.add(i)
        table = table.filter(pa.array(keep))
    if cfg.limit is not None:
        table = table.slice(0, cfg.limit)
    return table
