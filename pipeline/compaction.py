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
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import part_format
from pipeline.errors import MediasieveError
from pipeline.quarantine import READ_ERRORS, fault_or_none, quarantine, read_past_damaged
from pipeline.resume import part_files
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
    duplicates_removed: int = 0
    """Second success rows of items removed first (``remove_duplicate_successes``); with ``dry_run``, found."""
    quarantined: int = 0
    """Damaged parts moved to the quarantine (``pipeline.quarantine``); with ``dry_run``, found."""


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
            scratch_dir: str | None = None, dry_run: bool = False, compression: str = "zstd",
            id_column: str | None = None) -> CompactionReport:
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
        id_column: the id column name: where given, second success rows of an item are removed first
            (``remove_duplicate_successes``).

    Returns:
        What was merged.
    """
    fs, root = fsspec.core.url_to_fs(out_dir, **storage_options)
    root = root.rstrip("/")
    fs.invalidate_cache()
    pending = 0 if dry_run else finish_pending(fs, root)
    duplicates = 0
    token = uuid.uuid4().hex[:8]
    by = None if dry_run else f"compaction {token}"  # a dry run moves no damaged part, it names them
    moved: set[str] = set()  # damaged parts found (moved to the quarantine unless ``dry_run``): ``_judge``
    if id_column is not None:
        duplicates = remove_duplicate_successes(out_dir, storage_options, id_column, None, row_group_rows, scratch_dir,
                                                compression, dry_run, by, moved)
    parts = _parts_dir(root)
    try:
        listed = fs.find(parts, detail=True)
    except FileNotFoundError:
        listed = {}
    listed = {p: info for p, info in listed.items() if p not in moved}  # found by a dry run's duplicate check
    ours = sorted((p, int(info["size"])) for p, info in listed.items() if _PART.match(p.rsplit("/", 1)[-1]))
    small = [(p, size) for p, size in ours if size < target_bytes // 2]
    distinct: list[pa.Schema] = []  # a schema per part would hold gigabytes for a week's parts: an index each
    indexed = []
    for (path, size), schema in zip(small, _in_parallel(_read_schema, fs, [p for p, _ in small])):
        if isinstance(schema, BaseException):
            _judge(fs, root, path, schema, by, moved)
            continue
        index = next((i for i, known in enumerate(distinct) if known.equals(schema)), None)
        if index is None:
            distinct.append(schema)
            index = len(distinct) - 1
        indexed.append((path, size, index))
    groups = _group(indexed, target_bytes)
    merged = sum(len(g) for g in groups)
    before = len(listed) + len(moved)  # a part the duplicate check moved was not listed
    report = CompactionReport(before, before - len(moved) - merged + len(groups), 0, merged, len(groups), 0, pending,
                              duplicates, len(moved))  # a source moved during its merge is one of ``merged``
    if dry_run or not groups:
        return report
    for i, group in enumerate(groups):
        sources = [p for p, _, _ in group]
        rows, size = _replace_planned(
            fs, root, f"{token}-{i:06d}", _target_name(sources[-1], token, i), sources,  # the newest source's run
            lambda final, sources=sources, schema=distinct[group[0][2]]: _write_merged(
                fs, sources, schema, final, f"{root}/_tmp", row_group_rows, scratch_dir, compression,
                lambda path, error: _judge(fs, root, path, error, by, moved)), moved)
        report.rows += rows
        report.bytes_written += size
    report.quarantined = len(moved)
    log.info("compacted %d parts (%d rows) into %d; %d parts now", merged, report.rows, len(groups),
             report.files_after)
    return report


def _target_name(source: str, token: str, seq: int) -> str:
    """``part-<run>-c<token>-<seq>.parquet``, with ``source``'s run: a rerun checks the schema of the newest part by
    name, so a target sorts where its newest source did."""
    m = _PART.match(source.rsplit("/", 1)[-1])
    return f"part-{m.group(1) if m else '00000000T000000-00000000'}-c{token}-{seq:06d}.parquet"


def _replace_planned(fs, root: str, plan_token: str, target: str, sources: list[str], write,
                     moved: set[str] = frozenset()) -> tuple[int, int]:
    """Replace ``sources`` (part paths) by the part ``target`` (a name in ``parts/``) that ``write(final_path)``
    commits whole, returning its rows and bytes: the plan first, then the target, then the sources' deletion and the
    plan's (``finish_pending`` finishes what a crash interrupts). A source in ``moved`` (a damaged part the write
    moved to the quarantine) is not in ``parts/`` any more."""
    if is_local_fs(fs):
        fs.makedirs(f"{root}/{PLAN_DIR}", exist_ok=True)
    plan = {"token": plan_token, "target": target, "sources": [p.rsplit("/", 1)[-1] for p in sources]}
    plan_path = f"{root}/{PLAN_DIR}/{plan_token}.json"
    commit_bytes(fs, plan_path, json.dumps(plan, indent=1).encode(), f"{root}/_tmp")
    rows, size = write(f"{_parts_dir(root)}/{target}")
    _remove(fs, [s for s in sources if s not in moved])  # the target is committed: its sources may go
    fs.rm_file(plan_path)
    return rows, size


def remove_duplicate_successes(out_dir: str, storage_options: dict, id_column: str, files: list[str] | None = None,
                               row_group_rows: int = 65536, scratch_dir: str | None = None,
                               compression: str = "zstd", dry_run: bool = False, by: str | None = None,
                               moved: set[str] | None = None) -> int:
    """Keep one success row per item: the latest (by ``end_time``, then part name, then position). The caller holds
    the lease.

    A second success row comes from a part that landed after its run gave it up as hung (an object store's PUT in
    flight cannot be withdrawn) while a rerun redid its items, or from a part copied in by hand. The late part's rows
    are the older ones, and its run counted them as uncommitted, so they go: the late part is deleted whole, and the
    rerun's parts, which readers saw first, stay as they are. Any other part holding a success row to drop is
    rewritten without it under a plan, as compaction does (``finish_pending`` finishes what a crash interrupts).
    Failure rows are never touched.

    Args:
        out_dir: the output directory URL.
        storage_options: its fsspec options.
        id_column: the id column name.
        files: the committed part files when the caller has listed them (default: list them).
        row_group_rows: rows per Parquet row group in a rewritten part.
        scratch_dir: a local directory for a rewritten part before its upload (default: the system's).
        compression: the rewritten parts' Parquet codec.
        dry_run: count them, change nothing.
        by: who moves a damaged part that a read meets to the quarantine (``read_past_damaged``); None: it is only
            left out.
        moved: where given, the damaged parts met are added to it.

    Returns:
        The success rows removed (with ``dry_run``: found).
    """
    fs, root = fsspec.core.url_to_fs(out_dir, **storage_options)
    root = root.rstrip("/")
    if files is None:
        files = part_files(fs, root)
    if not files:
        return 0
    ok = pc.field("result_info", "succeed")

    def read(files: list[str]) -> tuple[int, pa.Array, list[tuple[str, pa.Table]]]:
        ok_ids = part_format.dataset(files, fs).to_table(columns={"id": pc.field(id_column)},
                                                                               filter=ok)["id"]
        counts = pc.value_counts(ok_ids)
        more = pc.greater(counts.field("counts"), 1)
        repeated = counts.field("values").filter(more)
        surplus = (pc.sum(counts.field("counts").filter(more)).as_py() or 0) - len(repeated)
        del ok_ids, counts
        if dry_run or not surplus:
            return surplus, repeated, []

        def where(fs, path: str) -> pa.Table:  # the repeated ids' success rows in one part, in the part's order
            return part_format.dataset(path, fs).to_table(
                columns={"id": pc.field(id_column), "end_time": pc.field("result_info", "end_time")},
                filter=ok & pc.field(id_column).isin(repeated), use_threads=False)

        return surplus, repeated, [(path, table) for path, table in zip(files, _in_parallel(where, fs, files))
                                   if table.num_rows]

    (surplus, repeated, found), files, damaged = read_past_damaged(fs, root, files, read, by)
    if moved is not None:
        moved.update(damaged)
    if dry_run or not surplus:
        return surplus
    keeper: dict = {}  # id -> (its rank, the part, which of the id's success rows in that part)
    for path, table in found:
        seen: Counter = Counter()
        for rid, end in zip(table["id"].to_pylist(), table["end_time"].to_pylist()):
            key = (end.timestamp() if end is not None else float("-inf"), path.rsplit("/", 1)[-1], seen[rid])
            if rid not in keeper or key > keeper[rid][0]:
                keeper[rid] = (key, path, seen[rid])
            seen[rid] += 1
    kept_in: dict[str, dict] = {}  # part -> {id: which of its success rows there} for the rows that stay
    for rid, (_, path, which) in keeper.items():
        kept_in.setdefault(path, {})[rid] = which
    token = uuid.uuid4().hex[:8]
    removed = 0
    for i, (path, table) in enumerate(found):
        keep_here = kept_in.get(path, {})
        if table.num_rows == len(keep_here):  # the kept row of each of its items, and no other: nothing to drop
            continue
        if not keep_here:
            with fs.open(path, "rb") as f:
                whole = pq.read_metadata(f).num_rows
            if whole == table.num_rows:  # every row in it is a second success row of its item
                log.warning("removing %s: its %d rows are all second success rows of their items", path, whole)
                _remove(fs, [path])
                removed += whole
                continue
        dropped = _rewrite_without(fs, root, path, keep_here, repeated, id_column, (token, i), row_group_rows,
                                   scratch_dir, compression)
        log.warning("rewrote %s without %d second success row(s) of its items", path, dropped)
        removed += dropped
    return removed


def _rewrite_without(fs, root: str, path: str, keep: dict, repeated: pa.Array, id_column: str,
                     plan: tuple[str, int], row_group_rows: int, scratch_dir: str | None, compression: str) -> int:
    """Rewrite the part ``path`` under a plan, a row group at a time, without the success rows of ``repeated`` ids
    but the one ``keep`` names for an id (``{id: which of its success rows in this part}``). Returns the rows
    dropped."""
    token, seq = plan
    counts = {"read": 0, "kept": 0}

    def write(local: str) -> int:
        seen: Counter = Counter()
        with fs.open(path, "rb") as f:
            source = part_format.open_file(f)
            with part_format.writer(local, source.schema_arrow, compression) as writer:
                for group in range(source.num_row_groups):
                    table = source.read_row_group(group)
                    succeeded = pc.fill_null(pc.struct_field(table["result_info"], "succeed"), False)
                    candidates = np.flatnonzero(pc.and_(succeeded, pc.is_in(
                        table[id_column], value_set=repeated)).to_numpy(zero_copy_only=False))
                    mask = np.ones(table.num_rows, dtype=bool)
                    for row, rid in zip(candidates, table[id_column].take(candidates).to_pylist()):
                        mask[row] = keep.get(rid) == seen[rid]
                        seen[rid] += 1
                    counts["read"] += table.num_rows
                    counts["kept"] += int(mask.sum())
                    writer.write_table(table.filter(mask), row_group_size=row_group_rows)
        return counts["kept"]

    _replace_planned(fs, root, f"{token}-d{seq:06d}", _target_name(path, token, seq), [path],
                     lambda final: _commit_through_scratch(fs, final, f"{root}/_tmp", scratch_dir, write,
                                                           f"rewrite of {path} as"))
    return counts["read"] - counts["kept"]


def _read_schema(fs, path: str) -> pa.Schema | BaseException:
    """The part's schema, or what reading it raised (``_judge`` tells a damaged part from a fault of the store)."""
    try:
        with fs.open(path, "rb") as f:
            return pq.read_schema(f)
    except READ_ERRORS as e:
        return e


def _judge(fs, root: str, path: str, error: BaseException, by: str | None, moved: set[str]) -> None:
    """A read of the part ``path`` raised ``error``: where the part is damaged (``part_fault``) it goes to the
    quarantine (named only, with ``by`` None: a dry run) and into ``moved``; where it reads, ``error`` was the store's
    and is raised."""
    why = fault_or_none(fs, path)
    if why is None:
        raise error
    quarantine(fs, root, {path: why}, by)
    moved.add(path)


def _read_table(fs, path: str) -> pa.Table:
    with fs.open(path, "rb") as f:
        return part_format.read_table(f)


def _in_parallel(read, fs, paths: list[str], window: int = 32):
    """``read(fs, path)`` for each path, in order, ``window`` at a time on as many threads: an object store answers
    one small GET in tens of milliseconds, so one at a time would make a week's parts take hours."""
    if not paths:
        return
    with ThreadPoolExecutor(max_workers=min(window, len(paths)), thread_name_prefix="compact") as pool:
        for start in range(0, len(paths), window):
            yield from pool.map(lambda p: read(fs, p), paths[start:start + window])


def _write_merged(fs, sources: list[str], schema: pa.Schema, final: str, tmp_dir: str, row_group_rows: int,
                  scratch_dir: str | None, compression: str,
                  on_fault: Callable[[str, BaseException], None]) -> tuple[int, int]:
    """Stream ``sources`` into one Parquet file in local scratch, check its row count, and commit it as ``final``
    whole or not at all. Returns its rows and bytes. A source whose read fails goes to ``on_fault(path, error)``,
    which moves a damaged one aside (it is then left out) and raises otherwise."""

    def read(fs, path: str) -> pa.Table | None:
        try:
            return _read_table(fs, path)
        except READ_ERRORS as e:
            on_fault(path, e)
            return None

    def write(local: str) -> int:
        want = 0
        with part_format.writer(local, schema, compression) as writer:
            buffered: list[pa.Table] = []
            held = 0
            for table in _in_parallel(read, fs, sources):
                if table is None:
                    continue
                want += table.num_rows
                buffered.append(table)
                held += table.num_rows
                if held >= row_group_rows:
                    writer.write_table(pa.concat_tables(buffered), row_group_size=row_group_rows)
                    buffered, held = [], 0
            if buffered:
                writer.write_table(pa.concat_tables(buffered), row_group_size=row_group_rows)
        return want

    return _commit_through_scratch(fs, final, tmp_dir, scratch_dir, write, "merged part")


def _commit_through_scratch(fs, final: str, tmp_dir: str, scratch_dir: str | None, write: Callable[[str], int],
                            what: str) -> tuple[int, int]:
    """``write(local)`` a Parquet file in local scratch (made if missing), returning the rows it wrote; check that the
    file holds them, and commit it as ``final`` whole or not at all. Returns its rows and bytes."""
    if scratch_dir is not None:
        os.makedirs(scratch_dir, exist_ok=True)
    fd, local = tempfile.mkstemp(suffix=".parquet", dir=scratch_dir)
    os.close(fd)
    try:
        want = write(local)
        got = pq.read_metadata(local).num_rows
        if got != want:
            raise RuntimeError(f"the {what} {final} holds {got} rows, {want} were written to it; nothing was "
                               "committed")
        size = os.path.getsize(local)
        commit_file(fs, final, local, tmp_dir)
        return want, size
    finally:
        os.remove(local)
