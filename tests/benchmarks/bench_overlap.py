#!/usr/bin/env python
"""Fetch/compute overlap of the job: object store slowed by injected latency, a compute-bound filter.

Prints, measured in one run on the same items: the job's wall time; a fetch-only pass and a compute-only pass
of the same job (their max is the floor a perfectly overlapped job could reach); and a sequential
fetch-then-compute baseline. Target: job wall <= 1.15 x max(fetch, compute), well ahead of the baseline.

The default is one consumer: one compute lane, as on a GPU rank whose compute does not need the CPU that
fetching uses. With ``--consumers 2`` on a 2-core machine the compute takes both cores, and fetch's own CPU
(the S3 client here, and the local S3 server process) has to come out of it.

Usage: python tests/benchmarks/bench_overlap.py [--items 48] [--latency-ms 100] [--compute-ms 80] [--consumers 1]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import s3fs  # noqa: E402

from pipeline.config import StorageConfig, TierConfig, build_config, validate_config  # noqa: E402
from pipeline.distributed import DistContext  # noqa: E402
from pipeline.filters.base import FilterContext  # noqa: E402
from pipeline.filters.synthetic import CpuBurnFilter, CpuBurnParams  # noqa: E402
from pipeline.media import synthetic  # noqa: E402
from pipeline.media.item import MediaItem  # noqa: E402
from pipeline.runner import run_rank  # noqa: E402
from tests.conftest import base_config, write_manifest  # noqa: E402
from tests.s3server import MotoS3  # noqa: E402


def start_servers(latency_ms: float):
    """moto and the latency proxy in a separate process, so their CPU is not charged to the job."""
    import subprocess

    proc = subprocess.Popen([sys.executable, "-m", "tests.s3server", "--latency-ms", str(latency_ms)], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().split()
    assert line and line[0] == "READY", line
    return proc, int(line[1]), int(line[2])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=48)
    parser.add_argument("--latency-ms", type=float, default=100.0, help="added to every S3 request")
    parser.add_argument("--compute-ms", type=float, default=80.0, help="CPU per item in the filter")
    parser.add_argument("--producers", type=int, default=6)
    parser.add_argument("--consumers", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    work = tempfile.mkdtemp(prefix="ms-bench-")
    proc, moto_port, proxy_port = start_servers(args.latency_ms)
    server = MotoS3.__new__(MotoS3)  # only for its options(): the server runs in `proc`
    server.endpoint = f"http://127.0.0.1:{moto_port}"
    try:
        fs = s3fs.S3FileSystem(**server.options())
        fs.mkdir("bench")
        clip = synthetic.motion_clip(os.path.join(work, "clip.mp4"), seconds=1.0)
        rows = []
        for i in range(args.items):
            fs.put(clip, f"bench/v/item_{i:04d}.mp4")
            rows.append({"video_id": f"id-{i:04d}", "video_path": f"item_{i:04d}.mp4"})
        manifest = write_manifest(os.path.join(work, "m.parquet"), rows)
        opts = server.options(endpoint=f"http://127.0.0.1:{proxy_port}")
        tier = {"name": "s3", "root": "s3://bench/v", "storage_options": opts}

        def job(name: str, filters: dict, cache: str) -> float:
            raw = base_config(manifest, "unused", os.path.join(work, f"out-{name}"), cache,
                              storage={"cache_dir": cache, "tiers": [tier]},
                              runtime={"producers": args.producers, "consumers": args.consumers, "queue_depth": 16,
                                       "unit_size": 4, "progress": False},
                              output={"dir": os.path.join(work, f"out-{name}"), "rows_per_file": 1000},
                              filters=filters)
            cfg = build_config(raw)
            validate_config(cfg)
            start = time.perf_counter()
            outcome = run_rank(cfg, DistContext())
            wall = time.perf_counter() - start
            assert outcome.summary["this_run"]["succeeded"] == args.items, outcome.summary
            return wall

        burn = {"cpu_burn": {"ms": args.compute_ms}}
        fetch_only = job("fetch", {"noop": {}}, os.path.join(work, "cache-a"))
        compute_only = job("compute", burn, os.path.join(work, "cache-a"))  # every item a cache hit
        full = job("full", burn, os.path.join(work, "cache-b"))  # cold cache: fetch and compute together

        # Sequential baseline: fetch one item, then compute on it, one at a time.
        fetcher = __import__("pipeline.storage", fromlist=["TieredFetcher"]).TieredFetcher(
            StorageConfig(cache_dir=os.path.join(work, "cache-c"), tiers=(TierConfig("s3", "s3://bench/v", opts),)))
        flt = CpuBurnFilter("cpu_burn", CpuBurnParams(ms=args.compute_ms))
        ctx = FilterContext("cpu", None)
        start = time.perf_counter()
        for r in rows:
            item = fetcher.fetch(r["video_path"])
            flt.run(MediaItem(r["video_id"], item.local_path, item.bytes), ctx)
            item.release()
        baseline = time.perf_counter() - start
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)

    floor = max(fetch_only, compute_only)
    print(f"\noverlap benchmark: {args.items} items, +{args.latency_ms:.0f} ms per S3 request, "
          f"{args.compute_ms:.0f} ms CPU per item, {args.producers} producers, {args.consumers} consumers, "
          f"{os.cpu_count()} cores")
    print(f"{'measure':<44}{'seconds':>10}{'items/s':>10}")
    for label, secs in [("job (fetch + compute, overlapped)", full),
                        ("fetch-only pass of the job", fetch_only),
                        ("compute-only pass of the job (cache hits)", compute_only),
                        ("max(fetch, compute)", floor),
                        ("sequential fetch-then-compute baseline", baseline)]:
        print(f"{label:<44}{secs:>10.2f}{args.items / secs:>10.1f}")
    print(f"job / max(fetch, compute) = {full / floor:.2f}  (target <= 1.15)")
    print(f"baseline / job           = {baseline / full:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
