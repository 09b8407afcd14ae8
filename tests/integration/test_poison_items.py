"""A poison file: an item that kills the process working on it with a real segmentation fault. Without the crash
ledger every attempt of a torchrun job dies on it again, until ``--max-restarts`` is spent; with it, the job
finishes by itself and the item has a ``CrashError`` row."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import ROOT, base_config, make_corpus, write_manifest
from tests.integration.test_elastic import _env

POISON = "id-0005"


def _job(tmp_path, media_dir, noop: dict, n: int = 12, **resume) -> list[str]:
    rows = make_corpus(str(tmp_path / "c"), media_dir, n)
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    raw = base_config(manifest, str(tmp_path / "c"), str(tmp_path / "out"), str(tmp_path / "cache"),
                      output={"dir": str(tmp_path / "out"), "rows_per_file": 2, "flush_interval_s": 1},
                      filters={"probe": {}, "noop": {"sleep_s": 0.2, "crash_ids": [POISON], **noop}},
                      resume=resume)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(raw))
    return [r["video_id"] for r in rows]


def _torchrun(tmp_path, restarts: int, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", str(restarts), os.path.join(ROOT, "jobs", "run.py"), "--config",
           str(tmp_path / "job.yaml"), *overrides]
    with open(tmp_path / "log.txt", "a") as log:
        return subprocess.run(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT, timeout=300)


def _latest_rows(out) -> dict[str, dict]:
    rows = pq.read_table(os.path.join(out, "parts")).to_pylist()
    latest: dict[str, dict] = {}
    for r in sorted(rows, key=lambda r: r["result_info"]["end_time"]):
        latest[r["video_id"]] = r["result_info"]
    return latest


def test_a_decoder_crash_is_caught_in_a_rehearsal_and_the_job_finishes(tmp_path, media_dir):
    ids = _job(tmp_path, media_dir, {})
    proc = _torchrun(tmp_path, 2)
    log = (tmp_path / "log.txt").read_text()
    assert proc.returncode == 0, log[-4000:]
    assert "SIGSEGV" in log or "Signals.SIGSEGV" in log or "exitcode  : -11" in log  # a worker did die
    latest = _latest_rows(str(tmp_path / "out"))
    assert sorted(latest) == sorted(ids)  # one row per item
    assert latest[POISON]["error_type"] == "CrashError" and "SIGSEGV" in latest[POISON]["error_message"]
    assert latest[POISON]["retryable"] is False
    assert all(latest[i]["succeed"] for i in ids if i != POISON)
    ledger = json.load(open(tmp_path / "out" / "_crashes.json"))["items"]
    assert ledger[POISON]["crashes"] == 1  # one death of the job's process, not one per attempt
    assert not os.listdir(tmp_path / "cache" / "_inflight")  # read, recorded, removed; clean exits leave none

    # a rerun retries the failure: the rehearsal dies again, the job's processes do not
    proc = _torchrun(tmp_path, 0)
    assert proc.returncode == 0, (tmp_path / "log.txt").read_text()[-4000:]
    assert _latest_rows(str(tmp_path / "out"))[POISON]["error_type"] == "CrashError"
    assert json.load(open(tmp_path / "out" / "_crashes.json"))["items"][POISON]["crashes"] == 1


def test_a_crash_the_rehearsal_misses_is_pinned_on_its_item_by_running_suspects_alone(tmp_path, media_dir):
    # A crash in a model (not in the decode the rehearsal repeats): the suspects of the first death all pass their
    # rehearsals; run one at a time, only the poison item is in flight at the second death, so only it reaches
    # resume.max_item_crashes=2 and is refused on the third attempt; its neighbours of the first death succeed.
    ids = _job(tmp_path, media_dir, {"crash_in_rehearsal": False})
    proc = _torchrun(tmp_path, 3)
    log = (tmp_path / "log.txt").read_text()
    assert proc.returncode == 0, log[-4000:]
    latest = _latest_rows(str(tmp_path / "out"))
    assert sorted(latest) == sorted(ids)
    assert [i for i in ids if not latest[i]["succeed"]] == [POISON]
    assert latest[POISON]["error_type"] == "CrashError" and "died 2 times" in latest[POISON]["error_message"]
    ledger = json.load(open(tmp_path / "out" / "_crashes.json"))["items"]
    assert ledger[POISON]["crashes"] == 2 and all(e["crashes"] == 1 for i, e in ledger.items() if i != POISON)


def test_without_the_ledger_every_attempt_dies_on_the_same_item(tmp_path, media_dir):
    _job(tmp_path, media_dir, {}, max_item_crashes=None)
    proc = _torchrun(tmp_path, 2)
    assert proc.returncode != 0
    latest = _latest_rows(str(tmp_path / "out"))
    assert POISON not in latest and not (tmp_path / "out" / "_crashes.json").exists()


def _suspect_job(tmp_path, media_dir, crashes: int, **noop):
    """An in-process job over 4 clips whose output's ledger already names id-0001 (as a death of an earlier run
    would have left it)."""
    from pipeline.config import build_config, validate_config

    rows = make_corpus(str(tmp_path / "c"), media_dir, 4)
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    out = tmp_path / "out"
    out.mkdir()
    (out / "_crashes.json").write_text(json.dumps({"items": {"id-0001": {"crashes": crashes}}}))
    raw = base_config(manifest, str(tmp_path / "c"), str(out), str(tmp_path / "cache"),
                      filters={"probe": {}, "noop": noop})
    cfg = build_config(raw)
    validate_config(cfg)
    return cfg


def test_in_process_a_suspect_whose_rehearsal_dies_gets_its_row_and_the_job_goes_on(tmp_path, media_dir):
    from pipeline.distributed import DistContext
    from pipeline.runner import run_rank

    summary = run_rank(_suspect_job(tmp_path, media_dir, 1, crash_ids=["id-0001"]), DistContext()).summary
    latest = _latest_rows(str(tmp_path / "out"))
    assert latest["id-0001"]["error_type"] == "CrashError" and "SIGSEGV" in latest["id-0001"]["error_message"]
    assert summary["total"]["succeeded"] == 3
    (log,) = (tmp_path / "out" / "_logs").iterdir()  # the rank's metrics say what the safeguard did
    last = json.loads(log.read_text().splitlines()[-1])
    assert last["suspects_rehearsed"] == 1 and last["suspects_refused"] == 1 and last["cache_bytes"] > 0


def test_a_rehearsal_that_cannot_run_does_not_stop_the_rank(tmp_path, media_dir, monkeypatch, caplog):
    from pipeline.crashes import Rehearser
    from pipeline.distributed import DistContext
    from pipeline.runner import run_rank

    def broken(self, *a, **k):
        raise OSError("no fork for you")

    monkeypatch.setattr(Rehearser, "rehearse", broken)
    summary = run_rank(_suspect_job(tmp_path, media_dir, 1), DistContext()).summary
    assert summary["total"]["succeeded"] == 4  # the suspect ran alone in the job's process, and passed
    assert "its rehearsal could not run" in caplog.text


def test_an_item_at_the_crash_limit_is_not_tried(tmp_path, media_dir, monkeypatch):
    from pipeline.crashes import Rehearser
    from pipeline.distributed import DistContext
    from pipeline.runner import run_rank

    monkeypatch.setattr(Rehearser, "rehearse", lambda *a, **k: pytest.fail("a refused item is not rehearsed"))
    run_rank(_suspect_job(tmp_path, media_dir, 2), DistContext())
    latest = _latest_rows(str(tmp_path / "out"))
    assert latest["id-0001"]["error_type"] == "CrashError" and "died 2 times" in latest["id-0001"]["error_message"]
    assert latest["id-0001"]["retryable"] is False
