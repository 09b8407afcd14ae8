#!/usr/bin/env python
"""Does a rank's memory settle over many items, or grow? Measured in one run over the demo's filter stack.

A week-long job runs a rank over hundreds of thousands of items: a leak of a megabyte an item (a container left
open, a cache without a bound, a thread per item) ends it in the OOM killer by the third day. This runs the demo
config (probe, the signal filters, scene cuts, Silero VAD and speech cuts, on real clips, speech, and the demo's
broken files) over its corpus repeated under new ids (``--repeat`` times its 19 items) in one process, and reads the
rank's metrics every 2 s (``rss_mb``, resident memory now, beside ``done``). It prints the samples and the growth
per 1,000 items over the first and the second half of the run: a rank that settles grows in the first half (models
loaded, pools and caches filled to their bounds) and not in the second. It also counts the process's threads and
open file descriptors from outside (a thread or a file left per item shows there first). ``--arenas 0 2`` runs it
once per glibc ``MALLOC_ARENA_MAX`` (0: glibc's default, 8 per core), side by side: native memory that grows with
many threads' arenas and not with the items shows as the difference.

``--filters probe speech_cuts`` keeps only those of the demo's filters, to find which part grows. ``--models`` adds
YOLO regions (with its crop encoded) and a video classifier over windows, with tiny random weights made here: their
outputs mean nothing, their memory over the items is what is measured.

Usage: python tests/benchmarks/bench_memory_growth.py [--repeat 100] [--arenas 0 2] [--filters NAME ...] [--models]
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
import threading
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


def _process_counts(pid: int) -> tuple[int, int] | None:
    """``(threads, open file descriptors)`` of a live process."""
    try:
        with open(f"/proc/{pid}/status") as f:
            threads = next(int(line.split()[1]) for line in f if line.startswith("Threads:"))
        return threads, len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration, ValueError):
        return None


def _measure(config: str, out_dir: str, total: int, arenas: int) -> int:
    shutil.rmtree(out_dir, ignore_errors=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if arenas:
        env["MALLOC_ARENA_MAX"] = str(arenas)
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "jobs", "run.py"), "--config", config], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    counts: list[tuple[float, int, int]] = []  # (time, threads, fds), sampled from outside
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.append(proc.stderr.read()), daemon=True)
    reader.start()
    while proc.poll() is None:
        got = _process_counts(proc.pid)
        if got is not None:
            counts.append((time.time(), *got))
        time.sleep(2.0)
    reader.join(30)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        print("".join(stderr)[-3000:])
        return proc.returncode
    samples = []  # (done, rss MB, time)
    for path in glob.glob(os.path.join(out_dir, "_logs", "metrics-*.jsonl")):
        with open(path) as f:
            samples += [(rec["done"], rec["rss_mb"], rec["time"]) for rec in map(json.loads, f) if rec.get("rss_mb")]
    samples.sort()

    def near(t: float) -> tuple[int, int] | tuple[str, str]:
        best = min(counts, key=lambda c: abs(c[0] - t), default=None)
        return (best[1], best[2]) if best is not None else ("?", "?")

    label = f"MALLOC_ARENA_MAX={arenas}" if arenas else "glibc's default arenas"
    print(f"{label}: {total} items in {wall:.0f} s ({total / wall:.1f} items/s), one process")
    print(f"  {'items':>7} {'resident MB':>12} {'threads':>8} {'fds':>5}")
    step = max(1, len(samples) // 12)
    for d, r, t in samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else []):
        threads, fds = near(t)
        print(f"  {d:>7} {r:>12.1f} {threads:>8} {fds:>5}")
    pairs = [(d, r) for d, r, _ in samples]
    half = pairs[-1][0] / 2 if pairs else 0
    first = _slope([s for s in pairs if s[0] <= half])
    second = _slope([s for s in pairs if s[0] >= half])
    if first is None or second is None:
        print("  too few samples: raise --repeat")
    else:
        print(f"  growth per 1,000 items: first half {first:+.1f} MB, second half {second:+.1f} MB; "
              f"peak {max(r for _, r in pairs):.0f} MB")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=100, help="times the demo's 19 items are run, under new ids")
    parser.add_argument("--arenas", type=int, nargs="+", default=[0],
                        help="MALLOC_ARENA_MAX per run (0: glibc's default)")
    parser.add_argument("--filters", nargs="+", default=None, help="keep only these of the demo config's filters")
    parser.add_argument("--models", action="store_true",
                        help="add YOLO regions and a video classifier (tiny random weights: memory only)")
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
        if args.filters:
            unknown = set(args.filters) - set(cfg["filters"])
            if unknown:
                parser.error(f"not among the demo config's filters: {', '.join(sorted(unknown))}")
            cfg["filters"] = {k: v for k, v in cfg["filters"].items() if k in args.filters}
        if args.models:
            from tests.video.tiny_models import tiny_videomae, tiny_yolo

            cfg["filters"]["regions"] = {"type": "yolo_regions", "model_uri": tiny_yolo(os.path.join(work, "y.pt")),
                                         "imgsz": 320, "step": 5, "conf": 0.01,
                                         "crop_output": os.path.join(work, "crops")}
            cfg["filters"]["classes"] = {"type": "clip_classifier",
                                         "model_uri": tiny_videomae(os.path.join(work, "clf"), image_size=64)}
        config = os.path.join(work, "job.yaml")
        with open(config, "w") as f:
            yaml.safe_dump(cfg, f)
        for arenas in args.arenas:
            rc = _measure(config, cfg["output"]["dir"], len(base) * args.repeat, arenas)
            if rc:
                return rc
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
