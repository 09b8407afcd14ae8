"""The whole rank in-process (world size 1) over real media: local and S3 tiers, faults, bad and hostile input."""

import json
import os
import re

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.config import FilterSpec, VideoConfig, build_config, validate_config
from pipeline.distributed import DistContext
from pipeline.errors import OutputLockedError
from pipeline.filters.base import FilterContext
from pipeline.resume import OutputLease
from pipeline.runner import run_rank
from pipeline.status import format_status, job_status
from tests.conftest import base_config, make_corpus, probe_type_of_previous_version, write_manifest
from tests.s3server import FaultProxy


def _run(raw):
    cfg = build_config(raw)
    validate_config(cfg)
    return run_rank(cfg, DistContext())


def _rows(out):
    return pq.read_table(os.path.join(out, "parts")).to_pylist()


def test_job_with_bad_inputs_gives_typed_failure_rows(tmp_path, media_dir):
    corpus = tmp_path / "corpus"
    rows = make_corpus(str(corpus), media_dir, 4, kinds=("motion.mp4", "still.mp4", "speech.wav"))
    for name in ("empty.mp4", "random.mp4", "truncated.mp4", "notes.mp4"):
        os.link(os.path.join(media_dir, "broken", name), corpus / name)
        rows.append({"video_id": f"bad-{name}", "video_path": name, "batch": 9})
    rows.append({"video_id": "gone", "video_path": "missing.mp4", "batch": 9})
    rows.append({"video_id": "climb", "video_path": "../../etc/passwd", "batch": 9})
    rows.append({"video_id": "blank", "video_path": "", "batch": 9})
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    out = str(tmp_path / "out")
    outcome = _run(base_config(manifest, str(corpus), out, str(tmp_path / "cache")))
    by_id = {r["video_id"]: r for r in _rows(out)}
    assert len(by_id) == len(rows) == len(_rows(out))  # exactly one row each
    for i in range(4):
        r = by_id[f"id-{i:04d}"]
        assert r["result_info"]["succeed"] and r["batch"] == i % 3  # pass-through column kept
        assert r["result_info"]["storage_tier"] == "shared" and r["result_info"]["bytes"] > 0
        if i != 2:
            assert r["probe"]["duration_s"] == pytest.approx(1.0, abs=0.1)
    assert by_id["id-0000"]["probe"]["video"]["width"] == 320
    assert by_id["id-0002"]["probe"]["video"] is None and by_id["id-0002"]["probe"]["audio"]["sample_rate"] == 16000
    assert 1.0 < by_id["id-0002"]["probe"]["duration_s"] < 4.0  # espeak-ng speech of one short sentence
    types = {k: v["result_info"]["error_type"] for k, v in by_id.items() if not v["result_info"]["succeed"]}
    assert types == {"bad-empty.mp4": "DecodeError", "bad-random.mp4": "DecodeError",
                     "bad-truncated.mp4": "DecodeError", "bad-notes.mp4": "DecodeError", "gone": "NotFoundError",
                     "climb": "BadInputError", "blank": "BadInputError"}
    assert all(by_id[k]["result_info"]["error_message"] for k in types)
    s = outcome.summary
    assert s["this_run"]["items"] == len(rows) and s["total"]["failed"] == 7 and s["total"]["succeeded"] == 4
    assert s["total"]["failures_by_type"] == {"DecodeError": 4, "NotFoundError": 1, "BadInputError": 2}
    assert json.load(open(os.path.join(out, "summary.json")))["run_id"] == outcome.run_id
    assert len(open(os.path.join(out, "failures.jsonl")).read().splitlines()) == 7
    assert os.path.exists(os.path.join(out, "_SUCCESS")) and not os.path.exists(os.path.join(out, "_lease.json"))
    metrics = open(os.path.join(out, "_logs", f"metrics-{outcome.run_id}-r00000.jsonl")).read().splitlines()
    assert json.loads(metrics[-1])["done"] == len(rows)

    # rerun: only the failures are retried; second pass served from the cache; no second success row
    again = _run(base_config(manifest, str(corpus), out, str(tmp_path / "cache")))
    assert again.summary["this_run"]["items"] == 7 and again.summary["this_run"]["skipped_already_done"] == 4
    assert again.summary["this_run"]["tier_hits"].get("cache") == 4  # the 4 broken files fetched before
    ok = [r["video_id"] for r in _rows(out) if r["result_info"]["succeed"]]
    assert sorted(ok) == sorted(set(ok)) and len(ok) == 4
    third = _run(base_config(manifest, str(corpus), out, str(tmp_path / "cache"), resume={"retry_failed": False}))
    assert third.summary["this_run"]["items"] == 0


