"""Compaction of a real job's part files, on a filesystem and on a real S3 server; interrupted compactions are
finished forward or back by the next compaction or the next run, and no row is ever lost."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import compaction
from pipeline.compaction import compact, finish_pending
from pipeline.config import build_config, validate_config
from pipeline.distributed import DistContext
from pipeline.resume import OutputLease, read_committed
from pipeline.runner import run_rank
from tests.conftest import ROOT, base_config, write_manifest


def _job(tmp_path, out: str, n: int = 40, storage_options: dict | None = None, **extra) -> dict:
    """A quick real job (no media: the noop filter) that commits a part every 3 rows."""
    rows = [{"video_id": f"id-{i:04d}", "video_path": f"v/{i}.mp4", "batch": i % 3} for i in range(n)]
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    raw = base_config(manifest, "unused", out, str(tmp_path / "cache"), filters={"noop": {}},
                      storage={"cache_dir": str(tmp_path / "cache"), "fetch": False},
                      output={"dir": out, "rows_per_file": 3, "storage_options": storage_options or {}}, **extra)
    return raw


def _run(raw):
    cfg = build_config(raw)
    validate_config(cfg)
    return run_rank(cfg, DistContext())


def _parts(fs, root):
    fs.invalidate_cache()
    return sorted(p for p in fs.find(f"{root}/parts") if p.endswith(".parquet"))


def _all_rows(fs, root) -> list[tuple]:
    """Every row as a comparable tuple (its id and when and where it ran), duplicates kept."""
    table = pq.ParquetDataset(_parts(fs, root), filesystem=fs).read()
    info = table["result_info"].to_pylist()
    return sorted((i, r["run_id"], r["start_time"], r["succeed"]) for i, r in zip(table["video_id"].to_pylist(), info))


def _target_bytes(fs, root, parts_per_target: int) -> int:
    sizes = [fs.size(p) for p in _parts(fs, root)]
    return int(max(sizes) * parts_per_target + 1)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_compaction_merges_parts_and_every_reader_and_the_rerun_see_the_same_rows(tmp_path, where, s3, bucket):
    if where == "s3":
        name, fs = bucket
        out, opts, root = f"s3://{name}/out", s3.options(), f"{name}/out"
    else:
        out, opts = str(tmp_path / "out"), {}
        fs, root = fsspec.filesystem("file"), str(tmp_path / "out")
    raw = _job(tmp_path, out, storage_options=opts)
    assert _run(raw).summary["this_run"]["succeeded"] == 40
    before_parts, before_rows = _parts(fs, root), _all_rows(fs, root)
    assert len(before_parts) >= 14

    report = compact(out, opts, target_bytes=_target_bytes(fs, root, 5), scratch_dir=str(tmp_path))
    after_parts = _parts(fs, root)
    assert report.merged >= 10 and report.written >= 2 and report.rows == sum(
        pq.read_metadata(fs.open(p, "rb")).num_rows for p in after_parts if "-c" in p.rsplit("/", 1)[-1])
    assert len(after_parts) == len(before_parts) - report.merged + report.written == report.files_after
    assert _all_rows(fs, root) == before_rows  # the same rows, each once
    assert not fs.exists(f"{root}/_compaction") or not fs.ls(f"{root}/_compaction")

    if where == "local":  # the readers the users use, on the compacted output
        import duckdb
        import polars as pl

        n = duckdb.connect().execute(
            f"SELECT count(*) FROM read_parquet('{root}/parts/*.parquet') WHERE result_info.succeed").fetchone()
        assert n == (40,)
        assert pl.scan_parquet(f"{root}/parts/*.parquet").select(pl.len()).collect().item() == 40

    again = _run(raw)  # resume reads the compacted parts: nothing to do, and the schema check passes
    assert again.summary["this_run"]["items"] == 0 and again.summary["this_run"]["skipped_already_done"] == 40
    state = read_committed(out, opts, "video_id")
    assert len(state.succeeded) == 40 and state.files == len(_parts(fs, root))


def test_compacting_again_settles_and_leaves_large_parts_alone(tmp_path):
    out = str(tmp_path / "out")
    fs, root = fsspec.filesystem("file"), out
    _run(_job(tmp_path, out, n=24))
    rows = _all_rows(fs, root)
    target = _target_bytes(fs, root, 4)
    rounds = [compact(out, {}, target_bytes=target) for _ in range(4)]
    assert rounds[0].merged >= 4 and rounds[-1].merged == 0  # merged parts under half the target merge again, once
    assert _all_rows(fs, root) == rows
    settled = _parts(fs, root)
    assert compact(out, {}, target_bytes=target, dry_run=True).files_after == len(settled)
    big = min(fs.size(p) for p in settled)
    assert compact(out, {}, target_bytes=big * 2 - 1).merged == 0  # parts of half the target or more stay as they are
    assert _parts(fs, root) == settled


def test_parts_of_two_schemas_are_never_merged_together(tmp_path):
    parts = tmp_path / "out" / "parts"
    parts.mkdir(parents=True)
    old = pa.table({"video_id": ["a", "b"], "x": [1, 2]})
    new = pa.table({"video_id": ["c", "d"], "x": [3.0, 4.0]})  # a retyped field: another schema
    names = [f"part-20260101T000000-0000000{i}-r00000-000001.parquet" for i in range(4)]
    for name, table in zip(names, (old, old, new, new)):
        pq.write_table(table, parts / name)
    report = compact(str(tmp_path / "out"), {}, target_bytes=1 << 20)
    assert report.merged == 4 and report.written == 2
    for path in parts.iterdir():
        assert pq.read_table(path).num_rows == 4
        assert pq.read_schema(path).field("x").type in (pa.int64(), pa.float64())


def test_an_interrupted_compaction_is_rolled_back_when_a_target_is_missing(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    fs, root = fsspec.filesystem("file"), out
    _run(_job(tmp_path, out))
    before_parts, before_rows = _parts(fs, root), _all_rows(fs, root)
    real_write, written = compaction._write_merged, []

    def dies_on_the_second_target(*args, **kwargs):
        if written:
            raise KeyboardInterrupt("killed while writing the second target")  # a death, not an error to handle
        written.append(args[3])
        return real_write(*args, **kwargs)

    monkeypatch.setattr(compaction, "_write_merged", dies_on_the_second_target)
    with pytest.raises(KeyboardInterrupt):
        compact(out, {}, target_bytes=_target_bytes(fs, root, 5))
    assert os.path.exists(written[0])  # the first target is done: its plan gone, its sources deleted
    plans = os.listdir(os.path.join(root, "_compaction"))
    assert len(plans) == 1  # the second target's plan, its target never written
    first_sources = json.loads(open(os.path.join(root, "_compaction", plans[0])).read())
    assert _all_rows(fs, root) == before_rows
    assert finish_pending(fs, root) == 1  # what the next compaction or run does first: nothing to undo but the plan
    merged_away = len(before_parts) - len(_parts(fs, root)) + 1
    assert 2 <= merged_away <= 5 and _all_rows(fs, root) == before_rows
    assert all(os.path.exists(f"{root}/parts/{s}") for s in first_sources["sources"])
    assert finish_pending(fs, root) == 0


def test_an_unreadable_plan_stops_the_run_before_any_work_and_touches_nothing(tmp_path):
    from pipeline.errors import MediasieveError

    out = str(tmp_path / "out")
    raw = _job(tmp_path, out)
    _run(raw)
    os.makedirs(os.path.join(out, "_compaction"))
    with open(os.path.join(out, "_compaction", "0badc0de-000000.json"), "w") as f:
        f.write('{"token": "0badc0de-000000", "target": "part-x')  # edited by hand, cut short
    before = sorted(os.listdir(os.path.join(out, "parts")))
    with pytest.raises(MediasieveError, match="compaction plan .*0badc0de-000000.json cannot be read"):
        _run(raw)
    assert sorted(os.listdir(os.path.join(out, "parts"))) == before
    assert not os.path.exists(os.path.join(out, "_lease.json"))  # released: the next run is not locked out


def test_an_interrupted_compaction_is_rolled_forward_by_the_next_run(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    fs, root = fsspec.filesystem("file"), out
    raw = _job(tmp_path, out)
    _run(raw)
    before_rows = _all_rows(fs, root)
    real_remove = compaction._remove

    def dies_half_way_through_the_deletes(fs_, paths):
        real_remove(fs_, paths[: len(paths) // 2])
        raise KeyboardInterrupt("killed while deleting the sources")

    monkeypatch.setattr(compaction, "_remove", dies_half_way_through_the_deletes)
    with pytest.raises(KeyboardInterrupt):
        compact(out, {}, target_bytes=_target_bytes(fs, root, 5))
    monkeypatch.setattr(compaction, "_remove", real_remove)
    assert len(_all_rows(fs, root)) > len(before_rows)  # the sources not yet deleted: their rows twice
    again = _run(raw)  # the run finishes the compaction under its lease before it reads the parts
    assert again.summary["this_run"]["items"] == 0
    assert _all_rows(fs, root) == before_rows and not os.listdir(os.path.join(root, "_compaction"))


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "compact.py"), *args], capture_output=True,
                          text=True, timeout=120)


def test_the_command_line_refuses_a_live_run_and_bad_arguments(tmp_path):
    import yaml

    out = str(tmp_path / "out")
    raw = _job(tmp_path, out)
    _run(raw)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(raw))
    lease = OutputLease(out, {}, "20260101T000000-live0000", 30)
    lease.acquire()  # a run in progress
    try:
        busy = _cli("--config", str(config))
    finally:
        lease.release()
    assert busy.returncode == 3 and "in use by live run 20260101T000000-live0000" in busy.stderr
    assert _cli("--config", str(config), "--target-mb", "0").returncode == 2
    missing = _cli("--config", str(config), f"output.dir={tmp_path / 'typo'}")
    assert missing.returncode == 2 and "no output at" in missing.stderr and not (tmp_path / "typo").exists()
    parts = [os.path.join(out, "parts", p) for p in os.listdir(os.path.join(out, "parts"))]
    parts_before = len(parts)
    target = f"{7.5 * max(map(os.path.getsize, parts)) / 2**20:.4f}"  # 7 parts of the largest size to a target
    dry = _cli("--config", str(config), "--target-mb", target, "--dry-run")
    assert dry.returncode == 0 and re.search(r"would merge 1\d parts into 2 ", dry.stdout), dry.stdout + dry.stderr
    assert len(os.listdir(os.path.join(out, "parts"))) == parts_before  # the dry run wrote nothing
    done = _cli("--config", str(config), "--target-mb", target)
    assert done.returncode == 0 and " merged " in done.stdout, done.stderr
    assert len(os.listdir(os.path.join(out, "parts"))) < parts_before
    assert not os.path.exists(os.path.join(out, "_lease.json"))  # released
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["total"]["succeeded"] == 40


def test_a_run_compacts_its_output_at_the_end_when_asked(tmp_path):
    out = str(tmp_path / "out")
    fs, root = fsspec.filesystem("file"), out
    raw = _job(tmp_path, out)
    raw["output"]["compact_mb"] = 0.05  # parts of about 7 kB: 7 to a merged part
    raw["output"]["compression"] = "snappy"
    outcome = _run(raw)
    parts = _parts(fs, root)
    assert 2 <= len(parts) <= 4 and all("-c" in os.path.basename(p) for p in parts[:-1])
    assert pq.ParquetFile(parts[0]).metadata.row_group(0).column(0).compression == "SNAPPY"
    assert outcome.summary["total"]["succeeded"] == 40 and os.path.exists(os.path.join(out, "_SUCCESS"))
    assert len({r[0] for r in _all_rows(fs, root)}) == len(_all_rows(fs, root)) == 40


def test_a_bad_compaction_size_is_a_config_error():
    from pipeline.errors import ConfigError

    cfg = build_config({"input": {"manifest": "m.parquet"}, "output": {"dir": "out", "compact_mb": 0}})
    with pytest.raises(ConfigError, match="output.compact_mb=0"):
        validate_config(cfg)


def test_compaction_killed_at_random_moments_loses_and_doubles_nothing(tmp_path):
    """SIGKILL the command at random points of its work, again and again on the same output; after each kill the
    next run's first step (``finish_pending``) leaves every row exactly once."""
    import random
    import signal
    import time

    import yaml

    out = str(tmp_path / "out")
    fs, root = fsspec.filesystem("file"), out
    raw = _job(tmp_path, out, n=300)
    raw["output"]["rows_per_file"] = 1
    _run(raw)
    rows = _all_rows(fs, root)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(raw))
    pristine = str(tmp_path / "pristine")
    shutil.copytree(out, pristine)
    command = [sys.executable, os.path.join(ROOT, "jobs", "compact.py"), "--config", str(config), "--target-mb", "0.2"]
    plan_dir = os.path.join(out, "_compaction")

    def start_and_wait_for_the_first_plan() -> tuple[subprocess.Popen, float]:
        """Start the command on a fresh copy; return it once its work began (a first plan exists), or it ended."""
        shutil.rmtree(out)
        shutil.copytree(pristine, out)
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and not (os.path.isdir(plan_dir) and os.listdir(plan_dir)):
            time.sleep(0.002)
        return proc, time.monotonic()

    # Most of a run is Python starting: kills timed from the start landed after the end now and then (no kill
    # inside the work); time them from the first plan, over the work's measured length.
    proc, began = start_and_wait_for_the_first_plan()
    assert proc.wait(120) == 0
    work = time.monotonic() - began
    rng = random.Random(7)
    outcomes = set()
    for _ in range(6):
        proc, _ = start_and_wait_for_the_first_plan()
        time.sleep(rng.uniform(0.0, 1.0) * work)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        plans = os.listdir(plan_dir) if os.path.isdir(plan_dir) else []
        outcomes.add("plan left" if plans else "no plan")
        finish_pending(fs, root)
        assert _all_rows(fs, root) == rows
        assert not (os.path.isdir(plan_dir) and os.listdir(plan_dir))  # every plan finished
    assert "plan left" in outcomes  # at least one kill landed inside the compaction, not before or after it


