"""Where a job stands, read from its output and manifest without running it: for an operator during a week-long
job (is a run live, how far along, what failed, what the next run would take) and after a crash.

Nothing here writes to the output, takes the lease or starts a process group; a live run goes on untouched.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from typing import Any

import fsspec
import pyarrow.compute as pc

from pipeline import part_format
from pipeline.compaction import pending_plans
from pipeline.config import JobConfig
from pipeline.crashes import read_ledger
from pipeline.manifest import SPILL_DIR, open_manifest
from pipeline.quarantine import QUARANTINE_DIR, quarantined, read_past_damaged
from pipeline.resume import (
    CONFIG,
    SUCCESS_MARKER,
    SUMMARY,
    OutputLease,
    failed_for_good,
    latest_failures,
    part_files,
    pending_indices,
    read_committed,
)
from pipeline.weights import ModelSource, listed_anew, shown


def _read_json(fs, path: str) -> dict | None:
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None
    except ValueError:
        return {"unreadable": True}


def _progress(fs, files: list[str], run_id: str, left: int) -> dict[str, Any]:
    """The live run's pace from its committed rows (its id starts with its UTC start time) and, at that pace, the
    seconds until the items not yet committed are."""
    try:
        started = dt.datetime.strptime(run_id[:15], "%Y%m%dT%H%M%S").replace(tzinfo=dt.timezone.utc).timestamp()
    except ValueError:
        return {}
    done = 0
    if files:
        done = part_format.dataset(files, fs).count_rows(
            filter=pc.field("result_info", "run_id") == run_id)
    elapsed = max(1.0, time.time() - started)
    rate = done / elapsed
    return {"rows_committed": done, "items_per_s": round(rate, 3),
            "eta_s": round(left / rate) if rate > 0 else None}


DAMAGE_FIELDS = ("video_frames_lost", "audio_packets_lost", "corrupt_spans")


def damaged_items(fs, files: list[str]) -> int | None:
    """Success rows whose decodes met damage: frames or packets lost, or a span of a stretch or a broken tail
    (``result_info``'s ``DAMAGE_FIELDS``); None where the parts predate those fields."""
    if not files:
        return 0
    data = part_format.dataset(files, fs)
    info = data.schema.field("result_info").type
    if any(info.get_field_index(name) < 0 for name in DAMAGE_FIELDS):
        return None
    t = data.to_table(columns={name: pc.field("result_info", name) for name in DAMAGE_FIELDS},
                      filter=pc.field("result_info", "succeed"))
    damaged = pc.or_(pc.or_(pc.greater(pc.fill_null(t["video_frames_lost"], 0), 0),
                            pc.greater(pc.fill_null(t["audio_packets_lost"], 0), 0)),
                     pc.greater(pc.fill_null(pc.list_value_length(t["corrupt_spans"]), 0), 0))
    return pc.sum(damaged.cast("int64")).as_py() or 0


def _listed_anew(cfg: JobConfig, known: dict[str, dict]) -> dict[str, str]:
    """Per recorded model whose source lists other files, sizes or versions now: the next run reads it again, and
    refuses to go on if its digest differs (one listing each; nothing read). A model's fsspec options are the
    ``storage_options`` beside its setting in the config's filter (``<filter>.<setting>``), read from the specs:
    building the filters would import torch."""
    params = {spec.name: spec.params for spec in cfg.filters}
    out = {}
    for key, fp in known.items():
        name, *path = key.split(".")
        where = params.get(name) or {}
        for part in path[:-1]:
            where = where.get(part) or {} if isinstance(where, dict) else {}
        options = where.get("storage_options") or {} if isinstance(where, dict) else {}
        said = listed_anew(ModelSource(fp.get("uri", ""), options, tuple(fp.get("derived") or ())), fp)
        if said:
            out[key] = said
    return out


def _since(history: list[dict] | None) -> dict[str, Any]:
    """Of a ``_config.json`` history (``model_history``, ``software_history``): the run from which its latest entry
    made the rows, and how many other entries made rows of earlier runs."""
    history = history or []
    return {"since_run": history[-1].get("from_run") if history else None, "earlier_sets": max(len(history) - 1, 0)}


def job_status(cfg: JobConfig) -> dict[str, Any]:
    """The job's state from its committed output, its manifest, its lease and its crash ledger.

    Args:
        cfg: the job's validated config (the same one, with the same overrides, that the runs use).

    Returns:
        A JSON-ready mapping: ``run`` (live or not, the last complete run), ``items`` (manifest, succeeded, failed
        by type, without a row, succeeded with damage: ``damaged_items``), ``next_run`` (items the next
        run would process), ``output`` (part files, rows, interrupted compactions, second success rows of items),
        ``models`` (the weights recorded for the rows: digests or packaged versions, since which run, and how many
        earlier sets made rows of older runs) and ``crashes`` (ledger entries, refused items).
    """
    out = cfg.output
    fs, root = fsspec.core.url_to_fs(out.dir, **out.storage_options)
    root = root.rstrip("/")
    fs.invalidate_cache()

    lease = OutputLease(out.dir, out.storage_options, "status", out.lease_timeout_s)
    live = lease.holder()
    left = None if live is not None else lease.read()
    run: dict[str, Any] = {"live": live is not None}
    if live is not None:
        run.update(run_id=live.get("run_id"), host=live.get("host"), pid=live.get("pid"),
                   heartbeat_age_s=round(time.time() - float(live.get("heartbeat", 0)), 1))
    elif left is not None:
        run["stale_lease_of"] = left.get("run_id")  # a crashed run's: the next run takes it over
    summary = _read_json(fs, f"{root}/{SUMMARY}") or {}
    complete = _read_json(fs, f"{root}/{SUCCESS_MARKER}")
    run["last_summary"] = {"run_id": summary.get("run_id"), "finished_at": summary.get("finished_at")} \
        if summary.get("run_id") else None
    run["complete"] = complete is not None and not run["live"]

    spill = os.path.join(cfg.storage.cache_dir, SPILL_DIR)
    manifest = open_manifest(cfg.input, spill, f"status-{os.getpid()}")
    try:
        kept = manifest.kept_ids()

        def read(files: list[str]):
            state = read_committed(out.dir, out.storage_options, cfg.input.id_column, files)
            latest = latest_failures(fs, files, state, kept, cfg.input.id_column, cfg.input.path_column) \
                if files else {}
            for_good = failed_for_good(fs, files, state, cfg.input.id_column) \
                if cfg.resume.retry_failed == "retryable" else None
            return state, latest, for_good, damaged_items(fs, files)

        # a damaged part is named, not moved (no lease here): the next run or compaction moves it
        (state, latest, for_good, damaged), files, unreadable = read_past_damaged(fs, root, part_files(fs, root),
                                                                                  read, None)
        succeeded = pc.sum(pc.is_in(kept, value_set=state.succeeded)).as_py() or 0
        pending = len(pending_indices(manifest.ids, state, cfg.resume.retry_failed, manifest.keep, for_good))
        total = len(manifest)
    finally:
        manifest.close()
    if live is not None:
        run.update(_progress(fs, files, str(live.get("run_id")), pending))
    by_type: dict[str, int] = {}
    for rec in latest.values():
        by_type[rec["error_type"]] = by_type.get(rec["error_type"], 0) + 1
    plans = pending_plans(fs, root)
    recorded = _read_json(fs, f"{root}/{CONFIG}") or {}
    models = {"weights": (recorded.get("identity") or {}).get("models") or {},
              **_since(recorded.get("model_history")),
              "uris": {k: v.get("uri") for k, v in (recorded.get("models") or {}).items()},
              "listed_anew": _listed_anew(cfg, recorded.get("models") or {})}
    ledger = read_ledger(out.dir, out.storage_options).get("items", {})
    limit = cfg.resume.max_item_crashes
    return {
        "output_dir": out.dir,
        "run": run,
        "items": {"manifest": total, "succeeded": succeeded, "failed": len(latest), "failures_by_type": by_type,
                  "without_row": total - succeeded - len(latest), "damaged": damaged,
                  "done_fraction": round(succeeded / total, 6) if total else None},
        "next_run": {"would_process": pending, "retry_failed": cfg.resume.retry_failed},
        "output": {"part_files": len(files) + len(unreadable), "rows": state.rows, "interrupted_compactions": len(plans),
                   "duplicate_success_rows": state.duplicate_successes,
                   "damaged_parts": {path.rsplit("/", 1)[-1]: why for path, why in unreadable.items()},
                   "quarantined_parts": len(quarantined(fs, root))},
        "models": models,
        "software": _since(recorded.get("software_history")),
        "crashes": {"items": len(ledger),
                    "refused": sum(1 for e in ledger.values() if limit is not None and e.get("crashes", 0) >= limit)},
    }


def format_status(status: dict[str, Any]) -> str:
    """A short human-readable account of ``job_status``."""
    run, items, nxt, output, crashes = (status[k] for k in ("run", "items", "next_run", "output", "crashes"))
    if run["live"]:
        state = (f"LIVE: run {run['run_id']} on {run['host']} (pid {run['pid']}), heartbeat "
                 f"{run['heartbeat_age_s']:.0f}s ago")
        if "rows_committed" in run:
            eta = f", about {run['eta_s'] / 3600:.1f} h left at that pace" if run["eta_s"] is not None else ""
            state += f"; {run['rows_committed']} rows committed by it, {run['items_per_s']:.2f} items/s{eta}"
    elif run["complete"]:
        state = f"complete (run {run['last_summary']['run_id']}, finished {run['last_summary']['finished_at']})"
    else:
        state = "not running, not complete" + (f" (run {run['stale_lease_of']} died: its lease is stale)"
                                                if run.get("stale_lease_of") else "")
    share = f" ({100 * items['done_fraction']:.1f}%)" if items["done_fraction"] is not None else ""
    lines = [
        f"mediasieve job at {status['output_dir']}",
        f"  run      : {state}",
        f"  items    : {items['manifest']} in the manifest; {items['succeeded']} succeeded{share}, {items['failed']} "
        f"failed {json.dumps(items['failures_by_type'])}, {items['without_row']} without a row"
        + (f"; {items['damaged']} succeeded with damage (corrupt stretches or cut short: result_info.corrupt_spans)"
           if items.get("damaged") else ""),
        f"  next run : would process {nxt['would_process']} items"
        + {True: " (failed ones retried)", False: " (failed ones skipped)",
           "retryable": " (failed ones retried where their failure is retryable)"}[nxt["retry_failed"]],
        f"  output   : {output['part_files']} part files, {output['rows']} rows"
        + (f"; {output['interrupted_compactions']} interrupted compaction(s), finished by the next run or compaction"
           if output["interrupted_compactions"] else "")
        + (f"; {output['duplicate_success_rows']} second success row(s) of items, removed by the next complete run "
           "or jobs/compact.py" if output.get("duplicate_success_rows") else "")
        + (f"; {len(output['damaged_parts'])} DAMAGED part file(s) (cut short, garbled, or failing their page "
           f"checksums) ({', '.join(sorted(output['damaged_parts'])[:3])}{', ...' if len(output['damaged_parts']) > 3 else ''}): "
           f"the next run or jobs/compact.py moves them to {QUARANTINE_DIR}/ and the next run redoes their items"
           if output.get("damaged_parts") else "")
        + (f"; {output['quarantined_parts']} damaged part file(s) moved to {QUARANTINE_DIR}/ earlier"
           if output.get("quarantined_parts") else ""),
        f"  crashes  : {crashes['items']} item(s) in the crash ledger, {crashes['refused']} refused",
    ]
    models = status.get("models") or {}
    if models.get("weights"):
        said = [f"{k} {shown(v)}" + (f" ({models['uris'][k]})" if models["uris"].get(k) else "")
                for k, v in models["weights"].items()]
        lines.insert(-1, f"  models   : {'; '.join(said)}"
                     + (f", since run {models['since_run']}" if models.get("since_run") else "")
                     + (f"; rows of earlier runs were made with {models['earlier_sets']} other set(s) of weights "
                        f"(model_history in {CONFIG})" if models.get("earlier_sets") else "")
                     + "".join(f"; {k} at {models['uris'].get(k, k)}: {why} (the next run reads it again, and "
                               "refuses to go on if its digest differs)"
                               for k, why in models.get("listed_anew", {}).items()))
    software = status.get("software") or {}
    if software.get("earlier_sets"):
        lines.insert(-1, f"  software : the current set since run {software['since_run']}; rows of earlier runs were "
                         f"made with {software['earlier_sets']} other set(s) (software_history in {CONFIG})")
    return "\n".join(lines)