def test_hostile_ids_write_nothing_outside_output_and_cache(tmp_path, media_dir):
    corpus = tmp_path / "corpus"
    rows = make_corpus(str(corpus), media_dir, 4)
    hostile = ["../../x", "/etc/passwd", "a/../../../b", "..", "\\..\\..\\w", "id\x00nul", "x" * 5000, "$(rm -rf)"]
    for row, hid in zip(rows, hostile):
        row["video_id"] = hid
    rows += [{"video_id": hid, "video_path": "item_0000.mp4", "batch": 0} for hid in hostile[len(rows):]]
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    before = set(os.listdir(tmp_path))
    out, cache = tmp_path / "nested" / "out", tmp_path / "nested" / "cache"
    _run(base_config(manifest, str(corpus), str(out), str(cache)))
    assert set(os.listdir(tmp_path)) == before | {"nested"}
    assert sorted(os.listdir(tmp_path / "nested")) == ["cache", "out"]
    assert not os.path.exists("/x") and not (tmp_path.parent / "x").exists()
    got = {r["video_id"] for r in _rows(str(out)) if r["result_info"]["succeed"]}
    assert got == set(hostile)
    for dirpath, _dirs, files in os.walk(cache):
        for f in files:
            assert len(f) < 80 and ".." not in f


def test_object_store_tier_and_shared_tier(tmp_path, media_dir, s3, bucket):
    name, fs = bucket
    local = tmp_path / "shared"
    rows = make_corpus(str(tmp_path / "all"), media_dir, 6)
    local.mkdir()
    for r in rows[:3]:  # half on the shared filesystem, all in the object store
        os.link(tmp_path / "all" / r["video_path"], local / r["video_path"])
    for r in rows:
        fs.put(str(tmp_path / "all" / r["video_path"]), f"{name}/videos/{r['video_path']}")
    manifest = f"s3://{name}/manifest.parquet"
    with fs.open(f"{name}/manifest.parquet", "wb") as f:
        import pyarrow as pa

        pq.write_table(pa.Table.from_pylist(rows), f)
    out = f"s3://{name}/out"
    raw = base_config(manifest, "unused", out, str(tmp_path / "cache"),
                      input={"manifest": manifest, "storage_options": s3.options()},
                      output={"dir": out, "storage_options": s3.options(), "rows_per_file": 4},
                      storage={"cache_dir": str(tmp_path / "cache"), "tiers": [
                          {"name": "shared", "root": str(local)},
                          {"name": "s3", "root": f"s3://{name}/videos", "storage_options": s3.options()}]})
    outcome = _run(raw)
    assert outcome.summary["this_run"]["tier_hits"] == {"shared": 3, "s3": 3}
    table = pq.read_table(f"{name}/out/parts", filesystem=fs)
    tiers = dict(zip(table["video_id"].to_pylist(), pc.struct_field(table["result_info"], "storage_tier").to_pylist()))
    assert {tiers[r["video_id"]] for r in rows[:3]} == {"shared"} and {tiers[r["video_id"]] for r in rows[3:]} == {"s3"}
    assert fs.exists(f"{name}/out/_SUCCESS") and fs.exists(f"{name}/out/summary.json")
    assert fs.exists(f"{name}/out/_logs/metrics-{outcome.run_id}-r00000.jsonl")


def test_transient_object_store_faults_are_ridden_out(tmp_path, media_dir, s3, bucket):
    name, fs = bucket
    rows = make_corpus(str(tmp_path / "all"), media_dir, 12)
    for r in rows:
        fs.put(str(tmp_path / "all" / r["video_path"]), f"{name}/videos/{r['video_path']}")
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    proxy = FaultProxy(s3.port, fail_ratio=0.3, stall_ratio=0.1, stall_s=2.5, seed=7, only_get=True)
    try:
        # botocore's own retries are off so that our retry layer is what rides out the faults
        opts = s3.options(endpoint=proxy.endpoint, read_timeout=1, connect_timeout=1,
                          retries={"max_attempts": 1})
        raw = base_config(manifest, "unused", str(tmp_path / "out"), str(tmp_path / "cache"),
                          storage={"cache_dir": str(tmp_path / "cache"), "retries": 8, "backoff_base_s": 0.05,
                                   "backoff_max_s": 0.3,
                                   "tiers": [{"name": "s3", "root": f"s3://{name}/videos", "storage_options": opts}]})
        outcome = _run(raw)
    finally:
        proxy.stop()
    assert proxy.failed > 0 and proxy.stalled > 0, (proxy.requests, outcome.summary)
    assert outcome.summary["this_run"]["succeeded"] == 12 and outcome.summary["total"]["failed"] == 0
    attempts = [r["result_info"]["fetch_attempts"] for r in _rows(str(tmp_path / "out"))]
    assert max(attempts) > 1


def test_permanent_object_store_errors_are_not_retried(tmp_path, media_dir, s3, bucket):
    name, _fs = bucket
    manifest = write_manifest(str(tmp_path / "m.parquet"), [{"video_id": "a", "video_path": "missing.mp4"}])
    raw = base_config(manifest, "unused", str(tmp_path / "out"), str(tmp_path / "cache"),
                      storage={"cache_dir": str(tmp_path / "cache"), "retries": 5,
                               "tiers": [{"name": "s3", "root": f"s3://{name}/videos",
                                          "storage_options": s3.options()}]})
    outcome = _run(raw)
    row = _rows(str(tmp_path / "out"))[0]
    assert row["result_info"]["error_type"] == "NotFoundError" and row["result_info"]["retryable"] is False
    assert outcome.stats["fetch_retries"] == 0


