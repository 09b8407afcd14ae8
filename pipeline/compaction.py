"""Compaction: merge the many small part files of a long job into few large ones, losing no row at any moment.

A rank commits a part every ``output.rows_per_file`` rows or ``output.flush_interval_s`` seconds, so a week on 64
GPUs leaves hundreds of thousands of parts of a few thousand rows, and every reader (DuckDB, Polars, Spark, the
resume scan itself) pays per file: listing, opening, reading a footer. ``compact`` rewrites runs of small parts
into parts of about ``target_bytes``.

Crash safety, on a filesystem and on an object store alike, comes from a plan committed before anything moves
(``<output>/_compaction/<token>-<seq>.json``: a target and its sources, one plan per target, so a crash costs at
most the target in progress), targets that appear whole or not at all, and sources deleted only once their target
exists. ``finish_pending`` (run by the next compaction and by every job start, under the lease) therefore knows from
the plan alone what to do with what a crash left: the target there -> delete the sources that remain (roll
forward); the target missing -> no source was deleted yet, and only the plan goes (roll back). A row is never
missing; between a target's commit and its sources' deletion a reader sees its rows twice, so read a compacting
output only after ``compact`` returns.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import MediasieveError
from pipeline.writer import PARTS_DIR, commit_bytes, commit_file, is_local_fs

log = logging.getLogger(__name__)

PLAN_DIR = "_compaction"
_PART = re.compile(r"^part-(\d{8}T\d{6}-[0-9a-f]{8})-[rc][0-9a-f]+-\d{6,}\.parquet$")
"""A part the job wrote (``part-<run>-r<rank>-<seq>``) or a compaction did (``part-<run>-c<token>-<seq>``)."""


@dataclass
class CompactionReport:
    """What one ``compact`` call did."""

    files_before: int
    files_after: int
    rows: int
    """Rows in the parts that were merged (the same rows are now in the targets)."""
    merged: int
    """Source parts merged."""
    written: int
    """Target parts written."""
    bytes_written: int
    pending_finished: int = 0
    """Plans of an interrupted compaction rolled forward or back first."""


def _parts_dir(root: str) -> str:
    return f"{root.rstrip('/')}/{PARTS_DIR}"


def pending_plans(fs, root: str) -> list[str]:
    """The plans an interrupted compaction left (``finish_pending`` finishes them)."""
    try:
        return sorted(p for p in fs.find(f"{root.rstrip('/')}/{PLAN_DIR}") if p.endswith(".json"))
    except FileNotFoundError:
        return []


def finish_pending(fs: fsspec.AbstractFileSystem, root: str) -> int:
    """Roll each plan an interrupted compaction left forward (its target committed: delete the sources left) or
    back (no target: no source was deleted yet, only the plan goes). Call it holding the output lease, before
    reading the committed parts.

    Args:
        fs: the output's filesystem.
        root: the output directory (no protocol).

    Returns:
        The number of plans finished.

    Raises:
        MediasieveError: a plan that cannot be read (nothing is touched; the message says what to check).
    """
    done = 0
    parts = _parts_dir(root)
    fs.invalidate_cache()  # a listing cached by this process (s3fs keeps them) would hide what another one wrote
    for plan_path in pending_plans(fs, root):
        try:
            plan = json.loads(fs.cat_file(plan_path))
            target, sources = f"{parts}/{plan['target']}", [f"{parts}/{s}" for s in plan["sources"]]
        except (ValueError, KeyError, TypeError) as e:
            raise MediasieveError(
                f"the compaction plan {plan_path} cannot be read ({type(e).__name__}: {e}); no part was touched. "
                "Where the target it names is in parts/, its rows are also in the sources it names: delete one or "
                "the other, then the plan") from e
        if fs.exists(target):
            left = [s for s in sources if fs.exists(s)]
            log.warning("compaction %s was interrupted after its target was committed: deleting the %d source "
                        "parts left", plan.get("token"), len(left))
            _remove(fs, left)
        else:
            log.warning("compaction %s was interrupted before its target was committed: every source is kept",
                        plan.get("token"))
        fs.rm_file(plan_path)
        done += 1
    return done


def _remove(fs, paths: list[str]) -> None:
    if paths:
        fs.rm(paths)


def _group(files: list[tuple[str, int, int]], target_bytes: int) -> list[list[tuple[str, int, int]]]:
    """Consecutive small parts (path, size, schema index) of one schema, about ``target_bytes`` per group; groups of
    one part are left out."""
    groups: list[list] = []
    current: list = []
    size = 0
    for f in files:
        if current and (f[2] != current[0][2] or size + f[1] > target_bytes):
            groups.append(current)
            current, size = [], 0
        current.append(f)
        size += f[1]
    if current:
        groups.append(current)
    return [g for g in groups if len(g) > 1]


def compact(out_dir: str, storage_options: dict, target_bytes: int = 512 << 20, row_group_rows: int = 65536,
            scratch_dir: str | None = None, dry_run: bool = False, compression: str = "zstd") -> CompactionReport:
    """Merge the output's small part files into parts of about ``target_bytes``. The caller holds the lease.

    Parts of ``target_bytes / 2`` or more are left as they are, so compacting again touches only what is still small.
    Runs of consecutive parts (in name order: by run, then rank) with one schema are merged; parts of another
    schema are never mixed in. Row order within a target is the sources' order.

    Args:
        out_dir: the output directory URL.
        storage_options: its fsspec options.
        target_bytes: about how large a merged part becomes (the sources' sizes add up to at most this).
        row_group_rows: rows per Parquet row group in a merged part.
        scratch_dir: a local directory for the merged file before its upload (default: the system's).
        dry_run: plan and report, write nothing.
        compression: the merged parts' Parquet codec (the job's ``output.compression``).

    Returns:
        What was merged.
    """
    fs, root = fsspec.core.url_to_fs(out_dir, **storage_options)
    root = root.rstrip("/")
    fs.invalidate_cache()
    pending = 0 if dry_run else finish_pending(fs, root)
    parts = _parts_dir(root)
    try:
        listed = fs.find(parts, detail=True)
    except FileNotFoundError:
        listed = {}
    ours = sorted((p, int(info["size"])) for p, info in listed.items() if _PART.match(p.rsplit("/", 1)[-1]))
    small = [(p, size) for p, size in ours if size < target_bytes // 2]
    distinct: list[pa.Schema] = []  # a schema per part would hold gigabytes for a week's parts: an index each
    indexed = []
    for (path, size), schema in zip(small, _in_parallel(_read_schema, fs, [p for p, _ in small])):
        index = next((i for i, known in enumerate(distinct) if known.equals(schema)), None)
        if index is None:
            distinct.append(schema)
            index = len(distinct) - 1
        indexed.append((path, size, index))
    groups = _group(indexed, target_bytes)
    token = uuid.uuid4().hex[:8]
    merged = sum(len(g) for g in groups)
    report = CompactionReport(len(listed), len(listed) - merged + len(groups), 0, merged, len(groups), 0, pending)
    if dry_run or not groups:
        return report
    if is_local_fs(fs):
        fs.makedirs(f"{root}/{PLAN_DIR}", exist_ok=True)
    for i, group in enumerate(groups):
        run = _PART.match(group[-1][0].rsplit("/", 1)[-1]).group(1)  # the newest source's run: see module notes
        target = f"part-{run}-c{token}-{i:06d}.parquet"
        plan = {"token": f"{token}-{i:06d}", "target": target, "sources": [p.rsplit("/", 1)[-1] for p, _, _ in group]}
        plan_path = f"{root}/{PLAN_DIR}/{token}-{i:06d}.json"
        commit_bytes(fs, plan_path, json.dumps(plan, indent=1).encode(), f"{root}/_tmp")
        rows, size = _write_merged(fs, [p for p, _, _ in group], distinct[group[0][2]], f"{parts}/{target}",
                                   f"{root}/_tmp", row_group_rows, scratch_dir, compression)
        _remove(fs, [p for p, _, _ in group])  # the target is committed: its sources may go
        fs.rm_file(plan_path)
        report.rows += rows
        report.bytes_written += size
    log.info("compacted %d parts (%d rows) into %d; %d parts now", merged, report.rows, len(groups),
             report.files_after)
    return report


def _read_schema(fs, path: str) -> pa.Schema:
    with fs.open(path, "rb") as f:
        return pq.read_schema(f)


def _read_table(fs, path: str) -> pa.Table:
    with fs.open(path, "rb") as f:
        return pq.read_table(f)


def _in_parallel(read, fs, paths: list[str], window: int = 32):
    """``read(fs, path)`` for each path, in order, ``window`` at a time on as many threads: an object store answers
    one small GET in tens of milliseconds, so one at a time would make a week's parts take hours."""
    if not paths:
        return
    with ThreadPoolExecutor(max_workers=min(window, len(paths)), thread_name_prefix="compact") as pool:
        for start in range(0, len(paths), window):
            yield from pool.map(lambda p: read(fs, p), paths[start:start + window])


def _write_merged(fs, sources: list[str], schema: pa.Schema, final: str, tmp_dir: str, row_group_rows: int,
                  scratch_dir: str | None, compression: str) -> tuple[int, int]:
    """Stream ``sources`` into one Parquet file in local scratch, check its row count, and commit it as ``final``
    whole or not at all. Returns its rows and bytes."""
    fd, local = tempfile.mkstemp(suffix=".parquet", dir=scratch_dir)
    os.close(fd)
    try:
        want = 0
        with pq.ParquetWriter(local, schema, compression=compression) as writer:
            buffered: list[pa.Table] = []
            held = 0
            for table in _in_parallel(_read_table, fs, sources):
                want += table.num_rows
                buffered.append(table)
                held += table.num_rows
                if held >= row_group_rows:
                    writer.write_table(pa.concat_tables(buffered), row_group_size=row_group_rows)
                    buffered, held = [], 0
            if buffered:
                writer.write_table(pa.concat_tables(buffered), row_group_size=row_group_rows)
        got = pq.read_metadata(local).num_rows
        if got != want:
            raise RuntimeError(f"merged part holds {got} rows, its sources {want}; nothing was committed")
        size = os.path.getsize(local)
        commit_file(fs, final, local, tmp_dir)
        return want, size
    finally:
        os.remove(local)
