"""A rehearsal of a job before it is submitted: on this machine, in minutes, what would otherwise be learnt after a
queue wait, on 64 GPUs. It checks the output (writable, no live run, and whether the job would resume it or be
refused), then runs the real job, in one process, on a random sample of the manifest into a scratch directory:
the tiers fetch, the models load, the filters run, and the rows say what fails and how fast the rest goes.

Nothing is written to the job's output but one probe file, removed at once.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import shutil
import statistics
import tempfile
import time
import uuid
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import JobConfig, to_dict
from pipeline.errors import ConfigError, ManifestError, MediasieveError
from pipeline.manifest import SPILL_DIR, list_glob, open_manifest
from pipeline.resume import OutputLease, check_or_record_config, part_files, recorded_config
from pipeline.software import software_versions
from pipeline.weights import shown
from pipeline.writer import bounded, commit_bytes, is_local_fs

log = logging.getLogger(__name__)


def check_output(cfg: JobConfig, model_cache: str) -> dict[str, Any]:
    """What the job's output directory would say to a run started now: a live run holding it, whether a file can be
    committed there (one probe file, removed), and whether the job would resume it or be refused (the models are
    read for their digests, copied into ``model_cache``: the sample run's, which then loads them)."""
    out = cfg.output
    fs, root = fsspec.core.url_to_fs(out.dir, **out.storage_options)
    root = root.rstrip("/")
    report: dict[str, Any] = {"dir": out.dir}
    try:
        live = OutputLease(out.dir, out.storage_options, "preflight", out.lease_timeout_s).holder()
    except Exception as e:  # noqa: BLE001 - an output that cannot be read: the probe below says so too
        live, report["read_error"] = None, f"{type(e).__name__}: {e}"
    report["live_run"] = None if live is None else {k: live.get(k) for k in ("run_id", "host", "pid")}

    def probe() -> None:
        existed = fs.exists(root)
        path = f"{root}/_tmp/preflight-{uuid.uuid4().hex[:12]}.probe"
        commit_bytes(fs, path, b"mediasieve preflight\n", f"{root}/_tmp")
        fs.rm_file(path)
        if is_local_fs(fs) and not existed and not fs.find(root):  # no directory left where there was none (an
            fs.rm(root, recursive=True)  # object store has no directories)

    try:
        bounded(probe, out.commit_timeout_s, f"committing a probe file to {out.dir}")
        report["writable"], report["write_error"] = True, None
    except Exception as e:  # noqa: BLE001 - said in the report
        report["writable"], report["write_error"] = False, f"{type(e).__name__}: {e}"
    from pipeline.runner import weighed_identity

    try:
        recorded = recorded_config(out.dir, out.storage_options)
        identity, weights = weighed_identity(cfg, recorded, model_cache)
        report["resume"] = check_or_record_config(out.dir, out.storage_options, to_dict(cfg), identity,
                                                  cfg.resume.allow_config_change, weights,
                                                  software=[software_versions()], record=False,
                                                  on_software_change=cfg.resume.on_software_change)
        report["refused"] = None
        report["models"] = identity.get("models") or {}
        report["rows_committed"] = bool(recorded is not None and part_files(fs, root))
    except ConfigError as e:
        report["resume"], report["refused"] = "refused", str(e)
    except Exception as e:  # noqa: BLE001 - an output that cannot be read (its problem is the probe's)
        report["resume"], report["refused"] = f"unknown ({type(e).__name__}: {e})", None
    return report


def draw_sample(cfg: JobConfig, scratch: str, items: int, seed: int) -> tuple[str, int]:
    """``items`` rows of the manifest drawn at random (the whole of it where it is smaller), written to a Parquet
    manifest in ``scratch`` with every column of the original; returns its path and the manifest's item count.
    A listing job lists its glob here (as rank 0 would at the start)."""
    source = cfg.input
    if source.listing_glob:
        listed = os.path.join(scratch, "listing.parquet")
        pq.write_table(list_glob(source), listed)
        source = dataclasses.replace(source, manifest=listed, format="parquet", listing_glob=None,
                                     storage_options={})
    manifest = open_manifest(source, os.path.join(scratch, SPILL_DIR), "preflight")
    try:
        kept = np.arange(len(manifest.ids)) if manifest.keep is None else np.flatnonzero(manifest.keep.to_numpy(
            zero_copy_only=False))
        chosen = np.sort(np.random.default_rng(seed).choice(kept, size=min(items, len(kept)), replace=False))
        rows = manifest.rows(chosen)
        schema, total = manifest.schema, len(manifest)
    finally:
        manifest.close()
    path = os.path.join(scratch, "sample.parquet")
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path, total


def scratch_config(cfg: JobConfig, scratch: str) -> JobConfig:
    """``cfg`` with its output, node cache and model cache in ``scratch`` and no metrics port or progress bar: the
    sample run's."""
    return dataclasses.replace(
        cfg,
        output=dataclasses.replace(cfg.output, dir=os.path.join(scratch, "out"), storage_options={}),
        storage=dataclasses.replace(cfg.storage, cache_dir=os.path.join(scratch, "cache")),
        runtime=dataclasses.replace(cfg.runtime, prometheus_port=None, progress=False),
        model_pool=dataclasses.replace(cfg.model_pool, model_cache_dir=None),
    )


def run_sample(cfg: JobConfig, sample: str, device: str) -> tuple[dict[str, Any], list[dict]]:
    """The real job over ``sample`` in one process, with ``cfg`` a ``scratch_config`` (its own output, node cache
    and model cache; no metrics port): returns the run summary and each row's id and ``result_info``."""
    from pipeline.distributed import DistContext
    from pipeline.runner import run_rank

    cfg = dataclasses.replace(cfg, input=dataclasses.replace(cfg.input, manifest=sample, format="parquet",
                                                             listing_glob=None, limit=None, storage_options={}))
    outcome = run_rank(cfg, DistContext(), device)
    table = pq.read_table(os.path.join(cfg.output.dir, "parts"), columns=[cfg.input.id_column, "result_info"])
    rows = [{"id": r[cfg.input.id_column], **r["result_info"]} for r in table.to_pylist()]
    return outcome.summary or {}, rows


def _seconds(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)
    return {"median": round(statistics.median(ordered), 3), "p90": round(ordered[int(0.9 * (len(ordered) - 1))], 3),
            "max": round(ordered[-1], 3)}


def _per_filter(rows: list[dict]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for r in rows:
        for name, seconds in r.get("filter_s") or []:
            out.setdefault(name, []).append(seconds)
    return out


def judge_sample(rows: list[dict], summary: dict[str, Any], total: int, world_size: int) -> dict[str, Any]:
    """What the sample's rows say: successes, failures by type (with the first messages), items with damage, the
    seconds an item took, the pace once the models were loaded (the span from the first item's start to the last
    one's end), and at that pace per rank, the hours the whole manifest would take on ``world_size`` ranks."""
    ok = [r for r in rows if r["succeed"]]
    failed = [r for r in rows if not r["succeed"]]
    by_type: dict[str, int] = {}
    for r in failed:
        by_type[r["error_type"]] = by_type.get(r["error_type"], 0) + 1
    pace = None
    if rows:
        span = (max(r["end_time"] for r in rows) - min(r["start_time"] for r in rows)) / dt.timedelta(seconds=1)
        pace = round(len(rows) / span, 3) if span > 0 else None
    return {
        "items": len(rows), "succeeded": len(ok), "failed": len(failed), "failures_by_type": by_type,
        "failures": [{"id": r["id"], "error_type": r["error_type"], "error_message": r["error_message"]}
                     for r in failed[:10]],
        "damaged": sum(1 for r in ok if r.get("corrupt_spans")),
        "tier_hits": (summary.get("this_run") or {}).get("tier_hits", {}),
        "item_s": _seconds([r["cost_s"] for r in rows if r.get("cost_s") is not None]),
        "fetch_s": _seconds([r["fetch_s"] for r in rows if r.get("fetch_s") is not None]),
        "filter_s": _seconds([sum(s for _, s in r["filter_s"]) for r in rows if r.get("filter_s")]),
        "per_filter_s": {name: _seconds(values)["median"] for name, values in _per_filter(rows).items()},
        "items_per_s_per_rank": pace,
        "manifest_items": total,
        "world_size": world_size,
        "hours_at_that_pace": round(total / (pace * world_size) / 3600, 4) if pace else None,
    }


def preflight(cfg: JobConfig, items: int = 16, world_size: int = 1, seed: int = 0,
              scratch: str | None = None) -> dict[str, Any]:
    """Check the output and rehearse the job on a sample; see the module's docstring.

    Args:
        cfg: the job's validated config.
        items: how many manifest rows to run.
        world_size: the ranks the job will run on, for the estimate.
        seed: the sample's random seed.
        scratch: a directory for the sample run (default: a temporary one, removed after).

    Returns:
        ``{"output", "sample", "device", "software", "problems"}``: ``problems`` lists what would stop the job or
        make it useless (a live run, an output it cannot write or would refuse, every sampled item failing).

    Raises:
        ConfigError, ManifestError: as the job would, before any work.
    """
    from pipeline.distributed import resolve_device

    own = scratch is None
    scratch = scratch or tempfile.mkdtemp(prefix="mediasieve-preflight-")
    os.makedirs(scratch, exist_ok=True)
    started = time.time()
    try:
        from pipeline.runner import model_cache_dir

        device = resolve_device(cfg.runtime.device, 0)
        local = scratch_config(cfg, scratch)
        output = check_output(cfg, model_cache_dir(local))
        sample, total = draw_sample(cfg, scratch, items, seed)
        try:
            summary, rows = run_sample(local, sample, device)
            judged, stopped = judge_sample(rows, summary, total, world_size), None
        except (ConfigError, ManifestError):
            raise
        except MediasieveError as e:  # a stall, a GPU failure in strict mode: what the job would meet too
            judged, stopped = judge_sample([], {}, total, world_size), f"{type(e).__name__}: {e}"
    finally:
        if own:
            shutil.rmtree(scratch, ignore_errors=True)
    problems = [f"the sample run stopped: {stopped}"] if stopped else []
    if output["live_run"]:
        problems.append(f"a run is live on {output['dir']} ({output['live_run']['host']}, pid "
                        f"{output['live_run']['pid']}): a job started now would stop with OutputLockedError")
    if not output["writable"]:
        problems.append(f"nothing can be committed to {output['dir']}: {output['write_error']}")
    if output.get("refused"):
        problems.append(f"the job would be refused: {output['refused']}")
    if judged["items"] and not judged["succeeded"]:
        problems.append(f"every sampled item failed ({judged['failures_by_type']}): check storage.tiers, the "
                        "credentials and the manifest's paths")
    return {"output": output, "sample": judged, "device": device, "software": software_versions(),
            "seconds": round(time.time() - started, 1), "problems": problems}


def _duration(hours: float) -> str:
    if hours < 1 / 60:
        return "under a minute"
    if hours < 1:
        return f"about {hours * 60:.0f} min"
    return f"about {hours:.1f} h" if hours < 48 else f"about {hours / 24:.1f} days"


def format_preflight(report: dict[str, Any]) -> str:
    """A short human-readable account of ``preflight``."""
    out, s = report["output"], report["sample"]
    resume = {"new": "a new output", "the same job": "resumes the same job", "replaced": "holds no rows yet: its "
              "recorded config is replaced", "changed, allowed": "resumes with a changed config "
              "(resume.allow_config_change)", "begun by an older version": "resumes an output an older version "
              "began", "refused": "REFUSED"}.get(out["resume"], out["resume"])
    lines = [f"mediasieve preflight ({report['seconds']:.0f}s on {report['device']})",
             f"  output   : {out['dir']}: {'writable' if out['writable'] else 'NOT WRITABLE'}; "
             f"{'LIVE RUN ' + str(out['live_run']['run_id']) if out['live_run'] else 'no live run'}; {resume}"]
    if out.get("models"):
        lines.append("  models   : " + "; ".join(f"{k} {shown(v)}" for k, v in out["models"].items()))
    lines.append(f"  sample   : {s['items']} of {s['manifest_items']} items: {s['succeeded']} ok, {s['failed']} failed "
                 f"{s['failures_by_type'] or ''}".rstrip()
                 + (f", {s['damaged']} with damage" if s["damaged"] else "") + f"; tiers {s['tier_hits']}")
    for f in s["failures"][:5]:
        lines.append(f"             {f['id']}: {f['error_type']}: {(f['error_message'] or '')[:160]}")
    if s["item_s"]:
        lines.append(f"  per item : {s['item_s']['median']:.2f}s median, {s['item_s']['p90']:.2f}s p90, "
                     f"{s['item_s']['max']:.2f}s max; medians: fetch {(s['fetch_s'] or {}).get('median', 0):.2f}s, "
                     + ", ".join(f"{k} {v:.2f}s" for k, v in sorted(s["per_filter_s"].items(), key=lambda kv: -kv[1])))
    if s["items_per_s_per_rank"]:
        lines.append(f"  pace     : {s['items_per_s_per_rank']:.2f} items/s for one rank here, once its models "
                     f"were loaded: the {s['manifest_items']} items in {_duration(s['hours_at_that_pace'])} on "
                     f"{s['world_size']} rank(s) like it (a sample's pace: the cluster's devices, storage and "
                     "sizes decide)" + ("; the output holds rows already: jobs/status.py says how many the next run "
                                        "takes" if out.get("rows_committed") else ""))
    lines += [f"  PROBLEM  : {p}" for p in report["problems"]] or ["  verdict  : ready to submit"]
    return "\n".join(lines)