def test_bad_tier_options_are_a_config_error_before_work(tmp_path, media_dir, s3, bucket):
    from pipeline.errors import ConfigError

    name, _fs = bucket
    manifest = write_manifest(str(tmp_path / "m.parquet"), [{"video_id": "a", "video_path": "a.mp4"}])
    raw = base_config(manifest, "unused", str(tmp_path / "out"), str(tmp_path / "cache"),
                      storage={"tiers": [{"name": "s3", "root": f"nosuchproto://{name}/v"}]})
    with pytest.raises(ConfigError, match="storage tier 's3'"):
        _run(raw)
    assert not (tmp_path / "out" / "parts").exists()


def test_second_run_on_a_live_output_refuses(tmp_path, media_dir):
    rows = make_corpus(str(tmp_path / "c"), media_dir, 2)
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    out = tmp_path / "out"
    live = OutputLease(str(out), {}, "someone-else", timeout_s=60)
    live.acquire()
    try:
        with pytest.raises(OutputLockedError, match="someone-else"):
            _run(base_config(manifest, str(tmp_path / "c"), str(out), str(tmp_path / "cache")))
        assert not (out / "parts").exists()
    finally:
        live.release()


def test_a_takeover_raised_after_the_last_look_at_the_flag_still_stops_the_last_commit(tmp_path, media_dir,
                                                                                        monkeypatch):
    """A rank that does not hold the lease looks at the takeover flag every few seconds. When the rank holding it
    raises the flag and exits, torchrun ends the others with SIGTERM, maybe before their next look, and their clean
    stop commits what they finished. The flag is read once more before that commit (seen under torchrun: the other
    rank stopped with 143 and a 'committed rows are kept')."""
    from pipeline import runner
    from pipeline.distributed import StopFlag

    class RaisedElsewhere(StopFlag):  # the lease holder's flag, already raised
        def reason(self):
            return "run 20261202T000000-0th3r000 (host elsewhere) took over the output directory"

    monkeypatch.setattr(runner, "StopFlag", RaisedElsewhere)
    monkeypatch.setattr(runner, "TAKEOVER_POLL_S", float("inf"))  # the loop never looks: only the last look sees it
    rows = make_corpus(str(tmp_path / "c"), media_dir, 4)
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    out = tmp_path / "out"
    raw = base_config(manifest, str(tmp_path / "c"), str(out), str(tmp_path / "cache"), filters={"noop": {}},
                      output={"dir": str(out), "rows_per_file": 100})  # nothing committed before the end
    with pytest.raises(OutputLockedError, match="took over the output directory"):
        _run(raw)
    assert not (out / "parts").exists() or not any((out / "parts").iterdir())


def test_a_run_whose_lease_is_taken_over_stops_and_commits_nothing_more(tmp_path, media_dir):
    """A run paused past its lease timeout (SIGSTOP, a frozen VM) finds on waking that another run took the output
    over: it must stop, and commit none of what it still holds, since the other run does those items."""
    import threading
    import time

    rows = make_corpus(str(tmp_path / "c"), media_dir, 16)
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    out = tmp_path / "out"
    raw = base_config(manifest, str(tmp_path / "c"), str(out), str(tmp_path / "cache"),
                      filters={"noop": {"sleep_s": 0.4}}, runtime={"consumers": 2, "producers": 1, "progress": False},
                      output={"dir": str(out), "rows_per_file": 2, "lease_timeout_s": 4})  # a heartbeat a second
    result = {}

    def run():
        try:
            result["outcome"] = _run(raw)
        except OutputLockedError as e:
            result["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 60
    while not ((out / "parts").is_dir() and any((out / "parts").iterdir())) and time.time() < deadline:
        time.sleep(0.05)
    other = {"run_id": "20261202T000000-0th3r000", "host": "elsewhere", "pid": 1, "pid_start": 1,
             "heartbeat": time.time()}
    (out / "_lease.json").write_text(json.dumps(other))
    taken_at = time.time()
    thread.join(60)
    assert "took over the output directory" in str(result.get("error")), result
    late = [p.name for p in (out / "parts").iterdir() if p.stat().st_mtime > taken_at + 1.5]  # a heartbeat + a loop
    assert late == [] and len(_rows(str(out))) < 16
    assert json.loads((out / "_lease.json").read_text())["run_id"] == other["run_id"]  # left to its owner


def test_resume_refuses_a_different_job(tmp_path, media_dir):
    from pipeline.errors import ConfigError

    rows = make_corpus(str(tmp_path / "c"), media_dir, 2)
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    raw = base_config(manifest, str(tmp_path / "c"), str(tmp_path / "out"), str(tmp_path / "cache"))
    _run(raw)
    with pytest.raises(ConfigError, match=r"different job \(video\.tone_map differ"):  # other pictures: other rows
        _run({**raw, "video": {**raw.get("video", {}), "tone_map": False}})
    raw["filters"] = {"noop": {}}
    with pytest.raises(ConfigError, match="different job"):
        _run(raw)


def test_resume_across_a_schema_change_stops_or_conforms(tmp_path, media_dir, monkeypatch):
    """An output begun by the previous version, whose probe had fewer stream fields, resumed by this one."""
    import polars as pl

    from pipeline.errors import ConfigError
    from pipeline.filters.probe import ProbeFilter

    rows = make_corpus(str(tmp_path / "c"), media_dir, 3)
    rows.append({"video_id": "late", "video_path": "late.mp4", "batch": 9})  # not there yet: fails, is retried
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    out = tmp_path / "out"
    raw = base_config(manifest, str(tmp_path / "c"), str(out), str(tmp_path / "cache"))
    current = ProbeFilter.output_type
    older = probe_type_of_previous_version()
    monkeypatch.setattr(ProbeFilter, "output_type", older)
    assert _run(raw).summary["total"]["failed"] == 1
    monkeypatch.setattr(ProbeFilter, "output_type", current)
    (tmp_path / "c" / "late.mp4").write_bytes((tmp_path / "c" / "item_0000.mp4").read_bytes())
    parts_before = sorted(os.listdir(out / "parts"))

    added = ("added: probe.video.rotation (int32), probe.video.index (int32), probe.video.sample_aspect_ratio "
             "(double), probe.video.interlaced (bool), probe.video.color_range (string), probe.video.color_primaries "
             "(string), probe.video.color_transfer (string), probe.video.color_space (string), probe.video.hdr (bool), "
             "probe.audio.index (int32))")
    with pytest.raises(ConfigError, match=re.escape(added)):
        _run(raw)
    assert sorted(os.listdir(out / "parts")) == parts_before  # stopped before any work

    raw["resume"] = {"on_schema_change": "conform"}
    outcome = _run(raw)
    assert outcome.summary["this_run"]["items"] == 1 and outcome.summary["total"]["succeeded"] == 4
    for part in os.listdir(out / "parts"):
        assert pq.read_schema(out / "parts" / part).field("probe").type.equals(older)
    table = pl.scan_parquet(str(out / "parts" / "*.parquet")).collect()  # refused a mixed table before
    late = table.filter(pl.col("video_id") == "late").filter(pl.col("result_info").struct.field("succeed"))
    assert late["probe"].struct.field("video").struct.field("width").to_list() == [320]


def test_urls_whose_filesystem_is_not_installed_stop_the_job_before_work(tmp_path, media_dir):
    """``gs://`` paths without gcsfs would fail every such item one by one, a week into a run; it is one clear
    error at the start instead, naming the package."""
    from pipeline.errors import ConfigError

    rows = make_corpus(str(tmp_path / "c"), media_dir, 2)
    rows.append({"video_id": "remote", "video_path": "gs://bucket/clip.mp4", "batch": 0})
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="gcsfs"):
        _run(base_config(manifest, str(tmp_path / "c"), str(out), str(tmp_path / "cache")))
    assert not (out / "parts").exists() and not (out / "_lease.json").exists()


