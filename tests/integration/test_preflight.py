"""jobs/preflight.py: a job rehearsed on a sample of its manifest before it is submitted. It runs the real job on
the sample into a scratch directory, says what fails and how fast the rest goes, and names what would stop the job
(a live run, an output it cannot write or would refuse, every item failing), writing nothing to the output."""

import json
import os
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.config import build_config, validate_config
from pipeline.distributed import DistContext
from pipeline.preflight import format_preflight, preflight
from pipeline.resume import OutputLease
from pipeline.runner import run_rank
from tests.conftest import ROOT, base_config, make_corpus, write_manifest


def _cfg(raw):
    cfg = build_config(raw)
    validate_config(cfg)
    return cfg


def _job(tmp_path, media_dir, n=6, **sections) -> dict:
    rows = make_corpus(str(tmp_path / "c"), media_dir, n, kinds=("motion.mp4", "speech.wav"))
    shutil.copy(os.path.join(media_dir, "broken", "random.mp4"), tmp_path / "c" / "broken.mp4")
    rows.append({"video_id": "broken", "video_path": "broken.mp4", "batch": 0})
    return base_config(write_manifest(str(tmp_path / "m.parquet"), rows), str(tmp_path / "c"), str(tmp_path / "out"),
                       str(tmp_path / "cache"), **sections)


def _tree(path) -> dict[str, bytes]:
    out = {}
    for d, _, files in os.walk(path):
        for f in files:
            out[os.path.relpath(os.path.join(d, f), path)] = open(os.path.join(d, f), "rb").read()
    return out


def test_a_new_job_is_rehearsed_on_its_sample_and_nothing_is_written_to_its_output(tmp_path, media_dir):
    cfg = _cfg(_job(tmp_path, media_dir))
    report = preflight(cfg, items=7, world_size=4, scratch=str(tmp_path / "scratch"))
    assert report["problems"] == []
    out, sample = report["output"], report["sample"]
    assert (out["writable"], out["live_run"], out["resume"]) == (True, None, "new")
    assert (sample["items"], sample["succeeded"], sample["failed"]) == (7, 6, 1)  # the whole manifest, here
    assert sample["failures"] == [{"id": "broken", "error_type": "DecodeError",
                                   "error_message": sample["failures"][0]["error_message"]}]
    assert sample["tier_hits"] == {"shared": 7} and sample["manifest_items"] == 7
    assert sample["items_per_s_per_rank"] > 0
    assert sample["hours_at_that_pace"] == pytest.approx(7 / (sample["items_per_s_per_rank"] * 4) / 3600, rel=0.01,
                                                         abs=1e-4)
    assert set(sample["per_filter_s"]) == {"probe"}
    assert not (tmp_path / "out").exists()  # not even the directory
    text = format_preflight(report)
    assert "7 of 7 items: 6 ok, 1 failed {'DecodeError': 1}" in text and "verdict  : ready to submit" in text
    assert "broken: DecodeError" in text


def test_an_output_it_would_refuse_is_a_problem_and_is_left_as_it_was(tmp_path, media_dir):
    raw = _job(tmp_path, media_dir)
    run_rank(_cfg(raw), DistContext())
    before = _tree(tmp_path / "out")
    raw["filters"] = {"probe": {}, "noop": {}}
    report = preflight(_cfg(raw), items=3, scratch=str(tmp_path / "scratch"))
    assert report["output"]["resume"] == "refused"
    assert any("the job would be refused:" in p and "filters.noop" in p for p in report["problems"])
    assert report["sample"]["items"] == 3  # the sample ran all the same: what else it says still helps
    assert _tree(tmp_path / "out") == before  # byte for byte
    raw["filters"] = {"probe": {}}
    again = preflight(_cfg(raw), items=2, scratch=str(tmp_path / "scratch2"))
    assert again["output"]["resume"] == "the same job" and again["problems"] == []
    assert "the output holds rows already: jobs/status.py says how many the next run takes" in format_preflight(again)

    path = tmp_path / "out" / "_config.json"  # the rows so far were made by another FFmpeg
    rec = json.loads(path.read_text())
    rec["software_history"][-1]["software"][0]["libavcodec"] = "58.134.100"
    path.write_text(json.dumps(rec))
    assert preflight(_cfg(raw), items=1, scratch=str(tmp_path / "scratch3"))["problems"] == []  # warned only
    raw["resume"] = {**raw.get("resume", {}), "on_software_change": "fail"}
    strict = preflight(_cfg(raw), items=1, scratch=str(tmp_path / "scratch4"))
    assert strict["output"]["resume"] == "refused"
    assert any("other software than this run's (libavcodec 58.134.100 -> " in p for p in strict["problems"])


def test_a_live_run_and_an_output_that_cannot_be_written_are_problems(tmp_path, media_dir):
    raw = _job(tmp_path, media_dir)
    lease = OutputLease(str(tmp_path / "out"), {}, "run-live", 30)
    lease.acquire()
    try:
        report = preflight(_cfg(raw), items=1, scratch=str(tmp_path / "s1"))
    finally:
        lease.release()
    assert report["output"]["live_run"]["run_id"] == "run-live"
    assert any("a run is live" in p and "OutputLockedError" in p for p in report["problems"])
    (tmp_path / "a-file").write_text("x")
    raw["output"]["dir"] = str(tmp_path / "a-file" / "out")  # a path under a file
    report = preflight(_cfg(raw), items=1, scratch=str(tmp_path / "s2"))
    assert report["output"]["writable"] is False
    assert any("nothing can be committed to" in p for p in report["problems"])


