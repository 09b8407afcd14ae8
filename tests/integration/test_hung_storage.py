"""Storage that hangs (a hung mount, an endpoint that accepts and never answers), against the real S3 server behind a
proxy that holds chosen requests open. Input: a silent fetch gets a ``FetchTimeout`` row and the rank goes on, a slow
but live download is left alone, a hung tier is skipped, and storage that hangs on every fetch stops the rank instead
of failing its share. Output: a hung output stops the rank (``OutputHungError``) instead of hanging the process."""

import json
import os
import re
import threading
import time

import pyarrow.parquet as pq
import pytest

from pipeline.config import build_config, validate_config
from pipeline.distributed import DistContext
from pipeline.errors import ConfigError, OutputHungError, StorageHungError
from pipeline.runner import run_rank
from tests.conftest import base_config, make_corpus, write_manifest
from tests.s3server import FaultProxy

SILENCE_S = 3.0  # well above any pause of a live fetch on a loaded 2-core machine


def _run(raw):
    cfg = build_config(raw)
    validate_config(cfg)
    return run_rank(cfg, DistContext())


def _config(tmp_path, s3, name, manifest, endpoint, **sections):
    # read_timeout of an hour: the client's own timeouts do not end the hang (as in a hung FUSE read)
    opts = s3.options(endpoint=endpoint, read_timeout=3600, retries={"max_attempts": 1})
    storage = {"cache_dir": str(tmp_path / "cache"), "fetch_silence_s": SILENCE_S,
               "tiers": [{"name": "s3", "root": f"s3://{name}/videos", "storage_options": opts}]}
    return base_config(manifest, "unused", str(tmp_path / "out"), str(tmp_path / "cache"), storage=storage, **sections)


def _upload(tmp_path, media_dir, fs, name, n):
    rows = make_corpus(str(tmp_path / "all"), media_dir, n)
    for r in rows:
        fs.put(str(tmp_path / "all" / r["video_path"]), f"{name}/videos/{r['video_path']}")
    return rows, write_manifest(str(tmp_path / "m.parquet"), rows)


def _rows(out):
    return {r["video_id"]: r["result_info"] for r in pq.read_table(os.path.join(out, "parts")).to_pylist()}


def _run_through(proxy: FaultProxy, raw: dict):
    """Run ``raw`` with its storage behind ``proxy``; the outcome and the seconds it took (the proxy stopped)."""
    started = time.monotonic()
    try:
        outcome = _run(raw)
    finally:
        took = time.monotonic() - started
        proxy.stop()
    return outcome, took


def test_a_silent_fetch_gets_a_timeout_row_and_a_rerun_fetches_it(tmp_path, media_dir, s3, bucket):
    """The rerun, with ``resume.retry_failed=retryable``, fetches the timed-out items again and leaves the missing
    file (a failure for good) alone."""
    name, fs = bucket
    rows = make_corpus(str(tmp_path / "all"), media_dir, 8)
    for r in rows:
        fs.put(str(tmp_path / "all" / r["video_path"]), f"{name}/videos/{r['video_path']}")
    rows.append({"video_id": "gone", "video_path": "gone.mp4", "batch": 0})
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    # item 2: nothing answered at all; item 5: the headers and 64 KiB of the body, then nothing
    proxy = FaultProxy(s3.port, hang={"item_0002": None, "item_0005": 1 << 16})
    outcome, took = _run_through(proxy, _config(tmp_path, s3, name, manifest, proxy.endpoint))
    assert took < 30, took  # the rank did not wait for the hung requests (before: StallError after stall_timeout_s)
    got = _rows(str(tmp_path / "out"))
    assert sorted(got) == sorted(r["video_id"] for r in rows)  # one row each
    failed = {k: v for k, v in got.items() if not v["succeed"]}
    assert set(failed) == {"id-0002", "id-0005", "gone"}
    assert failed.pop("gone")["error_type"] == "NotFoundError"
    assert all(v["error_type"] == "FetchTimeout" and v["retryable"] for v in failed.values())
    assert "before any byte" in failed["id-0002"]["error_message"]
    got_bytes = int(re.search(r"after (\d+) bytes", failed["id-0005"]["error_message"]).group(1))
    assert 0 < got_bytes <= 1 << 16  # what the client read of the 64 KiB sent
    assert "item_0005.mp4" in failed["id-0005"]["error_message"]
    assert outcome.summary["this_run"]["succeeded"] == 8 - 2

    again = _run(_config(tmp_path, s3, name, manifest, s3.endpoint, resume={"retry_failed": "retryable"}))
    assert again.summary["this_run"]["items"] == 2 and again.summary["this_run"]["succeeded"] == 2
    got = _rows(str(tmp_path / "out"))
    assert [k for k, v in got.items() if not v["succeed"]] == ["gone"]  # not tried again: one row still
    assert again.summary["this_run"]["retry_failed"] == "retryable"
    assert "; 7 skipped (already done, or failed and not retried)" in _format_summary(again.summary)


