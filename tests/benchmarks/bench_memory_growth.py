#!/usr/bin/env python
"""Does a rank's memory settle over many items, or grow? Measured in one run over the demo's filter stack.

A week-long job runs a rank over hundreds of thousands of items: a leak of a megabyte an item (a container left
open, a cache without a bound, a thread per item) ends it in the OOM killer by the third day. This runs the demo
config (probe, the signal filters, scene cuts, Silero VAD and speech cuts, on real clips, speech, and the demo's
broken files) over its corpus repeated under new ids (``--repeat`` times its 19 items) in one process, and reads the
rank's metrics every 2 s (``rss_mb``, resident memory now, beside ``done``). It prints the samples and the growth
per 1,000 items over the first and the second half of the run: a rank that settles grows in the first half (models
loaded, pools and caches filled to their bounds) and not in the second.

Usage: python tests/benchmarks/bench_memory_growth.py [--repeat 100]
"""

from __future__ import annotations

import argparse
import glob
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


def _slope(samples: list[tuple[int, float]]) -> float | None:
    """Least-squares MB per 1,000 items."""
    if len(samples) < 3 or samples[-1][0] == samples[0][0]:
        return None
    n = len(samples)
    mx = sum(d for d, _ in samples) / n
    my = sum(r for _, r in samples) / n
    sxx = sum((d - mx) ** 2 for d, _ in samples)
    return 1000 * sum((d - mx) * (r - my) for d, r in samples) / sxx if sxx else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=100, help="times the demo's 19 items are run, under new ids")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="ms-mem-")
    try:
        subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "make_demo_corpus.py"), "--out", work],
                       check=True, stdout=subprocess.DEVNULL)
        base = pq.read_table(os.path.join(work, "manifest.parquet"))
        tables = []
        for k in range(args.repeat):
            ids = pa.array([f"{v}-r{k:05d}" for v in base["video_id"].to_pylist()])
            tables.append(base.set_column(base.schema.get_field_index("video_id"), "video_id", ids))
        manifest = os.path.join(work, "many.parquet")
        pq.write_table(pa.concat_tables(tables), manifest)
        with open(os.path.join(ROOT, "configs", "default.yaml")) as f:
            cfg = yaml.safe_load(f)
        cfg["input"]["manifest"] = manifest
        cfg["storage"]["cache_dir"] = os.path.join(work, "cache")
        cfg["storage"]["tiers"][0]["root"] = os.path.join(work, "corpus")
        cfg["output"]["dir"] = os.path.join(work, "out")
        cfg["runtime"].update(progress=False, metrics_interval_s=2)
        config = os.path.join(work, "job.yaml")
        with open(config, "w") as f:
            yaml.safe_dump(cfg, f)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        started = time.monotonic()
        done = subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "run.py"), "--config", config], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wall = time.monotonic() - started
        if done.returncode != 0:
            print(done.stderr[-3000:])
            return done.returncode
        samples = []
        for path in glob.glob(os.path.join(work, "out", "_logs", "metrics-*.jsonl")):
            with open(path) as f:
                samples += [(rec["done"], rec["rss_mb"]) for rec in map(json.loads, f) if rec.get("rss_mb")]
        samples.sort()
        total = len(base) * args.repeat
        print(f"{total} items in {wall:.0f} s ({total / wall:.1f} items/s), one process; resident memory by items done:")
        step = max(1, len(samples) // 12)
        for d, r in samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else []):
            print(f"  {d:>7} items  {r:>8.1f} MB")
        half = samples[-1][0] / 2
        first = _slope([s for s in samples if s[0] <= half])
        second = _slope([s for s in samples if s[0] >= half])
        peak = max(r for _, r in samples)
        print(f"growth per 1,000 items: first half {first:+.1f} MB, second half {second:+.1f} MB; peak {peak:.0f} MB"
              if first is not None and second is not None else "too few samples: raise --repeat")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
