#!/usr/bin/env python
"""The manifest per node against the manifest per rank, side by side in one run.

The same job (a synthetic manifest of N ids, ``input.limit`` items processed with the ``noop`` filter, no media)
runs under ``torchrun --nproc_per_node=P`` twice: on this checkout, where the node's local rank 0 streams the
manifest into one spill and every rank memory-maps its ids, and on a baseline commit (default: the last one before
the change), where every rank streamed the manifest into a spill of its own and held its ids in memory. Printed per
version: wall time, peak RSS per rank (from the run summary), and the spill files the ranks built (seen in the node's
spill directory while the job runs).

Usage: python tests/benchmarks/bench_manifest_share.py [--items 5000000] [--nproc 2] [--baseline 2d88085]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(tree: str, work: str, nproc: int) -> dict:
    out = os.path.join(work, f"out-{os.path.basename(tree)}")
    cache = os.path.join(work, f"cache-{os.path.basename(tree)}")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    spill_dir = os.path.join(cache, "_manifest")
    spills: set[str] = set()
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 str(nproc), os.path.join(tree, "jobs", "run.py"), "--config",
                                 os.path.join(work, "job.yaml"), f"output.dir={out}", f"storage.cache_dir={cache}"],
                                env=env, stdout=subprocess.DEVNULL, stderr=err, text=True, cwd=tree)
        while proc.poll() is None:  # the spills live as long as the run: the Parquet ones are the spills built
            if os.path.isdir(spill_dir):
                spills.update(n for n in os.listdir(spill_dir) if n.endswith(".parquet"))
            time.sleep(0.05)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{tree}: exit {proc.returncode}\n{err.read()[-3000:]}")
    summary = json.load(open(os.path.join(out, "summary.json")))
    return {"wall_s": wall, "rss": [r["peak_rss_mb"] for r in sorted(summary["per_rank"], key=lambda r: r["rank"])],
            "spills": len(spills)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=5_000_000)
    parser.add_argument("--limit", type=int, default=2_000, help="items processed (the rest is only read)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--baseline", default="2d88085", help="the commit to compare with")
    args = parser.parse_args()
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    work = tempfile.mkdtemp(prefix="ms-share-")
    try:
        base = os.path.join(work, "baseline")
        os.makedirs(base)
        archive = subprocess.run(["git", "-C", ROOT, "archive", args.baseline], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", base], input=archive.stdout, check=True)
        n = args.items
        ids = pa.array([f"clip-{i:012d}" for i in range(n)])
        paths = pa.array([f"shard{i % 1000:04d}/clip-{i:012d}.mp4" for i in range(n)])
        pq.write_table(pa.table({"video_id": ids, "video_path": paths}), os.path.join(work, "m.parquet"))
        id_mb = (ids.nbytes) / 2**20
        del ids, paths
        cfg = {"input": {"manifest": os.path.join(work, "m.parquet"), "limit": args.limit},
               "storage": {"cache_dir": "unset", "fetch": False},
               "runtime": {"producers": 1, "consumers": 1, "progress": False},
               "output": {"dir": "unset"}, "filters": {"noop": {}}}
        with open(os.path.join(work, "job.yaml"), "w") as f:
            yaml.safe_dump(cfg, f)
        results = {"per rank (baseline)": _run(base, work, args.nproc),
                   "per node (this checkout)": _run(ROOT, work, args.nproc)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nmanifest of {n:,} ids ({id_mb:.0f} MB of id strings and offsets), {args.limit} items processed, "
          f"{args.nproc} ranks on one node, {os.cpu_count()} cores; baseline {args.baseline}")
    print(f"{'manifest':<26}{'wall s':>8}{'spills built':>14}  peak RSS MB per rank (rank 0, 1, ...)")
    for name, r in results.items():
        print(f"{name:<26}{r['wall_s']:>8.1f}{r['spills']:>14}  {', '.join(f'{x:.0f}' for x in r['rss'])}")
    a, b = results["per rank (baseline)"], results["per node (this checkout)"]
    saved = [x - y for x, y in zip(a["rss"], b["rss"])]
    print(f"peak RSS saved per rank: {', '.join(f'{x:.0f}' for x in saved)} MB; the node's total peak "
          f"{sum(a['rss']):.0f} -> {sum(b['rss']):.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
