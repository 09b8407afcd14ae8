"""``jobs/status.py``: a job's state read from its output, during a live run, after a complete one and after a
crash, agreeing with what the runs themselves say; it writes nothing."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import yaml

from pipeline.config import build_config, validate_config
from pipeline.distributed import DistContext
from pipeline.runner import run_rank
from pipeline.status import format_status, job_status
from tests.conftest import ROOT, base_config, make_corpus, write_manifest


def _corpus_job(tmp_path, media_dir, **sections) -> dict:
    corpus = tmp_path / "corpus"
    rows = make_corpus(str(corpus), media_dir, 5)
    for name in ("empty.mp4", "random.mp4"):
        os.link(os.path.join(media_dir, "broken", name), corpus / name)
        rows.append({"video_id": f"bad-{name}", "video_path": name, "batch": 9})
    rows.append({"video_id": "gone", "video_path": "missing.mp4", "batch": 9})
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    return base_config(manifest, str(corpus), str(tmp_path / "out"), str(tmp_path / "cache"), **sections)


def _cfg(raw):
    cfg = build_config(raw)
    validate_config(cfg)
    return cfg


def _listing(root: str) -> dict[str, float]:
    return {os.path.join(d, f): os.path.getmtime(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs}


def test_status_after_a_complete_run_agrees_with_its_summary_and_writes_nothing(tmp_path, media_dir):
    raw = _corpus_job(tmp_path, media_dir)
    outcome = run_rank(_cfg(raw), DistContext())
    out = str(tmp_path / "out")
    before = _listing(out)
    status = job_status(_cfg(raw))
    assert _listing(out) == before  # not a file touched
    total = outcome.summary["total"]
    assert status["run"]["live"] is False and status["run"]["complete"] is True
    assert status["run"]["last_summary"]["run_id"] == outcome.run_id
    assert status["items"] == {"manifest": 8, "succeeded": total["succeeded"], "failed": total["failed"],
                               "failures_by_type": total["failures_by_type"], "without_row": 0, "damaged": 0,
                               "done_fraction": round(5 / 8, 6)}
    assert total["failures_by_type"] == {"DecodeError": 2, "NotFoundError": 1}
    assert status["next_run"] == {"would_process": 3, "retry_failed": True}  # the failures, retried
    assert status["output"]["rows"] == 8 and status["output"]["part_files"] >= 2
    assert status["crashes"] == {"items": 0, "refused": 0}
    raw["resume"] = {"retry_failed": False}
    assert job_status(_cfg(raw))["next_run"]["would_process"] == 0
    raw["resume"] = {"retry_failed": "retryable"}  # a decode error and a missing file are failures for good
    for_good = job_status(_cfg(raw))
    assert for_good["next_run"] == {"would_process": 0, "retry_failed": "retryable"}
    assert "(failed ones retried where their failure is retryable)" in format_status(for_good)
    text = format_status(status)
    assert "complete (run " in text and "5 succeeded (62.5%), 3 failed" in text


def test_status_of_a_live_run_names_it(tmp_path, media_dir):
    raw = _corpus_job(tmp_path, media_dir, filters={"noop": {"sleep_s": 1.0}},
                      runtime={"consumers": 1, "producers": 1, "progress": False}, output={"rows_per_file": 2})
    result = {}
    thread = threading.Thread(target=lambda: result.update(outcome=run_rank(_cfg(raw), DistContext())))
    thread.start()
    try:
        deadline = time.time() + 60
        parts = tmp_path / "out" / "parts"
        while not (parts.is_dir() and any(parts.iterdir())) and time.time() < deadline:
            time.sleep(0.05)  # the first part committed: 2 rows, about 2 s in; the run takes about 8 s
        status = job_status(_cfg(raw))
    finally:
        thread.join(120)
    run = status["run"]
    assert run["live"] is True and run["host"] == socket.gethostname() and run["pid"] == os.getpid()
    assert run["run_id"] == result["outcome"].run_id and run["heartbeat_age_s"] < 30
    assert 2 <= run["rows_committed"] < 8 and 0 < run["items_per_s"] < 2 and run["eta_s"] > 0
    assert status["run"]["complete"] is False and status["items"]["succeeded"] < 8
    assert "LIVE: run " in format_status(status)
    assert result["outcome"].summary["this_run"]["items"] == 8  # the run went on untouched


def test_status_after_a_crash_reports_the_stale_lease_the_ledger_and_an_interrupted_compaction(tmp_path, media_dir):
    raw = _corpus_job(tmp_path, media_dir, resume={"max_item_crashes": 2})
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / "_lease.json").write_text(json.dumps({"run_id": "20261202T000000-deadbeef", "host": socket.gethostname(),
                                                 "pid": int(dead.stdout), "pid_start": 1, "heartbeat": time.time()}))
    (out / "_crashes.json").write_text(json.dumps({"items": {"id-0001": {"crashes": 2}, "id-0002": {"crashes": 1}}}))
    (out / "_compaction").mkdir()
    plan = {"token": "0123abcd-000000", "target": "part-x.parquet", "sources": []}
    (out / "_compaction" / "0123abcd-000000.json").write_text(json.dumps(plan))
    status = job_status(_cfg(raw))
    assert status["run"] == {"live": False, "stale_lease_of": "20261202T000000-deadbeef", "last_summary": None,
                             "complete": False}
    assert status["crashes"] == {"items": 2, "refused": 1}
    assert status["output"] == {"part_files": 0, "rows": 0, "interrupted_compactions": 1,
                                "duplicate_success_rows": 0, "damaged_parts": {}, "quarantined_parts": 0}
    assert status["items"]["without_row"] == 8 and status["next_run"]["would_process"] == 8
    text = format_status(status)
    assert "its lease is stale" in text and "1 interrupted compaction(s)" in text and "1 refused" in text


def test_the_command_line_prints_json_and_names_a_bad_manifest(tmp_path, media_dir):
    raw = _corpus_job(tmp_path, media_dir)
    run_rank(_cfg(raw), DistContext())
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(raw))
    command = [sys.executable, os.path.join(ROOT, "jobs", "status.py"), "--config", str(config)]
    proc = subprocess.run(command + ["--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["items"]["succeeded"] == 5
    os.remove(tmp_path / "m.parquet")
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "m.parquet" in proc.stderr


def test_status_and_compact_read_the_output_without_loading_the_work(tmp_path, media_dir):
    """They check the output's part of the config, not the decoders and filters (whose modules import torch: 2 s to
    load, as long to unload): they start at once, and still answer when the job's filter settings have since
    changed to something the job itself would refuse."""
    raw = _corpus_job(tmp_path, media_dir)
    run_rank(_cfg(raw), DistContext())
    raw["filters"]["noop"] = {"sleep_s": 0.1, "no_such_param": 1}  # the job refuses this config now
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(raw))
    probe = ("import runpy, sys; sys.argv = sys.argv[1:]\n"
             "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
             "except SystemExit as e:\n    print('exit', e.code, 'torch' in sys.modules)\n")
    for script, args in (("status.py", ["--json"]), ("compact.py", ["--dry-run"])):
        proc = subprocess.run([sys.executable, "-c", probe, os.path.join(ROOT, "jobs", script), "--config",
                               str(config), *args], capture_output=True, text=True, timeout=120)
        assert proc.stdout.strip().splitlines()[-1] == "exit 0 False", (script, proc.stdout, proc.stderr)
    assert '"succeeded": 5' in subprocess.run(
        [sys.executable, os.path.join(ROOT, "jobs", "status.py"), "--config", str(config), "--json"],
        capture_output=True, text=True, timeout=120).stdout
    run = subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "run.py"), "--config", str(config)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "no_such_param" in run.stderr


def test_status_of_parts_older_than_the_damage_fields_says_unknown(tmp_path):
    """Parts written before ``result_info`` had ``video_frames_lost``, ``audio_packets_lost`` and ``corrupt_spans``:
    how many items succeeded with damage is unknown (None), not 0; with the fields it is counted (a span alone too:
    audio cut short by a broken tail)."""
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.status import damaged_items

    fs = fsspec.filesystem("file")
    old = str(tmp_path / "old.parquet")
    pq.write_table(pa.table({"video_id": ["a"], "result_info": [{"succeed": True, "frames_decoded": 8}]}), old)
    assert damaged_items(fs, [old]) is None
    new = str(tmp_path / "new.parquet")
    span = [{"stream": "audio", "start_s": 1.0, "end_s": 2.0}]
    infos = [{"succeed": True, "video_frames_lost": 3, "audio_packets_lost": None, "corrupt_spans": []},
             {"succeed": True, "video_frames_lost": 0, "audio_packets_lost": 2, "corrupt_spans": []},
             {"succeed": True, "video_frames_lost": 0, "audio_packets_lost": 0, "corrupt_spans": span},
             {"succeed": True, "video_frames_lost": 0, "audio_packets_lost": 0, "corrupt_spans": []},
             {"succeed": True, "video_frames_lost": None, "audio_packets_lost": 0, "corrupt_spans": []},
             {"succeed": False, "video_frames_lost": None, "audio_packets_lost": None, "corrupt_spans": None}]
    pq.write_table(pa.table({"video_id": list("abcdef"), "result_info": infos}), new)
    assert damaged_items(fs, [new]) == 3 and damaged_items(fs, []) == 0
