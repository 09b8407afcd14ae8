#!/usr/bin/env python
"""The control plane at scale: a synthetic manifest of ids (no media), the ``noop`` filter, 2 ranks under torchrun.

Prints per size: items/s through work distribution and the writer, peak memory per rank, output file count, and
the time to compute the resume set from the committed output; then what 1,000 GPUs would ask of the shared
work-unit counter and of the writers at a given per-GPU throughput.

Usage: python tests/benchmarks/bench_control_plane.py [--sizes 100000 1000000] [--per-gpu 3.0]
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
sys.path.insert(0, ROOT)

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import yaml  # noqa: E402


_PEAK_WRAPPER = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.run(sys.argv[1:]).returncode\n"
    "print('peak_rss_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
    "sys.exit(rc)\n"
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--unit-size", type=int, default=256)
    parser.add_argument("--rows-per-file", type=int, default=20_000)
    parser.add_argument("--per-gpu", type=float, default=3.0, help="items/s per GPU of the real filters")
    args = parser.parse_args()
    from pipeline.resume import pending_indices, read_committed

    results = []
    for n in args.sizes:
        work = tempfile.mkdtemp(prefix="ms-cp-")
        try:
            ids = pa.array([f"clip-{i:09d}" for i in range(n)])
            paths = pa.array([f"shard{i % 1000:04d}/clip-{i:09d}.mp4" for i in range(n)])
            pq.write_table(pa.table({"video_id": ids, "video_path": paths}), os.path.join(work, "m.parquet"))
            cfg = {"input": {"manifest": os.path.join(work, "m.parquet")},
                   "storage": {"cache_dir": os.path.join(work, "cache"), "fetch": False},
                   "runtime": {"producers": 2, "consumers": 2, "queue_depth": 256, "unit_size": args.unit_size,
                               "progress": False, "metrics_interval_s": 30},
                   "output": {"dir": os.path.join(work, "out"), "rows_per_file": args.rows_per_file,
                              "flush_interval_s": 60},
                   "filters": {"noop": {}}}
            with open(os.path.join(work, "job.yaml"), "w") as f:
                yaml.safe_dump(cfg, f)
            env = dict(os.environ, OMP_NUM_THREADS="1")
            t = time.perf_counter()
            # The wrapper reports the peak RSS of the largest process it waited for, over its whole life (rank 0's
            # summary pass included; the ranks' own figure is taken before it).
            proc = subprocess.run([sys.executable, "-c", _PEAK_WRAPPER, sys.executable, "-m", "torch.distributed.run",
                                   "--standalone", "--nproc_per_node", "2", os.path.join(ROOT, "jobs", "run.py"),
                                   "--config", os.path.join(work, "job.yaml")],
                                  env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t
            if proc.returncode != 0:
                print(proc.stderr[-3000:])
                return 1
            summary = json.load(open(os.path.join(work, "out", "summary.json")))
            lifetime_peak = int(proc.stderr.strip().splitlines()[-1].split()[-1]) / 1024
            files = len(os.listdir(os.path.join(work, "out", "parts")))
            t = time.perf_counter()
            state = read_committed(os.path.join(work, "out"), {}, "video_id")
            pending = pending_indices(pa.chunked_array([ids]), state, True)
            resume_s = time.perf_counter() - t
            assert len(pending) == 0 and len(state.succeeded) == n
            results.append({"items": n, "wall_s": wall, "job_items_per_s": summary["this_run"]["items_per_s"],
                            "peak_rss_mb": max(r["peak_rss_mb"] for r in summary["per_rank"]),
                            "lifetime_peak_mb": lifetime_peak, "files": files,
                            "resume_s": resume_s})
        finally:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\ncontrol plane: noop filter, no media, 2 ranks, unit_size {args.unit_size}, rows_per_file "
          f"{args.rows_per_file}, {os.cpu_count()} cores")
    print(f"{'items':>10}{'wall s':>9}{'items/s (job)':>15}{'peak RSS MB/rank':>18}{'incl. summary':>15}"
          f"{'files':>7}{'resume set s':>14}")
    for r in results:
        print(f"{r['items']:>10}{r['wall_s']:>9.1f}{r['job_items_per_s']:>15.0f}{r['peak_rss_mb']:>18.0f}"
              f"{r['lifetime_peak_mb']:>15.0f}{r['files']:>7}{r['resume_s']:>14.2f}")
    if len(results) >= 2:
        a, b = results[0], results[-1]
        print(f"peak memory {b['items']} vs {a['items']}: {b['peak_rss_mb'] / a['peak_rss_mb']:.2f}x during the run, "
              f"{b['lifetime_peak_mb'] / a['lifetime_peak_mb']:.2f}x over the whole process life (target <= 1.1x)")
    gpus = 1000
    rate = gpus * args.per_gpu
    print(f"\nat {gpus} GPUs x {args.per_gpu} items/s: {rate:.0f} items/s; counter adds {rate / args.unit_size:.1f}/s "
          f"(unit_size {args.unit_size}); part commits {rate / args.rows_per_file * 60:.1f}/min at rows_per_file "
          f"{args.rows_per_file} (plus one per rank per flush_interval_s: {gpus / 60:.1f}/s at 60 s); "
          f"{rate * 86400 / 1e6:.0f}M rows/day")
    return 0


if __name__ == "__main__":
    sys.exit(main())