def test_an_item_that_hangs_gets_a_timeout_row_and_the_rank_goes_on(tmp_path, media_dir, caplog):
    """A file that sends a decoder into a loop must not stall the rank (and, on every rerun, the job): past
    ``runtime.item_timeout_s`` it gets an ``ItemTimeout`` row, a fresh consumer takes the stuck one's place, and the
    stuck thread's late result, when it comes, is dropped (one row per item); the filters after the one it hung in
    do not run for it (before, they did, for nobody)."""
    import logging
    import time

    caplog.set_level(logging.DEBUG, logger="pipeline.runner")

    rows = make_corpus(str(tmp_path / "c"), media_dir, 12)
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    hang = {"id-0001": 2.0, "id-0004": 120.0}  # one returns late during the run, one never within it
    raw = base_config(manifest, str(tmp_path / "c"), str(tmp_path / "out"), str(tmp_path / "cache"),
                      runtime={"item_timeout_s": 0.8, "consumers": 2},
                      filters={"noop": {"sleep_s": 0.3, "hang_ids": ["id-0001"], "hang_s": hang["id-0001"]},
                               "slow": {"type": "noop", "hang_ids": ["id-0004"], "hang_s": hang["id-0004"]}})
    started = time.monotonic()
    outcome = _run(raw)
    assert time.monotonic() - started < 60  # did not wait for the thread stuck for 120 s
    got = _rows(str(tmp_path / "out"))
    assert sorted(r["video_id"] for r in got) == sorted(r["video_id"] for r in rows)  # exactly one row each
    failed = {r["video_id"]: r["result_info"] for r in got if not r["result_info"]["succeed"]}
    assert set(failed) == set(hang)
    assert all(f["error_type"] == "ItemTimeout" and f["retryable"] for f in failed.values())
    assert "in filter 'noop'" in failed["id-0001"]["error_message"]
    assert "in filter 'slow'" in failed["id-0004"]["error_message"]
    assert outcome.summary["total"]["succeeded"] == 10
    skipped = "item id-0001: given up by the watchdog; its filters from 'slow' on are skipped"
    while skipped not in caplog.text and time.monotonic() - started < hang["id-0001"] + 30:
        time.sleep(0.1)  # the stuck thread comes back from 'noop' 2 s in, maybe after the run ended
    assert skipped in caplog.text


