"""The output directory as the job's memory: committed rows, the live-run lease, the recorded config."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import part_format
from pipeline.config import identity_clean
from pipeline.distributed import ranks_by_value, ranks_shown
from pipeline.errors import ConfigError, OutputHungError, OutputLockedError, is_secret_name, redact_urls
from pipeline.portable import portable_type
from pipeline.proc import is_alive, start_ticks
from pipeline.software import changes_between, said
from pipeline.weights import shown
from pipeline.writer import PARTS_DIR, bounded, commit_bytes, commit_latest_table, is_local_fs

log = logging.getLogger(__name__)

LEASE = "_lease.json"
CONFIG = "_config.json"
SUMMARY = "summary.json"
FAILURES = "failures.jsonl"
SUCCESS_MARKER = "_SUCCESS"

def redact(obj):
    """Replace values whose key names a credential, and the credentials of URLs (``errors.redact_urls``), with
    ``***`` (configs written to disk)."""
    if isinstance(obj, dict):
        return {k: ("***" if is_secret_name(str(k)) and v else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return redact_urls(obj) if isinstance(obj, str) else obj


def part_files(fs, root: str) -> list[str]:
    """The committed part files under an output root (temporaries live elsewhere, so every one is whole)."""
    try:
        return [p for p in fs.find(f"{root.rstrip('/')}/{PARTS_DIR}") if p.endswith(".parquet")]
    except FileNotFoundError:
        return []


@dataclass
class CommittedState:
    """What the committed part files say about the items (distinct ids, as Arrow arrays: no Python objects)."""

    succeeded: pa.Array
    failed_only: pa.Array
    files: int
    rows: int
    newest_part: str | None = None
    """The part file of the latest run (names start with the run's UTC time), whose schema a rerun checks."""
    duplicate_successes: int = 0
    """Success rows beyond the first of their item (a part that landed after its run gave it up, then redone):
    ``remove_duplicate_successes`` removes them."""


def read_committed(out_dir: str, storage_options: dict, id_column: str,
                   files: list[str] | None = None) -> CommittedState:
    """Scan committed part files for ids with a success row and ids with only failure rows.

    Args:
        out_dir: output directory URL.
        storage_options: fsspec options.
        id_column: the id column name.
        files: the part files when the caller has listed them already (default: list them).

    Returns:
        The committed state (empty for a new output directory).
    """
    fs, root = fsspec.core.url_to_fs(out_dir, **storage_options)
    files = part_files(fs, root) if files is None else files
    if not files:
        return CommittedState(pa.array([], pa.string()), pa.array([], pa.string()), 0, 0)
    dataset = part_format.dataset(files, fs)
    table = dataset.to_table(columns={"id": pc.field(id_column), "ok": pc.field("result_info", "succeed")})
    rows = table.num_rows
    ok_rows = table.filter(table["ok"])["id"]
    ok_ids = pc.unique(ok_rows)
    n_ok_rows = len(ok_rows)
    del ok_rows
    bad_ids = pc.unique(table.filter(pc.invert(table["ok"]))["id"])
    del table
    failed_only = bad_ids.filter(pc.invert(pc.is_in(bad_ids, value_set=ok_ids)))
    newest = max(files, key=lambda f: f.rsplit("/", 1)[-1])
    return CommittedState(ok_ids, failed_only, len(files), rows, newest, n_ok_rows - len(ok_ids))


def _latest_failure_rows(fs, files: list[str], failed_only: pa.Array, id_column: str,
                         columns: dict[str, pc.Expression]) -> pa.Table:
    """The latest failure row (by ``end_time``; a tie goes to the row read last) of each id in ``failed_only``, as
    ``id``, ``end_time`` and ``columns``. Only failure rows are read: a row group without one is skipped by its
    statistics."""
    failed = part_format.dataset(files, fs).to_table(columns={
        "id": pc.field(id_column), "end_time": pc.field("result_info", "end_time"), **columns,
    }, filter=pc.invert(pc.field("result_info", "succeed")))
    failed = failed.filter(pc.is_in(failed["id"], value_set=failed_only))
    if not failed.num_rows:
        return failed
    failed = failed.sort_by([("id", "ascending"), ("end_time", "ascending")])  # stable: ties keep the read order
    ids = failed["id"].combine_chunks()
    last = pc.not_equal(ids.slice(0, len(ids) - 1), ids.slice(1))  # the row before another id's
    return failed.filter(pa.concat_arrays([last, pa.array([True])]))


def latest_failures(fs, files: list[str], state: CommittedState, kept: pa.Array | pa.ChunkedArray, id_column: str,
                    path_column: str) -> dict[str, dict]:
    """The latest failure row of every kept item that has only failure rows, by id: what ``failures.jsonl`` lists.

    Args:
        fs: the output's filesystem.
        files: the committed part files.
        state: their committed state (``read_committed``).
        kept: the manifest's kept ids.
        id_column: the id column name.
        path_column: the path column name.

    Returns:
        ``{id: {"id", "path", "error_type", "error_message", "end_time", "run_id"}}``.
    """
    latest = _latest_failure_rows(fs, files, state.failed_only, id_column, {
        "path": pc.field(path_column), "error_type": pc.field("result_info", "error_type"),
        "error_message": pc.field("result_info", "error_message"), "run_id": pc.field("result_info", "run_id"),
    })
    latest = latest.filter(pc.is_in(latest["id"], value_set=kept))
    return {rec["id"]: rec for rec in latest.to_pylist()}  # failures only: usually few


def failed_for_good(fs, files: list[str], state: CommittedState, id_column: str) -> pa.Array:
    """The ids with only failure rows whose latest failure row is not retryable (``resume.retry_failed=retryable``
    skips them).

    Args:
        fs: the output's filesystem.
        files: the committed part files.
        state: their committed state (``read_committed``).
        id_column: the id column name.
    """
    if not files or not len(state.failed_only):
        return pa.array([], pa.string())
    latest = _latest_failure_rows(fs, files, state.failed_only, id_column,
                                  {"retryable": pc.field("result_info", "retryable")})
    permanent = pc.invert(pc.fill_null(latest["retryable"], True))  # unknown: retried
    return latest["id"].filter(permanent).combine_chunks()


RESUME_DIR = "_resume"


def share_pending(out_dir: str, storage_options: dict, run_id: str, pending: pa.Array) -> str:
    """Rank 0: write the positions this run must process to ``<output>/_resume/<run_id>.parquet`` for the other
    ranks, so that the committed parts are read once per run instead of once per rank (a week's parts are hundreds of
    thousands of objects: 64 ranks reading each at every restart would be tens of millions of GETs). Earlier runs'
    files go. Positions are sorted, so they delta-encode to a few bits each.

    Returns:
        The file's URL.
    """
    fs, root = fsspec.core.url_to_fs(out_dir, **storage_options)
    commit_latest_table(fs, root, RESUME_DIR, run_id, pa.table({"pending": pa.array(pending, pa.int64())}),
                        use_dictionary=False, column_encoding={"pending": "DELTA_BINARY_PACKED"})
    return out_dir.rstrip("/") + f"/{RESUME_DIR}/{run_id}.parquet"


def read_pending(url: str, storage_options: dict) -> pa.Array:
    """The positions rank 0 shared (``share_pending``)."""
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    with fs.open(path, "rb") as f:
        return part_format.read_table(f)["pending"].combine_chunks()


@dataclass(frozen=True)
class SchemaDrift:
    """How the rows a run would write differ from the committed ones: dotted paths with their types."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def describe(self) -> str:
        parts = [f"{what}: {', '.join(paths)}" for what, paths in
                 (("added", self.added), ("removed", self.removed), ("changed", self.changed)) if paths]
        return "; ".join(parts)


def _drift_into(path: str, old: pa.DataType, new: pa.DataType, out: dict[str, list[str]]) -> None:
    if pa.types.is_struct(old) and pa.types.is_struct(new):
        _drift_fields(f"{path}.", list(old), list(new), out)
    elif (pa.types.is_list(old) and pa.types.is_list(new)) or (
            pa.types.is_large_list(old) and pa.types.is_large_list(new)):
        _drift_into(f"{path}[]", old.value_type, new.value_type, out)
    elif not old.equals(new):
        out["changed"].append(f"{path} ({old} -> {new})")


def _drift_fields(prefix: str, old: list[pa.Field], new: list[pa.Field], out: dict[str, list[str]]) -> None:
    old_by, new_by = {f.name: f for f in old}, {f.name: f for f in new}
    for f in new:
        if f.name not in old_by:
            out["added"].append(f"{prefix}{f.name} ({f.type})")
        else:
            _drift_into(f"{prefix}{f.name}", old_by[f.name].type, f.type, out)
    out["removed"] += [f"{prefix}{f.name} ({f.type})" for f in old if f.name not in new_by]


def schema_drift(committed: pa.Schema, current: pa.Schema) -> SchemaDrift:
    """Fields (at any depth of structs and lists) added, removed or retyped from ``committed`` to ``current``.

    Field order and metadata are not drift: rows are matched to the schema by name.
    """
    out: dict[str, list[str]] = {"added": [], "removed": [], "changed": []}
    _drift_fields("", list(committed), list(current), out)
    return SchemaDrift(tuple(out["added"]), tuple(out["removed"]), tuple(out["changed"]))


def writer_schema(out_dir: str, storage_options: dict, newest_part: str | None, current: pa.Schema,
                  on_change: str) -> pa.Schema:
    """The schema this run writes its parts in: the committed one, so that the table stays one table.

    A table whose parts disagree is not one table to its readers: pyarrow and DuckDB take the first file's
    schema and silently drop a field that only later parts have, and Polars refuses the scan. So a rerun with a
    version of mediasieve (or a model) whose rows differ from the committed ones stops, unless
    ``on_change="conform"``: new rows are then written in the committed schema (fields it lacks are dropped,
    fields it has that this version no longer fills are null). A changed type cannot be conformed.

    Args:
        out_dir: output directory URL.
        storage_options: fsspec options.
        newest_part: the latest run's part file (``CommittedState.newest_part``), None for a new output.
        current: the schema this version writes.
        on_change: ``fail`` or ``conform``.

    Raises:
        ConfigError: the schemas differ and they may not, or cannot, be conformed.
    """
    if newest_part is None:
        return current
    fs, _ = fsspec.core.url_to_fs(out_dir, **storage_options)
    with fs.open(newest_part, "rb") as f:
        committed = pq.read_schema(f)
    drift = schema_drift(committed, current)
    if not drift:
        return committed.remove_metadata()
    where = f"{out_dir} holds rows in another schema than this run writes ({drift.describe()})"
    if drift.changed:
        as_read = [f.name for f in current if f.name in committed.names and not f.type.equals(
            committed.field(f.name).type) and portable_type(committed.field(f.name).type).equals(f.type)]
        hint = (f" (the committed parts hold manifest column(s) {as_read} as read, by a version before "
                "input.portable_types: input.portable_types=false writes them so again)") if as_read else ""
        raise ConfigError(f"{where}; a changed type cannot be written into the same table: use a new output.dir"
                          f"{hint}")
    if on_change != "conform":
        raise ConfigError(f"{where}; use a new output.dir, or resume.on_schema_change=conform to write the new "
                          "rows in the committed schema (added fields dropped, removed fields null)")
    log.warning("%s; writing the new rows in the committed schema (resume.on_schema_change=conform)", where)
    return committed.remove_metadata()


def existing_output(out) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and root of the output ``out`` (an ``OutputConfig``) that a command works on.

    Raises:
        ConfigError: there is none (a mistyped ``output.dir``: said, not made, as taking its lease would make it).
    """
    fs, root = fsspec.core.url_to_fs(out.dir, **out.storage_options)
    if not fs.exists(root):
        raise ConfigError(f"no output at {out.dir}")
    return fs, root


def command_lease(out, who: str) -> OutputLease:
    """The lease of the existing output ``out``, taken for a command that changes it (``who``: compact, verify), so
    that it refuses while a run is live and a run refuses while it works. Release it when done.

    Raises:
        ConfigError: there is no output there (``existing_output``).
        OutputLockedError: a run (or another command) holds it.
    """
    existing_output(out)
    lease = OutputLease(out.dir, out.storage_options, f"{who}-{uuid.uuid4().hex[:8]}", out.lease_timeout_s)
    lease.acquire()
    return lease


def pending_indices(ids: pa.Array | pa.ChunkedArray, state: CommittedState, retry_failed: bool | str,
                    keep: pa.Array | None = None, for_good: pa.Array | None = None) -> pa.Array:
    """Positions (ascending, in manifest order) of the items this run must process.

    Args:
        ids: the manifest's id column.
        state: the committed state.
        retry_failed: whether ids with only failure rows run again (``retryable``: all but ``for_good``).
        keep: a mask over ``ids`` of the rows the manifest keeps (duplicates dropped, limit applied).
        for_good: with ``retry_failed=retryable``, the ids that failed for good (``failed_for_good``).
    """
    mask = pc.invert(pc.is_in(ids, value_set=state.succeeded))
    skip = state.failed_only if retry_failed is False else for_good if retry_failed == "retryable" else None
    if skip is not None and len(skip):
        mask = pc.and_(mask, pc.invert(pc.is_in(ids, value_set=skip)))
    if keep is not None:
        mask = pc.and_(mask, keep)
    return pc.indices_nonzero(mask)


class OutputLease:
    """A heartbeat file that marks the output directory as used by a live run.

    A second run refuses while the lease is fresh; a lease whose holder is gone (same host, dead pid) or whose
    heartbeat is older than ``timeout_s`` is taken over.

    Neither a filesystem rename nor an object-store PUT can say "only if absent" here, so two runs started at the
    same moment would both find the lease free and both write it. Each therefore reads the lease back after
    ``settle_s`` (longer than any writer takes between its check and its write): the last write stands, and every
    other run refuses. The heartbeat reads the lease before it writes it too: a run that finds another's record
    there (its own heartbeat was late, say a paused process, and another run took over) stops writing it and sets
    ``lost``, which the job turns into a stop.
    """

    def __init__(self, out_dir: str, storage_options: dict, run_id: str, timeout_s: float = 120.0,
                 settle_s: float | None = None, io_timeout_s: float | None = None):
        self.fs, root = fsspec.core.url_to_fs(out_dir, **storage_options)
        self.root = root.rstrip("/")
        self.path = f"{self.root}/{LEASE}"
        self.run_id = run_id
        self.timeout_s = timeout_s
        self.settle_s = settle_s if settle_s is not None else (0.2 if is_local_fs(self.fs) else 1.0)
        self.io_timeout_s = io_timeout_s
        """Taking and releasing the lease give up after this long (``output.commit_timeout_s``; None: no limit)."""
        self.lost: dict | None = None
        """The record of the run that took this lease over while it was held (set by the heartbeat)."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict:
        return {"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                "pid_start": start_ticks(os.getpid()), "heartbeat": time.time()}

    def _write(self) -> None:
        commit_bytes(self.fs, self.path, json.dumps(self._record()).encode(), f"{self.root}/_tmp")

    def read(self) -> dict | None:
        """The lease record as it stands (None where there is none, or it cannot be read)."""
        try:
            rec = json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        return rec if isinstance(rec, dict) else None

    def holder(self) -> dict | None:
        """The current lease record when it is live, else None."""
        rec = self.read()
        if rec is None:
            return None
        if rec.get("run_id") == self.run_id:
            return None
        if rec.get("host") == socket.gethostname():
            try:
                holder_alive = is_alive(int(rec.get("pid", -1)), int(rec.get("pid_start") or 0))
            except (TypeError, ValueError):
                holder_alive = False
            if not holder_alive:  # a pid alone may name a live process of a restarted container: the start tells
                return None
        if time.time() - float(rec.get("heartbeat", 0)) > self.timeout_s:
            return None
        return rec

    def acquire(self) -> None:
        """Take the lease and start the heartbeat, or raise OutputLockedError naming the live run (OutputHungError
        where the output does not answer within ``io_timeout_s``)."""
        bounded(self._check_free, self.io_timeout_s, f"taking the lease {self.path}")
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def _check_free(self) -> None:
        self.fs.makedirs(self.root, exist_ok=True)
        if is_local_fs(self.fs):
            self.fs.makedirs(f"{self.root}/_tmp", exist_ok=True)
        rec = self.holder()
        if rec is not None:
            age = time.time() - float(rec.get("heartbeat", 0))
            raise OutputLockedError(
                f"output directory is in use by live run {rec.get('run_id')} (host {rec.get('host')}, "
                f"pid {rec.get('pid')}, heartbeat {age:.0f}s ago); wait for it to finish, or stop it. "
                f"A crashed run's lease expires after {self.timeout_s:.0f}s."
            )
        self._write()
        time.sleep(self.settle_s)  # a run that found the lease free at the same moment has written it by now
        rec = self.read()
        if rec is None or rec.get("run_id") != self.run_id:
            rec = rec or {}
            raise OutputLockedError(
                f"output directory was taken at the same moment by run {rec.get('run_id')} (host {rec.get('host')}, "
                f"pid {rec.get('pid')}); wait for it to finish, or stop it")

    def _beat(self) -> None:
        while not self._stop.wait(max(1.0, self.timeout_s / 4)):
            try:
                rec = self.read()
                if rec is not None and rec.get("run_id") != self.run_id:
                    self.lost = rec  # never overwrite another run's lease: it holds the output now
                    log.error("run %s (host %s) took over the output lease: this run's heartbeat was late (a paused "
                              "process?); this run stops", rec.get("run_id"), rec.get("host"))
                    return
                self._write()
            except Exception as e:  # noqa: BLE001 - a missed heartbeat is logged; the next one may succeed
                log.warning("lease heartbeat failed: %s: %s", type(e).__name__, e)

    def release(self) -> None:
        """Stop the heartbeat and remove the lease (given up after ``io_timeout_s``: a hung output must not hold
        the process; the next run takes the lease over once its heartbeat is older than ``timeout_s``)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            bounded(self._remove_mine, self.io_timeout_s, f"releasing the lease {self.path}")
        except OutputHungError as e:
            log.error("%s; the next run takes the lease over once it is %.0fs old", e, self.timeout_s)

    def _remove_mine(self) -> None:
        try:
            rec = json.loads(self.fs.cat_file(self.path))
            if rec.get("run_id") == self.run_id:
                self.fs.rm_file(self.path)
        except FileNotFoundError:
            pass


def _leaves(d: dict, prefix: str = "") -> dict[str, object]:
    """A nested mapping as ``{"a.b.c": value}``; an empty mapping is a leaf of its own."""
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def identity_changes(recorded: dict, current: dict) -> tuple[list[str], list[str]]:
    """The settings (dotted) in which ``current`` differs from the ``recorded`` job identity, and the ``video`` and
    ``models`` settings the recorded one lacks (an older version's record: not a difference, but worth a warning)."""
    # a record written before identity_clean holds storage options and signed URLs: compared without them
    old, new = _leaves(identity_clean(recorded)), _leaves(current)
    unrecorded = sorted(k for k in new.keys() - old.keys() if k.startswith(("video.", "models.")))
    changed = sorted(k for k in old.keys() | new.keys()
                     if k not in unrecorded and (k not in old or k not in new or old[k] != new[k]))
    return changed, unrecorded


def rank_settings(identity: dict, out_dir: str, portable_types: bool = True) -> dict:
    """What every rank of one run must have been given alike: the job's identity (``job_identity``), the output
    directory and the types its manifest columns are written in (``input.portable_types``: the committed parts'
    schema guards it between runs, not within one). A node's cache directory, threads or timeouts may differ; these
    may not."""
    return {**identity, "input": {**identity.get("input", {}), "portable_types": portable_types},
            "output": {"dir": out_dir}}


def ranks_disagree(per_rank: list[dict]) -> str | None:
    """Why the ranks were not given the same job, or None: each setting (dotted) whose value differs between the
    ranks' ``rank_settings``, with the ranks that hold each value.

    Args:
        per_rank: every rank's ``rank_settings``, in rank order.
    """
    leaves = [_leaves(settings) for settings in per_rank]
    found = []
    for key in sorted(set().union(*leaves)):
        values = ranks_by_value((rank, ours.get(key, "(unset)")) for rank, ours in enumerate(leaves))
        if len(values) > 1:
            each = "; ".join(f"{json.dumps(v, default=str)[:80]} on rank{'s' if len(r) > 1 else ''} {ranks_shown(r)}"
                             for v, r in values)
            found.append(f"{key}: {each}")
    if not found:
        return None
    return (f"the ranks were not given the same job ({' | '.join(found[:6])}{' | ...' if len(found) > 6 else ''}): a "
            "node launched with other overrides or another copy of the config (a ConfigMap changed while the pods "
            "started?) would write rows of another job into this output. Every rank stops before any work: launch "
            "every node with the same config")


def recorded_config(out_dir: str, storage_options: dict) -> dict | None:
    """The ``_config.json`` an earlier run of ``out_dir`` recorded (None: there is none).

    Raises:
        ConfigError: it cannot be read as a JSON mapping.
    """
    fs, root = fsspec.core.url_to_fs(out_dir, **storage_options)
    path = f"{root.rstrip('/')}/{CONFIG}"
    try:
        recorded = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as e:  # zero bytes: a node that lost power as an older version wrote it
        raise ConfigError(f"the recorded config {path} cannot be read ({type(e).__name__}: {e}), so this run cannot "
                          f"check that {out_dir} holds output of this job: where it does, delete {CONFIG} (this run's "
                          "config is recorded in its place) and rerun; no row was touched") from e
    if not isinstance(recorded, dict):
        raise ConfigError(f"the recorded config {path} is not a mapping: where {out_dir} holds output of this job, "
                          f"delete {CONFIG} and rerun; no row was touched")
    return recorded


def _changed_weights(recorded: dict, current: dict, changed: list[str], weights: dict[str, dict]) -> str:
    """What a refusal says of models whose weights changed: where they are, and both digests (shortened)."""
    was, now = (recorded.get("identity") or {}).get("models") or {}, current.get("models") or {}
    said = [f"{(weights.get(k) or {}).get('uri', k)} ({shown(was.get(k))} then, {shown(now.get(k))} now)"
            for k in (c[len("models."):] for c in changed if c.startswith("models."))]
    return f"; the weights at {', '.join(said)} are not those its rows were made with" if said else ""


def check_or_record_config(out_dir: str, storage_options: dict, resolved: dict, identity: dict,
                           allow_change: bool, weights: dict[str, dict] | None = None, run_id: str = "",
                           software: list[dict[str, str]] | None = None, record: bool = True,
                           on_software_change: str = "warn") -> str:
    """Record the resolved config next to the output; on a rerun, refuse a different job.

    A ``video`` or ``models`` setting that the recorded identity lacks (written by a version before that setting
    was part of it, or before it existed) is not held against the rerun: it is logged, and recorded from now on.
    The record keeps the models' fingerprints (``weights``, for the next run's ``pipeline.weights.weigh_models``)
    and ``model_history``: the run from which each set of model digests made the rows (their ``run_id``); and
    ``software_history`` likewise for the ranks' software (``pipeline.software``): a change from the last run's is
    said, and refused with ``on_software_change="fail"`` where the output holds rows.

    Args:
        identity: the job identity, with its ``models`` digests where it has models.
        weights: ``pipeline.weights.weigh_models``'s fingerprints.
        run_id: this run's id, for ``model_history`` and ``software_history``.
        software: the distinct version sets of the ranks' software.
        record: write the record (False: only check, for ``jobs/preflight.py``).
        on_software_change: ``resume.on_software_change``.

    Returns:
        What the output is to this job: ``new``, ``the same job``, ``replaced`` (a record without rows),
        ``changed, allowed`` (``resume.allow_config_change``) or ``begun by an older version`` (settings it did not
        record).

    Raises:
        ConfigError: the recorded identity differs (the message names the settings, and the weights that changed)
            and ``resume.allow_config_change`` is false; or the software differs from the last run's, the output
            holds rows and ``on_software_change`` is ``fail``.
    """
    fs, root = fsspec.core.url_to_fs(out_dir, **storage_options)
    path = f"{root.rstrip('/')}/{CONFIG}"
    recorded = recorded_config(out_dir, storage_options)
    verdict = "new" if recorded is None else "the same job"
    if recorded is not None:
        changed, unrecorded = identity_changes(recorded.get("identity") or {}, identity)
        if changed and not part_files(fs, root):  # listed only on a change: an output of a million parts is slow to
            # a run that stopped before its first row (a model that did not load, a typo fixed since) left nothing to
            # mix with: its record is replaced, not held against the next
            log.warning("%s holds no rows yet: the config an earlier run recorded (%s differ) is replaced", out_dir,
                        ", ".join(changed[:8]))
            recorded, changed, unrecorded, verdict = None, [], [], "replaced"
        if unrecorded:
            verdict = "begun by an older version"
            log.warning("%s was begun by a version that did not record %s; rows written before may have been "
                        "computed otherwise", out_dir, ", ".join(unrecorded))
        if changed and not allow_change:
            raise ConfigError(
                f"{out_dir} holds output of a different job ({', '.join(changed[:8])}"
                f"{' and more' if len(changed) > 8 else ''} {'differs' if len(changed) == 1 else 'differ'} from "
                f"{CONFIG}{_changed_weights(recorded, identity, changed, weights or {})}); use a new output.dir, or "
                "resume.allow_config_change=true to continue anyway"
            )
        if changed:
            verdict = "changed, allowed"
            log.warning("resuming %s with a changed config (%s): resume.allow_config_change", out_dir,
                        ", ".join(changed[:8]))
    ran = list((recorded or {}).get("software_history") or [])
    software = sorted(software or [], key=lambda s: json.dumps(s, sort_keys=True))  # not by which rank ran which
    other_software = bool(software) and (not ran or ran[-1].get("software") != software)
    if other_software and ran:
        change = said(changes_between(ran[-1].get("software") or [], software))
        since = ran[-1].get("from_run")
        if on_software_change == "fail" and part_files(fs, root):
            raise ConfigError(f"{out_dir} holds rows made with other software than this run's ({change}; the "
                              f"software of run {since} on), and resume.on_software_change is fail: run the image "
                              "those rows were made with, or use a new output.dir")
        log.warning("this run's software differs from that of the runs before it (%s; since run %s): their rows may "
                    "differ for the same input; software_history in %s says which runs made which rows "
                    "(resume.on_software_change=fail refuses instead)", change, since, CONFIG)
    if not record:
        return verdict
    history = list((recorded or {}).get("model_history") or [])
    models = identity.get("models") or {}
    if models and (not history or history[-1].get("models") != models):
        history.append({"from_run": run_id, "models": models})
    if other_software:
        ran.append({"from_run": run_id, "software": software})
    body = json.dumps({"identity": identity, "config": redact(resolved), "models": weights or {},
                       "model_history": history, "software_history": ran}, indent=2, default=str).encode()
    commit_bytes(fs, path, body, f"{root.rstrip('/')}/_tmp")
    return verdict
