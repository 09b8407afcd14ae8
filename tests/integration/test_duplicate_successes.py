"""Second success rows of an item (a part that landed after its run gave it up as hung, while a rerun redid its items):
counted by every resume scan and by the status, removed by the end of the next complete run and by ``compact``,
keeping the latest; failure rows are never touched, and a removal killed part-way loses no row.

The real cause, an object store's PUT that lands late, is reproduced in ``test_hung_storage.py``; here the extra
parts are written by hand so that every layout is covered: a part of nothing but second rows, a part that mixes
them with rows to keep, and one item's success row twice in one part."""

from __future__ import annotations

import datetime as dt
import os
import re
import subprocess
import sys
from collections import Counter

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import compaction
from pipeline.compaction import compact, finish_pending, pending_plans, remove_duplicate_successes
from pipeline.config import build_config, validate_config
from pipeline.distributed import DistContext
from pipeline.resume import read_committed
from pipeline.runner import run_rank
from pipeline.status import format_status, job_status
from tests.conftest import ROOT, base_config, write_manifest

LATER = "29990101T000000-1a7e1a7e"  # a run that sorts after the job's own


def _job(tmp_path, n: int = 12) -> dict:
    out = str(tmp_path / "out")
    rows = [{"video_id": f"id-{i:04d}", "video_path": f"v/{i}.mp4"} for i in range(n)]
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    return base_config(manifest, "unused", out, str(tmp_path / "cache"), filters={"noop": {}},
                       storage={"cache_dir": str(tmp_path / "cache"), "fetch": False},
                       output={"dir": out, "rows_per_file": 3})


def _run(raw):
    cfg = build_config(raw)
    validate_config(cfg)
    return run_rank(cfg, DistContext())


def _parts(out: str) -> list[str]:
    d = os.path.join(out, "parts")
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".parquet"))


def _rows(out: str) -> list[dict]:
    rows = []
    for p in _parts(out):
        rows += pq.read_table(p).to_pylist()
    return rows


def _shifted(row: dict, hours: float, **info) -> dict:
    row = {**row, "result_info": {**row["result_info"], **info}}
    row["result_info"]["end_time"] += dt.timedelta(hours=hours)
    return row


def _with_second_rows(tmp_path) -> tuple[dict, dict]:
    """A real job's output plus three parts written as a late one would be. Returns the config and what to expect:
    the second success rows, and the kept end times of the items whose kept row is in a hand-written part."""
    raw = _job(tmp_path)
    assert _run(raw).summary["this_run"]["succeeded"] == 12
    out = raw["output"]["dir"]
    parts = _parts(out)
    assert len(parts) == 4
    schema = pq.read_schema(parts[0])
    p = [pq.read_table(f).to_pylist() for f in parts]

    def write(name: str, rows: list[dict]) -> None:
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), os.path.join(out, "parts", name))

    # a late part: part 0's three items done an hour earlier, by a run that gave the part up (all second rows: the
    # part goes whole)
    write(f"part-{LATER}-r0-000000.parquet", [_shifted(r, -1) for r in p[0]])
    # a mixed part: an older row of part 1's first item (dropped); a newer row of part 2's first item (kept here:
    # part 2 is rewritten without its row); a failure row of part 3's first item (failure rows stay)
    newer = _shifted(p[2][0], 1)
    failure = _shifted(p[3][0], 1, succeed=False, error_type="DecodeError", error_message="late failure")
    write(f"part-{LATER}-r1-000000.parquet", [_shifted(p[1][0], -1), newer, failure])
    # an item outside the others, its success row twice in one part (the newer, second one stays)
    extra = {**p[3][1], "video_id": "id-extra"}
    write(f"part-{LATER}-r2-000000.parquet", [extra, _shifted(extra, 1)])
    return raw, {"second_rows": 3 + 2 + 1, "failed": failure["video_id"],
                 "kept_end": {newer["video_id"]: newer["result_info"]["end_time"],
                              "id-extra": extra["result_info"]["end_time"] + dt.timedelta(hours=1)}}


def _successes(rows: list[dict]) -> Counter:
    return Counter(r["video_id"] for r in rows if r["result_info"]["succeed"])


