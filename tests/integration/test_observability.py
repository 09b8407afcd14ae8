"""Prometheus endpoint while a rank runs; secrets never reach logs, rows, summaries or error messages."""

import glob
import os
import subprocess
import sys
import threading
import time
import urllib.request

from pipeline.config import build_config, validate_config
from pipeline.distributed import DistContext
from pipeline.runner import run_rank
from tests.conftest import ROOT, base_config, make_corpus, write_manifest
from tests.s3server import free_port


def test_prometheus_endpoint_serves_rank_metrics(tmp_path, media_dir):
    rows = make_corpus(str(tmp_path / "c"), media_dir, 12)
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    port = free_port()
    raw = base_config(manifest, str(tmp_path / "c"), str(tmp_path / "out"), str(tmp_path / "cache"),
                      runtime={"prometheus_port": port}, filters={"noop": {"sleep_s": 0.3}, "speech_cuts": {}})
    cfg = build_config(raw)
    validate_config(cfg)
    result = {}
    t = threading.Thread(target=lambda: result.update(outcome=run_rank(cfg, DistContext())))
    t.start()
    seen, done = "", 0.0
    deadline = time.time() + 60
    while time.time() < deadline and done == 0.0 and t.is_alive():
        time.sleep(0.2)
        try:
            seen = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
        except OSError:
            continue
        for line in seen.splitlines():
            if line.startswith('mediasieve_items_processed{rank="0"}'):
                done = float(line.split()[-1])
    t.join(120)
    assert done > 0  # scraped while the rank was running, with items already counted
    assert "mediasieve_queue_depth" in seen and "mediasieve_tier_hits" in seen
    assert "mediasieve_cache_bytes" in seen and "mediasieve_crash_suspects" in seen
    assert 'mediasieve_batch_limit{model="speech_cuts/vad",rank="0"} 128.0' in seen  # no OOM: the configured size
    assert 'mediasieve_oom_splits{model="speech_cuts/vad",rank="0"} 0.0' in seen
    assert 'mediasieve_fetches_hung{rank="0"} 0.0' in seen
    assert 'mediasieve_decodes_past_deadline{rank="0"} 0.0' in seen
    assert 'mediasieve_corrupt_media{kind="audio_packets_lost",rank="0"}' in seen  # the process's count so far
    assert 'mediasieve_items_damaged{rank="0"} 0.0' in seen
    assert 'mediasieve_cache_discarded{rank="0"} 0.0' in seen
    rss = next(float(line.split()[-1]) for line in seen.splitlines()
               if line.startswith('mediasieve_resident_bytes{rank="0"}'))
    assert 50e6 < rss < 20e9  # the process's memory now: torch alone holds more than 50 MB
    assert result["outcome"].summary["this_run"]["succeeded"] == 12


def test_a_skipped_tier_shows_on_prometheus_while_it_is_skipped():
    from pipeline.metrics import PrometheusExporter

    port = free_port()
    exporter = PrometheusExporter(port, rank=3)
    snap = {"done": 5, "failures_by_type": {}, "tier_hits": {"s3": 5}, "bytes_fetched": 10, "fetches_hung": 2,
            "decodes_past_deadline": 1, "corrupt_media": {"video_frames_lost": 12, "audio_packets_lost": 0},
            "damaged_items": 2}

    def scrape():
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()

    try:
        exporter.update({**snap, "tiers_skipped": {"shared": 580.0}})
        seen = scrape()
        assert 'mediasieve_tier_skipped{rank="3",tier="shared"} 1.0' in seen
        assert 'mediasieve_fetches_hung{rank="3"} 2.0' in seen
        assert 'mediasieve_decodes_past_deadline{rank="3"} 1.0' in seen
        assert 'mediasieve_corrupt_media{kind="video_frames_lost",rank="3"} 12.0' in seen
        assert 'mediasieve_items_damaged{rank="3"} 2.0' in seen
        exporter.update({**snap, "tiers_skipped": {}})
        assert 'mediasieve_tier_skipped{rank="3",tier="shared"} 0.0' in scrape()
    finally:
        exporter.close()


def test_secrets_never_leave_the_environment(tmp_path, media_dir, s3, bucket, monkeypatch):
    name, fs = bucket
    secret = "SUPERSECRET-" + "x" * 20
    key_id = "AKIASECRETKEYID12345"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    rows = make_corpus(str(tmp_path / "all"), media_dir, 3)
    for r in rows:
        fs.put(str(tmp_path / "all" / r["video_path"]), f"{name}/v/{r['video_path']}")
    rows.append({"video_id": "missing", "video_path": "nope.mp4", "batch": 0})
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    opts = s3.options()
    opts.update(key=key_id, secret=secret)  # also given explicitly in the config, as some users do
    raw = base_config(manifest, "unused", str(tmp_path / "out"), str(tmp_path / "cache"),
                      storage={"cache_dir": str(tmp_path / "cache"),
                               "tiers": [{"name": "s3", "root": f"s3://{name}/v", "storage_options": opts}]})
    (tmp_path / "job.yaml").write_text(__import__("yaml").safe_dump(raw))
    # the CLI at DEBUG level: everything it prints, and everything it writes, is free of the credentials
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "run.py"), "--config", str(tmp_path / "job.yaml"),
                           "--log-level", "DEBUG"], env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "3 succeeded, 1 failed" in proc.stdout
    assert secret not in proc.stdout + proc.stderr and key_id not in proc.stdout + proc.stderr
    for path in glob.glob(str(tmp_path / "out" / "**" / "*"), recursive=True):
        if os.path.isfile(path):
            data = open(path, "rb").read()
            assert secret.encode() not in data and key_id.encode() not in data, path