def test_an_item_gets_more_time_for_longer_media(tmp_path, media_dir):
    """``item_timeout_per_hour_s``: an item's limit grows with its probed duration (a film is not a hung clip).
    Here 2 s per second of media: the 1-s clips get 0.8 + 2 s, so a 1.5-s filter finishes (0.8 s alone would
    time it out) and a hang is still given up, its message saying the limit."""
    rows = make_corpus(str(tmp_path / "c"), media_dir, 4)
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    raw = base_config(manifest, str(tmp_path / "c"), str(tmp_path / "out"), str(tmp_path / "cache"),
                      runtime={"item_timeout_s": 0.8, "item_timeout_per_hour_s": 7200, "consumers": 2},
                      filters={"probe": {}, "noop": {"hang_ids": ["id-0001", "id-0002"], "hang_s": 1.5},
                               "slow": {"type": "noop", "hang_ids": ["id-0002"], "hang_s": 60}})
    outcome = _run(raw)
    got = {r["video_id"]: r["result_info"] for r in _rows(str(tmp_path / "out"))}
    assert sorted(got) == sorted(r["video_id"] for r in rows)
    assert [k for k, info in got.items() if not info["succeed"]] == ["id-0002"]
    assert got["id-0001"]["cost_s"] > 1.5
    error = got["id-0002"]["error_message"]
    assert got["id-0002"]["error_type"] == "ItemTimeout" and "in filter 'slow'" in error
    assert re.search(r"item_timeout_s=0.8s \+ item_timeout_per_hour_s=7200s per hour of its 1(\.\d+)?s of media = "
                     r"2.8\d*s", error), error
    assert outcome.summary["total"]["succeeded"] == 3
    raw["runtime"]["item_timeout_per_hour_s"] = -1
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="item_timeout_per_hour_s=-1 must be 0 or more"):
        validate_config(build_config(raw))


def test_items_within_their_longer_limits_are_no_stall(tmp_path, media_dir):
    """Every consumer on an item that takes longer than ``stall_timeout_s`` but is within its limit (a film): the
    rank waits for them (before, it stopped with a ``StallError``: no item finished, the queue full)."""
    rows = make_corpus(str(tmp_path / "c"), media_dir, 4)
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    raw = base_config(manifest, str(tmp_path / "c"), str(tmp_path / "out"), str(tmp_path / "cache"),
                      storage={"fetch_silence_s": 2},
                      runtime={"item_timeout_s": 0.8, "item_timeout_per_hour_s": 14400, "stall_timeout_s": 3,
                               "consumers": 2, "queue_depth": 1},
                      filters={"probe": {}, "noop": {"sleep_s": 3.5}})  # limit 0.8 + 4 s a 1-s clip
    outcome = _run(raw)
    assert outcome.summary["total"]["succeeded"] == 4


def test_item_timeout_must_be_below_the_stall_timeout(tmp_path):
    from pipeline.errors import ConfigError

    raw = base_config(str(tmp_path / "m.parquet"), str(tmp_path), str(tmp_path / "out"), str(tmp_path / "cache"),
                      runtime={"item_timeout_s": 60, "stall_timeout_s": 60})
    with pytest.raises(ConfigError, match="item_timeout_s=60.* below runtime.stall_timeout_s"):
        validate_config(build_config(raw))


def test_broken_pictures_with_good_sound_fail_only_what_needs_the_pictures(tmp_path, media_dir):
    """A video whose picture packets are garbage but whose sound decodes: a speech-only job cuts its speech (the
    probe used to fail the whole item on the first picture); a job that also needs the pictures fails it with
    DecodeError from every video backend."""
    from pipeline.media import synthetic

    corpus = tmp_path / "c"
    corpus.mkdir()
    good = synthetic.still_clip(str(tmp_path / "talk.mkv"), seconds=3.0, speech="The pictures are gone but I am not.")
    synthetic.broken_pictures_copy(good, str(corpus / "broken.mkv"))
    manifest = write_manifest(str(tmp_path / "m.parquet"), [{"video_id": "b", "video_path": "broken.mkv"}])
    for name, filters in (("speech", {"probe": {}, "speech_cuts": {}}),
                          ("both", {"probe": {}, "speech_cuts": {}, "black_borders": {}})):
        out = str(tmp_path / name)
        outcome = _run(base_config(manifest, str(corpus), out, str(tmp_path / "cache"), filters=filters))
        (row,) = _rows(out)
        if name == "speech":
            assert row["result_info"]["succeed"], row["result_info"]
            assert row["speech_cuts"]["speech_ratio"] > 0.3 and row["probe"]["video"]["codec"] == "h264"
            metrics = open(os.path.join(out, "_logs", f"metrics-{outcome.run_id}-r00000.jsonl")).read().splitlines()
            # the VAD's batcher in the metrics: at its configured size, as nothing ran out of memory
            assert json.loads(metrics[-1])["batches"] == {"speech_cuts/vad": {
                "max_batch": 128, "batch_limit": 128, "oom_splits": 0, "oom_rows_failed": 0}}
        else:
            assert row["result_info"]["error_type"] == "DecodeError"
            assert "every video backend failed" in row["result_info"]["error_message"]


