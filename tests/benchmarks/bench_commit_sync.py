#!/usr/bin/env python
"""What syncing a part to the disk before its rename costs a commit, measured in one run.

``pipeline.writer.commit_bytes`` on a local directory (``--dir``: put it on the filesystem the job writes to; a
network one costs more per sync), side by side: the commit as it is (the temporary file synced, renamed, the
directory synced) and the commit with ``sync_to_disk`` a no-op (what it was before), for parts of the sizes a job
writes (``output.rows_per_file`` rows: tens of kB to a few MB), alternating the two so that neither gets a
warmer disk. A job commits a part every ``output.rows_per_file`` rows or ``output.flush_interval_s`` seconds per rank.

Usage: python tests/benchmarks/bench_commit_sync.py [--dir /path/on/the/output/fs] [--commits 200]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import fsspec  # noqa: E402

import pipeline.writer as writer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=None, help="a directory on the filesystem to measure (default: a temporary one)")
    parser.add_argument("--commits", type=int, default=200, help="commits per size and mode")
    args = parser.parse_args()
    base = tempfile.mkdtemp(prefix="bench-sync-", dir=args.dir)
    fs = fsspec.filesystem("file")
    os.makedirs(f"{base}/parts")
    synced = writer.sync_to_disk
    try:
        print(f"{'part size':>10} {'synced ms':>10} {'unsynced ms':>12} {'extra ms':>9}   (median of {args.commits})")
        for size in (36_000, 400_000, 4_000_000):
            data = os.urandom(size)
            times: dict[str, list[float]] = {"synced": [], "unsynced": []}
            for i in range(args.commits):
                for mode in ("synced", "unsynced") if i % 2 == 0 else ("unsynced", "synced"):
                    writer.sync_to_disk = synced if mode == "synced" else (lambda path, directory=False: None)
                    start = time.perf_counter()
                    writer.commit_bytes(fs, f"{base}/parts/{mode}-{size}-{i}.parquet", data, f"{base}/_tmp")
                    times[mode].append(time.perf_counter() - start)
            a, b = (statistics.median(times[m]) * 1e3 for m in ("synced", "unsynced"))
            print(f"{size / 1e3:>8.0f}kB {a:>10.2f} {b:>12.2f} {a - b:>9.2f}")
    finally:
        writer.sync_to_disk = synced
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