def test_second_success_rows_are_counted_and_removed_keeping_the_first(tmp_path):
    raw, want = _with_second_rows(tmp_path)
    out = raw["output"]["dir"]
    before = _rows(out)
    assert read_committed(out, {}, "video_id").duplicate_successes == want["second_rows"]
    cfg = build_config(raw)
    validate_config(cfg)
    status = job_status(cfg)
    assert status["output"]["duplicate_success_rows"] == want["second_rows"]
    assert "6 second success row(s) of items" in format_status(status)
    assert compact(out, {}, dry_run=True, id_column="video_id").duplicates_removed == want["second_rows"]
    assert _rows(out) == before  # the dry run changed nothing

    removed = remove_duplicate_successes(out, {}, "video_id", scratch_dir=str(tmp_path))
    after = _rows(out)
    assert removed == want["second_rows"] and len(after) == len(before) - removed
    assert set(_successes(after).values()) == {1} and set(_successes(after)) == set(_successes(before))
    for rid, end in want["kept_end"].items():  # the latest success row stays
        assert [r["result_info"]["end_time"] for r in after if r["video_id"] == rid] == [end]
    own = [p for p in _parts(out) if LATER not in p]  # the job's parts, part 2 rewritten
    assert len(own) == 4 and sum(pq.read_metadata(p).num_rows for p in own) == 11
    failures = [r for r in before if not r["result_info"]["succeed"]]
    assert failures and all(r in after for r in failures)  # failure rows untouched
    assert not any(f"part-{LATER}-r0-" in p for p in _parts(out))  # nothing but second rows: removed whole
    assert not pending_plans(fsspec.filesystem("file"), out)
    assert read_committed(out, {}, "video_id").duplicate_successes == 0
    assert remove_duplicate_successes(out, {}, "video_id") == 0  # settled
    assert _rows(out) == after


def test_the_next_complete_run_removes_them_before_its_marker(tmp_path, caplog):
    raw, want = _with_second_rows(tmp_path)
    out = raw["output"]["dir"]
    outcome = _run(raw)
    assert "the output holds 6 second success row(s) of items" in caplog.text  # said at the start
    assert outcome.summary["this_run"]["items"] == 0
    assert outcome.summary["total"]["duplicate_success_rows_removed"] == want["second_rows"]
    assert outcome.summary["total"]["succeeded"] == 12 and os.path.exists(os.path.join(out, "_SUCCESS"))
    assert set(_successes(_rows(out)).values()) == {1}
    assert _run(raw).summary["total"]["duplicate_success_rows_removed"] == 0


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "compact.py"), *args], capture_output=True,
                          text=True, timeout=120)


def test_the_compact_command_reports_and_removes_them(tmp_path):
    import yaml

    raw, want = _with_second_rows(tmp_path)
    out = raw["output"]["dir"]
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(raw))
    dry = _cli("--config", str(config), "--dry-run")
    assert dry.returncode == 0 and "found 6 second success row(s)" in dry.stdout, dry.stdout + dry.stderr
    assert read_committed(out, {}, "video_id").duplicate_successes == want["second_rows"]
    done = _cli("--config", str(config))
    assert done.returncode == 0 and "removed 6 second success row(s)" in done.stdout, done.stdout + done.stderr
    assert set(_successes(_rows(out)).values()) == {1}


def test_a_removal_killed_after_a_rewrite_is_committed_is_rolled_forward_by_the_next_run(tmp_path, monkeypatch):
    raw, want = _with_second_rows(tmp_path)
    out = raw["output"]["dir"]
    before = _successes(_rows(out))
    real_remove = compaction._remove

    def killed_before_deleting_a_rewritten_source(fs, paths):
        if len(paths) == 1 and re.search(r"-r\d+-\d+\.parquet$", paths[0]) and LATER not in paths[0]:
            raise KeyboardInterrupt("killed between the rewrite's commit and its source's deletion")
        real_remove(fs, paths)

    monkeypatch.setattr(compaction, "_remove", killed_before_deleting_a_rewritten_source)
    with pytest.raises(KeyboardInterrupt):
        remove_duplicate_successes(out, {}, "video_id")
    monkeypatch.setattr(compaction, "_remove", real_remove)
    fs = fsspec.filesystem("file")
    assert len(pending_plans(fs, out)) == 1
    assert set(_successes(_rows(out))) == set(before)  # no item lost its success row
    outcome = _run(raw)  # finishes the plan under its lease, then removes the rest at its end
    assert not pending_plans(fs, out)
    assert outcome.summary["total"]["duplicate_success_rows_removed"] > 0
    assert _successes(_rows(out)) == Counter({k: 1 for k in before})


def test_a_rewrite_whose_commit_fails_keeps_every_row(tmp_path, monkeypatch):
    raw, _ = _with_second_rows(tmp_path)
    out = raw["output"]["dir"]
    before = sorted(map(str, _rows(out)))

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(compaction, "commit_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        remove_duplicate_successes(out, {}, "video_id", scratch_dir=str(tmp_path))
    fs = fsspec.filesystem("file")
    assert sorted(map(str, _rows(out))) == before  # the sources stay until a rewrite is committed
    assert len(pending_plans(fs, out)) == 1  # the plan of the rewrite that failed
    assert finish_pending(fs, out) == 1  # rolled back: its target is not there
    assert sorted(map(str, _rows(out))) == before and not pending_plans(fs, out)
