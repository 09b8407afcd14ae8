#!/usr/bin/env python
"""Listing mode (``input.listing_glob``) over S3: the last version's listing against this one's, in one run.

``--objects`` objects under ``videos/<shard>/`` on a local S3 server (moto in its own process, through s3fs), listed by
``videos/**/*.mp4`` into a manifest table, as rank 0 does once per run: the last version's way (s3fs's ``glob``,
then an ``isdir`` per object) and this one's (``list_objects_v2`` page by page, ``pipeline.manifest.list_glob``).
Python's allocations are traced (tracemalloc): the peak while listing, what is still held once the table is made
(the filesystem's directory cache), and the time. Each on a fresh filesystem instance.

Usage: python tests/benchmarks/bench_listing.py [--objects 10000]
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import posixpath
import sys
import time
import tracemalloc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import pyarrow as pa  # noqa: E402


def _last_version(fs, path: str) -> pa.Table:
    """The listing as the last version made it (pipeline/manifest.py at f8aeac3)."""
    base = path[: path.rfind("/", 0, path.index("*")) + 1]
    found = sorted(fs.glob(path))
    files = [p for p in found if not fs.isdir(p)]
    ids = [posixpath.relpath(p, base) for p in files]
    return pa.table({"video_id": pa.array(ids, pa.string()), "video_path": pa.array(["s3://" + p for p in files])})


def _measure(fn) -> tuple[float, float, float, int]:
    gc.collect()
    tracemalloc.start()
    start = time.perf_counter()
    table = fn()
    wall = time.perf_counter() - start
    gc.collect()
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return wall, peak, held, table.num_rows  # Arrow's memory is not Python's: the table is not counted


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--objects", type=int, default=10_000)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    import s3fs

    import subprocess

    from pipeline.config import InputConfig
    from pipeline.manifest import list_glob
    from tests.s3server import MotoS3

    # moto in its own process: its allocations are not the listing's
    proc = subprocess.Popen([sys.executable, "-m", "tests.s3server", "--latency-ms", "0"], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().split()
    assert line and line[0] == "READY", line
    server = MotoS3.__new__(MotoS3)  # only for its options()
    server.endpoint = f"http://127.0.0.1:{line[1]}"
    try:
        opts = server.options()
        fs = s3fs.S3FileSystem(**opts, skip_instance_cache=True)
        fs.mkdir("bench-listing")
        start = time.perf_counter()
        fs.pipe({f"bench-listing/videos/{i % 100:03d}/clip-{i:08d}.mp4": b"x" for i in range(args.objects)})
        print(f"{args.objects:,} objects put in {time.perf_counter() - start:.0f} s")
        pattern = "bench-listing/videos/**/*.mp4"

        def warmed() -> s3fs.S3FileSystem:
            """A fresh filesystem whose client is made (botocore's service model, some 12 MB of Python objects
            loaded once per client, is not the listing's)."""
            ours = s3fs.S3FileSystem(**opts, skip_instance_cache=True)
            ours.call_s3("list_objects_v2", Bucket="bench-listing", MaxKeys=1)
            return ours

        def now(ours: s3fs.S3FileSystem) -> pa.Table:
            import fsspec.core

            real = fsspec.core.url_to_fs
            fsspec.core.url_to_fs = lambda url, **kw: (ours, ours._strip_protocol(url))
            try:
                return list_glob(InputConfig(listing_glob="s3://" + pattern, storage_options=opts))
            finally:
                fsspec.core.url_to_fs = real

        print("| listing | rows | wall | peak Python allocations | per object | Python memory still held after |")
        print("| --- | --- | --- | --- | --- | --- |")
        for name, fn in (("last version: glob + isdir each", lambda fs: _last_version(fs, pattern)),
                         ("this version: page by page", now)):
            ours = warmed()
            wall, peak, held, rows = _measure(lambda: fn(ours))
            print(f"| {name} | {rows:,} | {wall:.1f} s | {peak / 1e6:.1f} MB | {peak / rows:,.0f} B | "
                  f"{held / 1e6:.1f} MB |")
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