def _format_summary(summary: dict) -> str:
    """What ``jobs/run.py`` prints at the end of a run."""
    import importlib.util

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("run_cli", os.path.join(ROOT, "jobs", "run.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli.format_summary(summary)


def _trickled(tmp_path, s3, bucket, trickle_s: float, **storage):
    """One 640 KiB item through a link that sends it in 64 KiB pieces ``trickle_s`` apart: its row's result_info,
    the outcome and the seconds it took."""
    name, fs = bucket
    fs.pipe(f"{name}/videos/big.bin", os.urandom(10 << 16))
    manifest = write_manifest(str(tmp_path / "m.parquet"), [{"video_id": "big", "video_path": "big.bin"}])
    proxy = FaultProxy(s3.port, trickle_paths=("big.bin",), trickle_s=trickle_s)
    raw = _config(tmp_path, s3, name, manifest, proxy.endpoint, filters={"noop": {}})
    raw["storage"].update(storage)
    outcome, took = _run_through(proxy, raw)
    return _rows(str(tmp_path / "out"))["big"], outcome, took


def test_a_slow_but_live_download_is_not_abandoned(tmp_path, s3, bucket):
    """Silence is measured between bytes, not over the whole download: 10 pieces 0.8 s apart take 8 s, over twice
    the silence limit, and still succeed (80 KiB/s: far above the default minimum rate)."""
    info, outcome, _ = _trickled(tmp_path, s3, bucket, 0.8)
    assert info["succeed"], info
    assert info["bytes"] == 10 << 16 and info["fetch_s"] > 2 * SILENCE_S
    assert outcome.stats["fetches_hung"] == 0


def test_a_download_that_trickles_below_the_minimum_rate_is_abandoned(tmp_path, s3, bucket):
    """The same link is never silent, but at 64 KiB a second it is below a 256 KiB/s minimum: given up once the
    window of ``fetch_silence_s`` is full, not at the end of the download."""
    info, outcome, took = _trickled(tmp_path, s3, bucket, 1.0, fetch_min_bytes_per_s=256 << 10)
    assert not info["succeed"] and info["error_type"] == "FetchTimeout" and info["retryable"], info
    assert re.search(r"\d+ bytes in the last [34]s \(\d+ B/s, below storage.fetch_min_bytes_per_s=262144\)",
                     info["error_message"]), info["error_message"]
    assert took < 8, took  # before the 10 s download would have ended
    assert outcome.stats["fetches_hung"] <= 1  # the abandoned thread, until its download ends


def test_storage_that_hangs_on_every_fetch_stops_the_rank(tmp_path, media_dir, s3, bucket):
    name, fs = bucket
    _rows_in, manifest = _upload(tmp_path, media_dir, fs, name, 12)
    proxy = FaultProxy(s3.port, hang={"/videos/": None})
    started = time.monotonic()
    try:
        with pytest.raises(StorageHungError, match=r"2 fetches in a row went silent .* the last: s3: s3://") as e:
            _run(_config(tmp_path, s3, name, manifest, proxy.endpoint))
    finally:
        took = time.monotonic() - started
        proxy.stop()
    assert took < 30, took
    assert "a rerun tries these items again" in str(e.value)
    assert not (tmp_path / "out" / "_lease.json").exists()  # released: the rerun does not wait for it
    got = _rows(str(tmp_path / "out"))  # the timed-out items' rows are committed, and nothing else was tried
    assert {v["error_type"] for v in got.values()} == {"FetchTimeout"} and len(got) == 2


def test_a_hung_tier_is_skipped_and_its_items_come_from_the_next_one(tmp_path, media_dir, s3, bucket):
    """The usual layout: a shared filesystem first, the object store behind it. The first tier hangs on everything;
    each producer waits out the silence once, then every item comes from the second tier at once."""
    name, fs = bucket
    rows, manifest = _upload(tmp_path, media_dir, fs, name, 12)
    proxy = FaultProxy(s3.port, hang={"/videos/": None})
    hung = s3.options(endpoint=proxy.endpoint, read_timeout=3600, retries={"max_attempts": 1})
    storage = {"cache_dir": str(tmp_path / "cache"), "fetch_silence_s": SILENCE_S, "tiers": [
        {"name": "shared", "root": f"s3://{name}/videos", "storage_options": hung},
        {"name": "s3", "root": f"s3://{name}/videos", "storage_options": s3.options()}]}
    raw = base_config(manifest, "unused", str(tmp_path / "out"), str(tmp_path / "cache"), storage=storage,
                      runtime={"metrics_interval_s": 0.2})
    outcome, took = _run_through(proxy, raw)
    assert outcome.summary["this_run"]["succeeded"] == 12 and outcome.summary["this_run"]["tier_hits"] == {"s3": 12}
    assert proxy.hung <= 2, proxy.hung  # the hung tier was asked once per producer, not once per item
    assert took < 20, took  # not 12 silences
    with open(os.path.join(tmp_path, "out", "_logs", f"metrics-{outcome.run_id}-r00000.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert any(list(line["tiers_skipped"]) == ["shared"] and line["fetches_hung"] >= 1 for line in lines)


def test_fetch_silence_must_be_below_the_stall_timeout(tmp_path):
    raw = base_config(str(tmp_path / "m.parquet"), str(tmp_path), str(tmp_path / "out"), str(tmp_path / "cache"),
                      storage={"fetch_silence_s": 60})
    with pytest.raises(ConfigError, match="fetch_silence_s=60.* below runtime.stall_timeout_s"):
        validate_config(build_config(raw))
    raw["storage"]["fetch_silence_s"] = 0
    with pytest.raises(ConfigError, match="fetch_silence_s=0 must be above 0"):
        validate_config(build_config(raw))
    raw["storage"].update(fetch_silence_s=30, hung_tier_skip_s=0)
    with pytest.raises(ConfigError, match="hung_tier_skip_s=0 must be above 0"):
        validate_config(build_config(raw))


def _output_config(tmp_path, s3, name, manifest, endpoint, **sections):
    opts = s3.options(endpoint=endpoint, read_timeout=3600, retries={"max_attempts": 1})
    out = f"s3://{name}/out"
    return base_config(manifest, str(tmp_path / "all"), out, str(tmp_path / "cache"),
                       output={"dir": out, "storage_options": opts, "rows_per_file": 2, "lease_timeout_s": 3,
                               "commit_timeout_s": 3}, **sections)


def test_an_output_that_hangs_mid_run_stops_the_rank_and_the_rerun_redoes_the_rest(tmp_path, media_dir, s3, bucket):
    """Before, a hung output held the consumers in their commits and the supervising loop in its flush: the process
    hung, unseen (no stall check runs while the loop is blocked), until the scheduler's time limit."""
    name, fs = bucket
    rows = make_corpus(str(tmp_path / "all"), media_dir, 12)
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    proxy = FaultProxy(s3.port)

    def hang_after_first_part():  # the output goes down once the run has committed a part
        while not fs.exists(f"{name}/out/parts") or not fs.ls(f"{name}/out/parts", refresh=True):
            time.sleep(0.05)
        proxy.hang["/out/"] = None

    watcher = threading.Thread(target=hang_after_first_part, daemon=True)
    watcher.start()
    started = time.monotonic()
    try:
        with pytest.raises(OutputHungError, match=r"the commit of .*/out/parts/part-.* did not finish in "
                                                  r"output.commit_timeout_s=3s"):
            _run(_output_config(tmp_path, s3, name, manifest, proxy.endpoint,
                                filters={"noop": {"sleep_s": 0.3}}))
        took = time.monotonic() - started
        fs.invalidate_cache()
        committed = pq.read_table(f"{name}/out/parts", filesystem=fs)["video_id"].to_pylist()
    finally:
        proxy.stop()
    assert took < 40, took  # the commit, the lease's release and the metrics upload each gave up after 3 s
    assert 0 < len(committed) < 12 and len(set(committed)) == len(committed)
    time.sleep(3.5)  # the lease (not released: the output was hung) goes stale, as it would for a dead process
    again = _run(_output_config(tmp_path, s3, name, manifest, s3.endpoint, filters={"noop": {"sleep_s": 0.3}}))
    assert again.summary["this_run"]["items"] == 12 - len(committed)
    fs.invalidate_cache()
    ids = pq.read_table(f"{name}/out/parts", filesystem=fs)["video_id"].to_pylist()
    assert sorted(ids) == sorted(r["video_id"] for r in rows)  # one row each: nothing lost, nothing twice


def test_an_output_that_hangs_at_the_start_stops_the_job_before_any_work(tmp_path, media_dir, s3, bucket):
    name, fs = bucket
    rows = make_corpus(str(tmp_path / "all"), media_dir, 4)
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    proxy = FaultProxy(s3.port, hang={"/out/": None})
    started = time.monotonic()
    try:
        with pytest.raises(OutputHungError, match=r"taking the lease .*/out/_lease.json did not finish"):
            _run(_output_config(tmp_path, s3, name, manifest, proxy.endpoint))
    finally:
        took = time.monotonic() - started
        proxy.stop()
    assert took < 20, took
    assert not fs.exists(f"{name}/out/parts")


def _no_summary_then_the_rerun_writes_it(tmp_path, s3, bucket, manifest) -> None:
    """After a run over 4 items whose end was given up as hung: every part is there, no summary and no marker; the
    rerun (on the server itself) has no item to do and writes them."""
    name, fs = bucket
    fs.invalidate_cache()
    assert not fs.exists(f"{name}/out/_SUCCESS") and not fs.exists(f"{name}/out/summary.json")
    assert len(pq.read_table(f"{name}/out/parts", filesystem=fs)) == 4
    time.sleep(3.5)  # the lease was released (its path does not hang), but wait out a stale one all the same
    again = _run(_output_config(tmp_path, s3, name, manifest, s3.endpoint))
    assert again.summary["this_run"]["items"] == 0 and again.summary["total"]["succeeded"] == 4
    fs.invalidate_cache()
    assert fs.exists(f"{name}/out/_SUCCESS")


def test_an_output_that_hangs_at_the_summary_leaves_no_marker_and_the_rerun_writes_it(tmp_path, media_dir, s3, bucket):
    """Every part is committed, then the summary's write hangs: the rank stops with ``OutputHungError`` and no
    ``_SUCCESS``; the rerun has nothing to redo and writes the summary and the marker."""
    name, fs = bucket
    rows = make_corpus(str(tmp_path / "all"), media_dir, 4)
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    proxy = FaultProxy(s3.port, hang={"failures.jsonl": None})  # the summary's first write
    started = time.monotonic()
    try:
        with pytest.raises(OutputHungError, match="writing the summary and the completion marker did not finish"):
            _run(_output_config(tmp_path, s3, name, manifest, proxy.endpoint))
    finally:
        took = time.monotonic() - started
        proxy.stop()
    assert took < 30, took
    _no_summary_then_the_rerun_writes_it(tmp_path, s3, bucket, manifest)


def test_reads_that_hang_at_the_end_stop_the_rank_and_the_rerun_finishes_the_output(tmp_path, media_dir, s3, bucket):
    """Every part is committed, then the end of the run reads them for the summary and the reads hang (headers, then
    nothing): before, rank 0 waited there until the scheduler's time limit (only the writes were bounded). Now the
    end of the run as a whole is held to ``output.finish_timeout_s``, and no summary or marker lands late."""
    name, fs = bucket
    rows = make_corpus(str(tmp_path / "all"), media_dir, 4)
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    proxy = FaultProxy(s3.port, hang={"/out/parts/part-": 0})  # GETs of committed parts; their PUTs pass
    raw = _output_config(tmp_path, s3, name, manifest, proxy.endpoint)
    raw["output"]["finish_timeout_s"] = 3
    before = set(threading.enumerate())
    started = time.monotonic()
    try:
        with pytest.raises(OutputHungError, match=r"finishing the output \(the summary's reads.* did not finish in "
                                                  r"output.finish_timeout_s=3s"):
            _run(raw)
        took = time.monotonic() - started
        assert proxy.hung >= 1  # a read of a part did hang
    finally:
        proxy.stop()  # the hung reads fail now; the abandoned thread ends (not inside pyarrow at the exit)
        for thread in set(threading.enumerate()) - before:
            if thread.name.endswith("-output"):
                thread.join(30)
                assert not thread.is_alive()
    assert took < 30, took
    _no_summary_then_the_rerun_writes_it(tmp_path, s3, bucket, manifest)


def test_a_bad_finish_timeout_is_a_config_error(tmp_path):
    raw = base_config("m.parquet", "c", str(tmp_path / "out"), str(tmp_path / "cache"),
                      output={"dir": str(tmp_path / "out"), "finish_timeout_s": 0})
    with pytest.raises(ConfigError, match=r"output.finish_timeout_s=0 must be above 0"):
        validate_config(build_config(raw))


def test_a_summary_given_up_as_hung_does_not_land_late_on_a_filesystem(tmp_path, media_dir, monkeypatch):
    """Output on a filesystem (a hung NFS or Lustre mount): the summary's first write blocks, the rank stops with
    ``OutputHungError``; when the write returns after all, nothing of the summary is renamed into place and no
    ``_SUCCESS`` is written late (a marker would tell readers the output is complete). The rerun writes them."""
    from fsspec.implementations.local import LocalFileSystem

    rows = make_corpus(str(tmp_path / "all"), media_dir, 4)
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    out = tmp_path / "out"
    raw = base_config(manifest, str(tmp_path / "all"), str(out), str(tmp_path / "cache"),
                      output={"dir": str(out), "commit_timeout_s": 1})
    real, gate = LocalFileSystem.pipe_file, threading.Event()

    def hangs_on_the_summary(self, path, *args, **kwargs):
        if "failures.jsonl" in path:
            gate.wait(30)
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "pipe_file", hangs_on_the_summary)
    before = set(threading.enumerate())  # earlier tests' abandoned threads may still be out
    with pytest.raises(OutputHungError, match="writing the summary and the completion marker did not finish"):
        _run(raw)
    gate.set()  # the mount answers again
    for t in set(threading.enumerate()) - before:
        if t.name.endswith("-output"):  # the summary's write, left behind by ``bounded``
            t.join(10)
    assert sorted(os.listdir(out)) == ["_config.json", "_logs", "_tmp", "parts"]  # no summary, no marker
    assert os.listdir(out / "_tmp") == []
    monkeypatch.setattr(LocalFileSystem, "pipe_file", real)
    again = _run(raw)
    assert again.summary["this_run"]["items"] == 0 and (out / "_SUCCESS").exists()


def test_a_part_that_lands_after_its_run_gave_it_up_is_removed_by_the_next_complete_run(tmp_path, media_dir, s3,
                                                                                      bucket):
    """An object store's PUT in flight cannot be withdrawn: a part given up as hung can still land, after a rerun
    redid its items, and give them a second success row. Reproduced: the proxy holds the part PUTs of the first run
    until the rerun is done, then lets them land. The next complete run (and the status before it) finds the second
    rows, and removes them before its completion marker: the late parts go, the rerun's stay."""
    from pipeline.status import job_status

    name, fs = bucket
    rows = make_corpus(str(tmp_path / "all"), media_dir, 8)
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    landing = threading.Event()
    proxy = FaultProxy(s3.port)

    def hold_parts_after_the_first():
        while not fs.exists(f"{name}/out/parts") or not fs.ls(f"{name}/out/parts", refresh=True):
            time.sleep(0.05)
        proxy.hold["/out/parts/"] = landing

    threading.Thread(target=hold_parts_after_the_first, daemon=True).start()
    slow = {"noop": {"sleep_s": 0.3}}
    one_at_a_time = {"consumers": 1, "producers": 1}  # 0.3 s an item: the hold is set while parts are still to come
    try:
        with pytest.raises(OutputHungError, match=r"the commit of .*/out/parts/part-.* did not finish"):
            _run(_output_config(tmp_path, s3, name, manifest, proxy.endpoint, filters=slow, runtime=one_at_a_time))
        assert proxy.held
        again = _run(_output_config(tmp_path, s3, name, manifest, s3.endpoint, filters=slow))  # the lease was released
        assert again.summary["total"]["succeeded"] == 8
        fs.invalidate_cache()
        parts = sorted(fs.ls(f"{name}/out/parts", refresh=True))
        landing.set()  # the endpoint answers the held PUTs after all
        deadline = time.monotonic() + 30
        while len(proxy.landed_late) < len(proxy.held) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(proxy.landed_late) == len(proxy.held)
    finally:
        proxy.stop()
    fs.invalidate_cache()
    ids = pq.read_table(f"{name}/out/parts", filesystem=fs)["video_id"].to_pylist()
    second = len(ids) - len(set(ids))
    assert second > 0  # the hole: items with two success rows
    cfg = build_config(_output_config(tmp_path, s3, name, manifest, s3.endpoint, filters=slow))
    validate_config(cfg)
    assert job_status(cfg)["output"]["duplicate_success_rows"] == second
    third = _run(_output_config(tmp_path, s3, name, manifest, s3.endpoint, filters=slow))
    assert third.summary["this_run"]["items"] == 0
    assert third.summary["total"]["duplicate_success_rows_removed"] == second
    fs.invalidate_cache()
    ids = pq.read_table(f"{name}/out/parts", filesystem=fs)["video_id"].to_pylist()
    assert sorted(ids) == sorted(r["video_id"] for r in rows)  # one row each again
    assert sorted(fs.ls(f"{name}/out/parts")) == parts  # the late parts went whole; the others are as they were
    assert fs.exists(f"{name}/out/_SUCCESS")