def test_every_sampled_item_failing_is_a_problem_naming_the_tiers(tmp_path, media_dir):
    raw = _job(tmp_path, media_dir)
    raw["storage"]["tiers"] = [{"name": "shared", "root": str(tmp_path / "typo")}]
    report = preflight(_cfg(raw), items=4, scratch=str(tmp_path / "scratch"))
    assert report["sample"]["failures_by_type"] == {"NotFoundError": 4}
    assert report["problems"] == ["every sampled item failed ({'NotFoundError': 4}): check storage.tiers, the "
                                  "credentials and the manifest's paths"]


def test_a_listing_job_is_sampled_from_its_glob(tmp_path, media_dir):
    raw = _job(tmp_path, media_dir)
    raw["input"] = {"listing_glob": str(tmp_path / "c" / "*.mp4")}
    report = preflight(_cfg(raw), items=2, seed=1, scratch=str(tmp_path / "scratch"))
    assert report["sample"]["manifest_items"] == 4  # three clips and the broken one
    assert report["sample"]["items"] == 2


def test_the_command_line_exit_codes(tmp_path, media_dir):
    raw = _job(tmp_path, media_dir)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(raw))

    def cli(*args):
        return subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "preflight.py"), "--config", str(config),
                               *args], capture_output=True, text=True, timeout=300)

    ok = cli("--items", "2", "--json", "--scratch", str(tmp_path / "kept"))
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert json.loads(ok.stdout)["sample"]["items"] == 2
    assert pq.read_table(str(tmp_path / "kept" / "out" / "parts")).num_rows == 2  # a given scratch is kept
    refused = cli("--items", "1", "storage.tiers=[{name: shared, root: /nonexistent}]")
    assert refused.returncode == 1 and "PROBLEM  : every sampled item failed" in refused.stdout
    bad = cli("input.manifest=" + str(tmp_path / "none.parquet"))
    assert bad.returncode == 2 and "none.parquet" in bad.stderr
    assert not (tmp_path / "out").exists()
    assert pq.read_table(str(tmp_path / "m.parquet")).num_rows == 7  # the manifest untouched


def test_storage_that_hangs_stops_the_sample_run_and_is_named(tmp_path, media_dir, s3, bucket):
    """A tier whose endpoint accepts and never answers: the sample run stops as the job would (StorageHungError),
    and the report names it rather than the preflight hanging or dying with a traceback."""
    from tests.integration.test_hung_storage import _config, _upload
    from tests.s3server import FaultProxy

    name, fs = bucket
    _, manifest = _upload(tmp_path, media_dir, fs, name, 6)
    proxy = FaultProxy(s3.port, hang={"/videos/": None})
    try:
        report = preflight(_cfg(_config(tmp_path, s3, name, manifest, proxy.endpoint)), items=6,
                           scratch=str(tmp_path / "scratch"))
    finally:
        proxy.stop()
    assert any(p.startswith("the sample run stopped: StorageHungError: 2 fetches in a row went silent")
               for p in report["problems"]), report["problems"]
    assert "PROBLEM  : the sample run stopped: StorageHungError" in format_preflight(report)


def test_an_output_on_the_object_store_is_checked_there(tmp_path, media_dir, s3, bucket):
    """The usual output: a prefix of a bucket that does not exist yet (writable, new); and a bucket that does not
    exist at all (not writable, named)."""
    name, fs = bucket
    raw = _job(tmp_path, media_dir)
    raw["output"] = {**raw["output"], "dir": f"s3://{name}/runs/job-1", "storage_options": s3.options()}
    report = preflight(_cfg(raw), items=1, scratch=str(tmp_path / "s1"))
    assert (report["output"]["writable"], report["output"]["resume"], report["problems"]) == (True, "new", [])
    assert fs.find(f"{name}/runs") == []  # the probe is gone
    raw["output"]["dir"] = "s3://no-such-bucket-here/job-1"
    report = preflight(_cfg(raw), items=1, scratch=str(tmp_path / "s2"))
    assert report["output"]["writable"] is False
    assert any(p.startswith("nothing can be committed to s3://no-such-bucket-here/job-1: ") for p in report["problems"])


def test_the_sample_is_drawn_from_the_rows_the_job_would_take(tmp_path, media_dir):
    """input.limit and dropped duplicate ids narrow the manifest: the sample comes from what is left."""
    raw = _job(tmp_path, media_dir)
    raw["input"]["limit"] = 3
    report = preflight(_cfg(raw), items=16, scratch=str(tmp_path / "s1"))
    assert (report["sample"]["manifest_items"], report["sample"]["items"]) == (3, 3)
    ids = {r["video_id"] for r in pq.read_table(str(tmp_path / "s1" / "out" / "parts")).to_pylist()}
    assert ids == {"id-0000", "id-0001", "id-0002"}
    rows = pq.read_table(str(tmp_path / "m.parquet")).to_pylist()
    write_manifest(str(tmp_path / "dup.parquet"), rows + rows[:2])
    raw["input"] = {"manifest": str(tmp_path / "dup.parquet"), "on_duplicate_ids": "drop"}
    report = preflight(_cfg(raw), items=16, scratch=str(tmp_path / "s2"))
    assert (report["sample"]["manifest_items"], report["sample"]["items"]) == (7, 7)