def test_a_file_with_a_corrupt_stretch_succeeds_and_the_summary_counts_the_damage(tmp_path):
    """A 12-s clip whose middle is zeroed: its row covers the whole clip (pictures and speech) and says what was lost
    (``video_frames_lost``, ``audio_packets_lost``; 0 on the clean clip, null where nothing decoded), so a reader can
    leave damaged clips out; the run's summary (and its printed account) counts the frames held and the audio packets
    silenced; a rerun with nothing to do counts none (the counts are this run's, though the process is the same).
    The same clip as a DivX-style AVI with a zeroed middle: its windows and sound go to its end, its spans are in the
    middle (none at the end: before, the chunks its demuxer passed over were reported as a broken tail)."""
    import importlib.util
    import shutil

    from pipeline.media import synthetic
    from tests.conftest import ROOT

    corpus = tmp_path / "c"
    corpus.mkdir()
    whole = synthetic.motion_clip(str(tmp_path / "whole.mp4"), seconds=12.0)
    synthetic.zeroed_middle_copy(whole, str(corpus / "damaged.mp4"))
    shutil.copy(whole, corpus / "whole.mp4")
    avi = str(tmp_path / "whole.avi")
    synthetic._ffmpeg(["-i", whole, "-c:v", "mpeg4", "-q:v", "4", "-bf", "2", "-g", "25", "-c:a", "pcm_s16le", avi])
    synthetic.zeroed_middle_copy(avi, str(corpus / "damaged.avi"))
    faststart = synthetic.lavfi_clip(str(tmp_path / "fs.mp4"), seconds=4.0, extra=("-movflags", "+faststart"))
    data = open(faststart, "rb").read()
    (corpus / "cut_short.mp4").write_bytes(data[: len(data) // 5])  # a download cut short: its header lists 100
    manifest = write_manifest(str(tmp_path / "m.parquet"), [{"video_id": "d", "video_path": "damaged.mp4"},
                                                            {"video_id": "w", "video_path": "whole.mp4"},
                                                            {"video_id": "m", "video_path": "missing.mp4"},
                                                            {"video_id": "t", "video_path": "cut_short.mp4"},
                                                            {"video_id": "a", "video_path": "damaged.avi"}])
    raw = base_config(manifest, str(corpus), str(tmp_path / "out"), str(tmp_path / "cache"),
                      filters={"probe": {}, "static": {}, "speech_cuts": {}})
    first = _run(raw)
    rows = {r["video_id"]: r for r in _rows(str(tmp_path / "out"))}
    row = rows["d"]
    assert row["result_info"]["succeed"] and row["result_info"]["decode_backend"] == "pyav"
    assert row["static"]["windows"][-1]["end_s"] > 11.5 and row["speech_cuts"]["duration_s"] > 11.9
    damaged = first.summary["this_run"]["corrupt_media"]
    assert damaged["video_frames_lost"] > 0 and damaged["audio_packets_lost"] > 0
    info = row["result_info"]
    assert 0 < info["video_frames_lost"] <= damaged["video_frames_lost"]  # the process counts each decode's
    assert info["audio_packets_lost"] + rows["a"]["result_info"]["audio_packets_lost"] == damaged[
        "audio_packets_lost"]  # one audio decode each
    spans = {s["stream"]: s for s in info["corrupt_spans"]}  # one stretch: a span in each stream, from mid-clip
    assert set(spans) == {"video", "audio"} and all(3 < s["start_s"] < s["end_s"] <= 12 for s in spans.values())
    assert spans["audio"]["end_s"] < 9 and abs(spans["video"]["start_s"] - spans["audio"]["start_s"]) < 1
    clean = rows["w"]["result_info"]
    assert clean["succeed"] and clean["video_frames_lost"] == 0 and clean["audio_packets_lost"] == 0
    assert clean["corrupt_spans"] == []
    missing = rows["m"]["result_info"]
    assert not missing["succeed"] and missing["video_frames_lost"] is None and missing["audio_packets_lost"] is None
    assert missing["corrupt_spans"] is None
    cut = rows["t"]["result_info"]  # a broken tail: the frames past it lost, their span to the stated end
    (tail,) = cut["corrupt_spans"]
    assert cut["succeed"] and 0 < cut["video_frames_lost"] < 100 and tail["stream"] == "video"
    assert tail["start_s"] == pytest.approx((100 - cut["video_frames_lost"]) / 25) and tail["end_s"] == 4.0
    avi_row = rows["a"]
    assert avi_row["result_info"]["succeed"] and avi_row["result_info"]["video_frames_lost"] > 0
    assert avi_row["static"]["windows"][-1]["end_s"] > 11.5 and avi_row["speech_cuts"]["duration_s"] > 11.9
    assert avi_row["result_info"]["audio_packets_lost"] > 0 and {s["stream"] for s in avi_row["result_info"][
        "corrupt_spans"]} == {"video", "audio"} and all(3 < s["start_s"] < s["end_s"] < 9 for s in avi_row[
            "result_info"]["corrupt_spans"])  # in the middle, none to the end
    import duckdb  # the README's two queries: clean clips, and the windows clear of the damage

    parts = f"{tmp_path / 'out'}/parts/*.parquet"
    clean_ids = duckdb.sql(f"""SELECT video_id FROM read_parquet('{parts}')
        WHERE result_info.succeed AND len(result_info.corrupt_spans) = 0""").fetchall()
    assert clean_ids == [("w",)]  # not the clip cut short
    clear = duckdb.sql(f"""SELECT video_id, w.start_s, w.end_s FROM read_parquet('{parts}'),
        unnest(static.windows) AS t(w) WHERE result_info.succeed AND len(list_filter(result_info.corrupt_spans,
        lambda s: s.start_s < w.end_s AND w.start_s < s.end_s)) = 0""").fetchall()
    assert len([w for w in clear if w[0] == "w"]) == len(rows["w"]["static"]["windows"])
    kept = [w for w in clear if w[0] == "d"]
    assert 0 < len(kept) < len(row["static"]["windows"])
    lo, hi = min(x["start_s"] for x in spans.values()), max(x["end_s"] for x in spans.values())
    assert all(e <= lo or s >= hi for _, s, e in kept)
    cfg = build_config(raw)
    validate_config(cfg)
    status = job_status(cfg)
    assert status["items"]["damaged"] == 3 and "3 succeeded with damage" in format_status(status)
    spec = importlib.util.spec_from_file_location("run_cli", os.path.join(ROOT, "jobs", "run.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert first.summary["this_run"]["damaged_items"] == 3  # the stretches and the file cut short
    assert (f"damaged  : 3 item(s) succeeded with damage (corrupt stretches or cut short: their rows' "
            f"result_info.corrupt_spans); {damaged['video_frames_lost']} video frames held"
            in cli.format_summary(first.summary))
    again = _run(raw)
    assert again.summary["this_run"]["corrupt_media"] == {"video_frames_lost": 0, "audio_packets_lost": 0}
    assert again.summary["this_run"]["damaged_items"] == 0
    assert "damaged" not in cli.format_summary(again.summary)


def test_several_filters_fill_their_typed_columns(tmp_path, media_dir):
    rows = make_corpus(str(tmp_path / "c"), media_dir, 3)
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    raw = base_config(manifest, str(tmp_path / "c"), str(tmp_path / "out"), str(tmp_path / "cache"),
                      filters={"probe": {}, "noop": {"sleep_s": 0.0}})
    outcome = _run(raw)
    assert outcome.summary["this_run"]["succeeded"] == 3
    row = _rows(str(tmp_path / "out"))[0]
    assert row["noop"]["bytes"] == row["result_info"]["bytes"] and {k for k, _ in row["result_info"]["filter_s"]} == {"probe", "noop"}


def test_default_filter_set_writes_typed_columns(tmp_path, media_dir):
    import pyarrow as pa

    rows = make_corpus(str(tmp_path / "c"), media_dir, 3, kinds=("motion.mp4", "still.mp4", "speech.wav"))
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    names = ["probe", "black_borders", "static", "exposure", "sharpness", "scene_cuts"]
    raw = base_config(manifest, str(tmp_path / "c"), str(tmp_path / "out"), str(tmp_path / "cache"),
                      filters={n: {} for n in names})
    outcome = _run(raw)
    assert outcome.summary["this_run"]["succeeded"] == 3
    table = pq.read_table(os.path.join(str(tmp_path / "out"), "parts"))
    for n in names:
        assert pa.types.is_struct(table.schema.field(n).type)
    assert pa.types.is_list(table.schema.field("static").type.field("windows").type)
    by_id = {r["video_id"]: r for r in table.to_pylist()}
    assert by_id["id-0001"]["static"]["static"] is True and by_id["id-0000"]["static"]["static"] is False
    assert by_id["id-0002"]["black_borders"] is None  # audio only
    info = by_id["id-0000"]["result_info"]
    assert info["decode_backend"] in ("decord", "torchcodec", "pyav") and info["frames_decoded"] > 0


def test_a_listing_job_lists_again_each_run_and_keeps_the_latest_snapshot(tmp_path, media_dir):
    import shutil

    from pipeline.errors import ManifestError

    corpus = tmp_path / "corpus"
    make_corpus(str(corpus), media_dir, 3)
    out = str(tmp_path / "out")
    raw = base_config("unused", str(corpus), out, str(tmp_path / "cache"),
                      input={"manifest": None, "listing_glob": f"{corpus}/*.mp4"})
    first = _run(raw)
    assert first.summary["this_run"]["succeeded"] == 3
    assert os.listdir(os.path.join(out, "_listing")) == [f"{first.run_id}.parquet"]
    shutil.copy(os.path.join(media_dir, "motion.mp4"), corpus / "late.mp4")  # uploaded after the first run
    second = _run(raw)
    assert second.summary["this_run"]["items"] == 1 and second.summary["total"]["succeeded"] == 4
    assert os.listdir(os.path.join(out, "_listing")) == [f"{second.run_id}.parquet"]  # the earlier one is gone
    shutil.rmtree(os.path.join(out, "_listing"))
    open(os.path.join(out, "_listing"), "w").close()  # the snapshot cannot be written: a typed stop, no hang
    with pytest.raises(ManifestError, match=r"cannot list .*\*\.mp4 into"):
        _run(raw)


def test_an_unreadable_committed_part_is_moved_aside_and_a_store_that_fails_stops_the_run(tmp_path, media_dir,
                                                                                         monkeypatch):
    from pipeline import runner
    from pipeline.errors import MediasieveError

    rows = make_corpus(str(tmp_path / "c"), media_dir, 2)
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    raw = base_config(manifest, str(tmp_path / "c"), str(tmp_path / "out"), str(tmp_path / "cache"))
    _run(raw)
    bad = tmp_path / "out" / "parts" / "part-20261202T000000-0badbad0-r00000-000000.parquet"
    bad.write_bytes(b"not parquet at all")  # dropped there by hand, or a disk that lost it
    again = _run(raw)  # before, this stopped every rerun: the file goes to the quarantine, the run goes on
    assert again.summary["this_run"]["items"] == 0 and again.summary["total"]["parts_quarantined"] == 1
    assert not bad.exists() and (tmp_path / "out" / "_quarantine" / "parts" / bad.name).read_bytes() == \
        b"not parquet at all"

    def store_down(*args, **kwargs):  # a read that fails with no damaged part behind it: the run stops
        raise OSError("Connection reset by peer")

    monkeypatch.setattr(runner, "read_committed", store_down)
    with pytest.raises(MediasieveError, match="cannot read the committed output.*Connection reset"):
        _run(raw)
    assert not (tmp_path / "out" / "_lease.json").exists()  # released: rerun once the store answers


def test_a_clip_the_signal_filters_and_classifiers_read_through_is_one_pass_in_the_job(tmp_path):
    """A job over a clip past every cap (the samples at 4 a second, two classifiers' windows): its row holds the
    cuts and both classifiers' windows, it decoded one pass (the frames of its samples and windows, once, and those
    that place the cuts), and ``filter_s`` has each filter's own seconds: the second classifier's model time is in
    its own entry, not in the first's nor in the static filter's, which read the pass."""
    from pipeline.filters import build_filters, frame_requests_of
    from pipeline.media import synthetic
    from pipeline.media.item import MediaItem
    from pipeline.video.decoders import available_backends
    from tests.video.test_clip_classifier import make_filters
    from tests.video.tiny_models import tiny_videomae

    corpus = tmp_path / "c"
    corpus.mkdir()
    synthetic.shots_clip(str(corpus / "film.mp4"), synthetic.SIX_SHOTS, size="160x120")
    manifest = write_manifest(str(tmp_path / "m.parquet"), [{"video_id": "film", "video_path": "film.mp4"}])
    laid = {"vfx": {"window_s": 1.0, "stride_s": 0.5}, "rov": {"window_s": 1.0, "reversed_windows": True}}
    classifiers = {name: {"type": "clip_classifier", "whole_clip": False, "max_windows": 2, **spec,
                          "model_uri": tiny_videomae(str(tmp_path / name), seed=k, image_size=128)}
                   for k, (name, spec) in enumerate(laid.items())}
    signal = {"static": {"max_frames": 3}, "scene_cuts": {"max_frames": 3}}
    raw = base_config(manifest, str(corpus), str(tmp_path / "out"), str(tmp_path / "cache"),
                      filters={"probe": {}, **signal, **classifiers})
    assert _run(raw).summary["this_run"]["succeeded"] == 1
    (row,) = _rows(str(tmp_path / "out"))
    assert [t["frame"] for t in row["scene_cuts"]["transitions"]] == [38, 53, 56, 86, 111]
    assert len(row["vfx"]["windows"]) == 11 and len(row["rov"]["reversed_windows"]) == 6
    apart = []  # the frames of the signal filters' pass and of the classifiers', each read alone
    for filters in (build_filters(tuple(FilterSpec(n, n, True, p) for n, p in signal.items())),
                    make_filters(tmp_path, {n: {k: v for k, v in spec.items() if k != "type"}
                                            for n, spec in classifiers.items()})):
        item = MediaItem("x", str(corpus / "film.mp4"), 0, frame_requests_of(filters), VideoConfig(),
                         available_backends(("decord", "torchcodec", "pyav")))
        for f in filters:
            f.apply(item, FilterContext("cpu", None))
        apart.append(item.frames_decoded)
    assert max(apart) < row["result_info"]["frames_decoded"] < sum(apart)  # the frames two of them share: once
    seconds = dict(row["result_info"]["filter_s"])
    assert all(seconds[n] > 0 for n in ("static", "scene_cuts", "vfx"))
    assert seconds["rov"] > 0.2 * seconds["vfx"]  # its 12 clips (6 reversed) against vfx's 11; before, about 0


def test_a_run_that_leaves_an_item_without_a_row_writes_no_completion_marker(tmp_path, media_dir, monkeypatch,
                                                                              caplog):
    """The ranks processing other positions than rank 0 decided (what nodes that read different manifests did,
    stopped at the start now) left items without a row, and ``_SUCCESS`` said the output was complete."""
    import pipeline.runner as runner

    rows = make_corpus(str(tmp_path / "c"), media_dir, 6)
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    out = tmp_path / "out"
    raw = base_config(manifest, str(tmp_path / "c"), str(out), str(tmp_path / "cache"))
    real = runner.pending_indices
    monkeypatch.setattr(runner, "pending_indices", lambda *a, **k: real(*a, **k)[1:])  # one item never handed out
    with caplog.at_level("ERROR", logger="pipeline.runner"):
        outcome = _run(raw)
    assert outcome.summary["total"]["without_row"] == 1 and outcome.summary["complete"] is False
    assert not (out / "_SUCCESS").exists()
    assert json.load(open(out / "summary.json"))["complete"] is False
    assert "1 item(s) of the manifest have no row although every rank finished its share" in caplog.text
    monkeypatch.setattr(runner, "pending_indices", real)
    again = _run(raw)  # the rerun processes it and says the output is complete
    assert again.summary["this_run"]["items"] == 1 and again.summary["complete"] is True
    assert (out / "_SUCCESS").exists()
