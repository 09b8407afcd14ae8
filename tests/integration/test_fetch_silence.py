"""A fetch that goes silent (a hung mount, an endpoint that accepts and never answers) against the real S3 server
behind a proxy that holds chosen requests open: the item gets a ``FetchTimeout`` row and the rank goes on, a slow but
live download is left alone, and storage that hangs on every fetch stops the rank instead of failing its share."""

import json
import os
import re
import time

import pyarrow.parquet as pq
import pytest

from pipeline.config import build_config, validate_config
from pipeline.distributed import DistContext
from pipeline.errors import ConfigError, StorageHungError
from pipeline.runner import run_rank
from tests.conftest import base_config, make_corpus, write_manifest
from tests.s3server import FaultProxy

SILENCE_S = 1.5


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


def test_a_silent_fetch_gets_a_timeout_row_and_a_rerun_fetches_it(tmp_path, media_dir, s3, bucket):
    name, fs = bucket
    rows, manifest = _upload(tmp_path, media_dir, fs, name, 8)
    # item 2: nothing answered at all; item 5: the headers and 64 KiB of the body, then nothing
    proxy = FaultProxy(s3.port, hang={"item_0002": None, "item_0005": 1 << 16})
    started = time.monotonic()
    try:
        outcome = _run(_config(tmp_path, s3, name, manifest, proxy.endpoint))
    finally:
        took = time.monotonic() - started
        proxy.stop()
    assert took < 30, took  # the rank did not wait for the hung requests (before: StallError after stall_timeout_s)
    got = _rows(str(tmp_path / "out"))
    assert sorted(got) == sorted(r["video_id"] for r in rows)  # one row each
    failed = {k: v for k, v in got.items() if not v["succeed"]}
    assert set(failed) == {"id-0002", "id-0005"}
    assert all(v["error_type"] == "FetchTimeout" and v["retryable"] for v in failed.values())
    assert "before any byte" in failed["id-0002"]["error_message"]
    got_bytes = int(re.search(r"after (\d+) bytes", failed["id-0005"]["error_message"]).group(1))
    assert 0 < got_bytes <= 1 << 16  # what the client read of the 64 KiB sent
    assert "item_0005.mp4" in failed["id-0005"]["error_message"]
    assert outcome.summary["this_run"]["succeeded"] == 6

    again = _run(_config(tmp_path, s3, name, manifest, s3.endpoint))  # the storage answers again
    assert again.summary["this_run"]["items"] == 2 and again.summary["this_run"]["succeeded"] == 2
    assert all(v["succeed"] for v in _rows(str(tmp_path / "out")).values())


def test_a_slow_but_live_download_is_not_abandoned(tmp_path, s3, bucket):
    """Silence is measured between bytes, not over the whole download: 10 pieces 0.5 s apart take 5 s, over the
    silence limit, and still succeed."""
    name, fs = bucket
    fs.pipe(f"{name}/videos/big.bin", os.urandom(10 << 16))
    manifest = write_manifest(str(tmp_path / "m.parquet"), [{"video_id": "big", "video_path": "big.bin"}])
    proxy = FaultProxy(s3.port, trickle_paths=("big.bin",), trickle_s=0.5)
    try:
        outcome = _run(_config(tmp_path, s3, name, manifest, proxy.endpoint, filters={"noop": {}}))
    finally:
        proxy.stop()
    info = _rows(str(tmp_path / "out"))["big"]
    assert info["succeed"], info
    assert info["bytes"] == 10 << 16 and info["fetch_s"] > 3 * SILENCE_S
    assert outcome.stats["fetches_hung"] == 0


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
    started = time.monotonic()
    try:
        outcome = _run(raw)
    finally:
        took = time.monotonic() - started
        proxy.stop()
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