def test_a_merged_part_that_fails_its_checks_or_its_commit_is_never_committed(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    fs, root = fsspec.filesystem("file"), out
    _run(_job(tmp_path, out))
    before_parts, before_rows = _parts(fs, root), _all_rows(fs, root)
    scratch = tmp_path / "scratch"
    scratch.mkdir()

    class Short:  # a writer that lost rows (the check compares the merged file with its sources)
        def __init__(self, meta):
            self.num_rows = meta.num_rows - 1

    real_meta = compaction.pq.read_metadata
    monkeypatch.setattr(compaction.pq, "read_metadata", lambda path: Short(real_meta(path)))
    with pytest.raises(RuntimeError, match="nothing was committed"):
        compact(out, {}, target_bytes=_target_bytes(fs, root, 5), scratch_dir=str(scratch))
    monkeypatch.setattr(compaction.pq, "read_metadata", real_meta)
    assert _parts(fs, root) == before_parts and finish_pending(fs, root) == 1  # rolled back: only the plan goes

    real_mv = type(fs).mv

    def full_disk(self, source, target, *args, **kwargs):
        if "/parts/" in target:
            raise OSError(28, "No space left on device")
        return real_mv(self, source, target, *args, **kwargs)

    monkeypatch.setattr(type(fs), "mv", full_disk)  # the rename into parts/ fails (the plan's commit does not)
    with pytest.raises(OSError, match="No space left"):
        compact(out, {}, target_bytes=_target_bytes(fs, root, 5), scratch_dir=str(scratch))
    monkeypatch.undo()
    assert not [n for n in os.listdir(os.path.join(root, "_tmp")) if n.endswith(".tmp")]  # no partial file left
    assert not os.listdir(scratch)  # nor a scratch file
    assert finish_pending(fs, root) == 1
    assert _parts(fs, root) == before_parts and _all_rows(fs, root) == before_rows


def test_which_files_count_as_parts_to_merge():
    run = "20261202T153652-423bb05a"
    assert compaction._PART.match(f"part-{run}-r00001-1000000.parquet")  # a rank's millionth part still counts
    assert compaction._PART.match(f"part-{run}-c0badc0d-000001.parquet")  # a merged part may merge again
    assert not compaction._PART.match("part-by-hand.parquet")  # files the job did not write are left alone
    assert not compaction._PART.match(f"part-{run}-r00001-000001.parquet.tmp")
