#!/usr/bin/env python
"""What reading a manifest of many files, and the digest that every node now compares, cost, measured in one run.

The spill a node builds at the start (``pipeline.manifest.build_spill``: stream the manifest, write the node-local
spill and the ids file, check duplicates) over ``--rows`` manifest rows (ids, relative paths, two pass-through
columns), written as one Parquet file and as a Hive-partitioned directory of ``--files`` files (what Spark's
``partitionBy`` writes), on the local disk and on a local S3 server (moto, through s3fs). Each is built with the
digest and with its update made a no-op (the last version read no digest), best of ``--repeat``. Then the
directory on S3, direct and behind a proxy that adds ``--latency-ms`` to every request (an object store's first-byte
latency), read one file at a time and with files read ahead (``READ_AHEAD_FILES``).

Usage: python tests/benchmarks/bench_manifest_read.py [--rows 1000000] [--files 64] [--repeat 3] [--latency-ms 30]
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

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.dataset as ds  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

import pipeline.manifest as mf  # noqa: E402
from pipeline.config import InputConfig  # noqa: E402


def _table(rows: int) -> pa.Table:
    rng = np.random.default_rng(0)
    ids = [f"clip-{i:09d}" for i in range(rows)]
    return pa.table({"video_id": ids, "video_path": [f"videos/{i % 997:03d}/{i:09d}.mp4" for i in range(rows)],
                     "duration_s": rng.uniform(1, 600, rows), "source": rng.choice(["yt", "cc", "stock"], rows),
                     "shard": (np.arange(rows) % 16).astype(np.int32)})


def _build(cfg: InputConfig, spill: str, digest: bool, repeat: int, ahead: int = mf.READ_AHEAD_FILES
           ) -> tuple[float, dict]:
    real, real_ahead = mf.ManifestDigest.update, mf.READ_AHEAD_FILES
    if not digest:
        mf.ManifestDigest.update = lambda self, ids, paths: None
    mf.READ_AHEAD_FILES = ahead
    try:
        best, read = float("inf"), {}
        for _ in range(repeat):
            start = time.perf_counter()
            path = mf.build_spill(cfg, spill, "bench")
            best = min(best, time.perf_counter() - start)
            read = mf.spill_read(path)
            mf.remove_spill(path)
        return best, read
    finally:
        mf.ManifestDigest.update, mf.READ_AHEAD_FILES = real, real_ahead


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--files", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--latency-ms", type=float, default=30.0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    work = tempfile.mkdtemp(prefix="bench-manifest-")
    try:
        table = _table(args.rows)
        one = os.path.join(work, "manifest.parquet")
        pq.write_table(table, one)
        many = os.path.join(work, "dataset")
        ds.write_dataset(table, many, format="parquet", max_rows_per_file=-(-args.rows // args.files),
                         max_rows_per_group=min(-(-args.rows // args.files), 1 << 20),
                         partitioning=ds.partitioning(pa.schema([("shard", pa.int32())]), flavor="hive"))
        n_files = sum(len(f) for _d, _s, f in os.walk(many))
        spill = os.path.join(work, "spill")

        from tests.s3server import FaultProxy, MotoS3

        import s3fs

        server = MotoS3()
        try:
            opts = server.options()
            fs = s3fs.S3FileSystem(**opts, skip_instance_cache=True)
            fs.mkdir("bench")
            fs.put(one, "bench/manifest.parquet")
            fs.put(many, "bench/dataset", recursive=True)
            cases = [("local, one file", InputConfig(manifest=one)),
                     (f"local, {n_files} files", InputConfig(manifest=many)),
                     ("S3, one file", InputConfig(manifest="s3://bench/manifest.parquet", storage_options=opts)),
                     (f"S3, {n_files} files", InputConfig(manifest="s3://bench/dataset", storage_options=opts))]
            print(f"{args.rows:,} manifest rows; spill build (read, spill, ids file, duplicate check), best of "
                  f"{args.repeat}")
            print("| manifest | no digest (last version) | with digest | cost | rows read |")
            print("| --- | --- | --- | --- | --- |")
            for name, cfg in cases:
                plain, _ = _build(cfg, spill, False, args.repeat)
                digested, read = _build(cfg, spill, True, args.repeat)
                print(f"| {name} | {plain:.2f} s | {digested:.2f} s | {digested / plain:.2f}x | {read['rows']:,} "
                      f"from {read['files']} file(s) |")
            proxy = FaultProxy(server.port, latency_s=args.latency_ms / 1000)
            try:
                slow = server.options(endpoint=proxy.endpoint)
                print(f"\nthe {n_files}-file directory on S3, one file at a time vs {mf.READ_AHEAD_FILES} read ahead")
                print("| store | one at a time | read ahead | speed-up |")
                print("| --- | --- | --- | --- |")
                for name, options in (("S3 (loopback)", opts), (f"S3 + {args.latency_ms:.0f} ms a request", slow)):
                    cfg = InputConfig(manifest="s3://bench/dataset", storage_options=options)
                    serial, _ = _build(cfg, spill, True, args.repeat, ahead=1)
                    ahead, _ = _build(cfg, spill, True, args.repeat)
                    print(f"| {name} | {serial:.2f} s | {ahead:.2f} s | {serial / ahead:.1f}x |")
            finally:
                proxy.stop()
        finally:
            server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
