#!/usr/bin/env python
"""Per-filter cost of the weight-free signal filters on CPU and (when present) CUDA, on the same decoded clips;
with ``--baseline REV``, side by side with the code at git revision REV (a worktree, run in its own process,
alternating with this checkout), and whether the two give the same results.

Usage: python tests/benchmarks/bench_signal_filters.py [--media DIR] [--repeats 5] [--baseline REV [--rounds 3]]
(DIR: clips to use; default: generated 5 s 1280x720 clips (plain, letterboxed with a subtitle on the bar, and a
blur-filled upright picture), which needs the ffmpeg CLI)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NAMES = ("black_borders", "static", "exposure", "sharpness", "scene_cuts")


def measure(code: str, clips: list[str], repeats: int) -> dict:
    """ms per clip per (device, filter), best of ``repeats``, and each filter's results, with ``code`` (a checkout
    of mediasieve) on the import path."""
    sys.path.insert(0, code)
    import torch

    from pipeline.config import FilterSpec, VideoConfig
    from pipeline.filters import build_filters, frame_requests_of
    from pipeline.filters.base import FilterContext
    from pipeline.media.item import MediaItem
    from pipeline.video.decoders import available_backends

    filters = build_filters(tuple(FilterSpec(n, n) for n in NAMES))
    reqs = frame_requests_of(filters)
    items = []
    for c in clips:
        item = MediaItem("x", c, 0, reqs, VideoConfig(), available_backends(("decord", "torchcodec", "pyav")))
        item.video()
        items.append(item)
    devices = ["cpu"] + (["cuda:0"] if torch.cuda.is_available() else [])
    ms, results = {}, {}
    for dev in devices:
        ctx = FilterContext(dev, None)
        for f in filters:
            results[f"{dev} {f.name}"] = [f.apply(it, ctx) for it in items]  # also the warm-up (CUDA context)
            if dev.startswith("cuda"):
                torch.cuda.synchronize()
            best = float("inf")
            for _ in range(repeats):
                t = time.perf_counter()
                for it in items:
                    f.apply(it, ctx)  # each apply ends in .cpu()/float() reads, so the GPU work is finished
                best = min(best, time.perf_counter() - t)
            ms[f"{dev} {f.name}"] = best / len(items) * 1000
    v = items[0].video()
    return {"ms": ms, "results": results, "devices": devices, "threads": torch.get_num_threads(),
            "frames": len(v.plan.indices), "size": f"{v.meta.width}x{v.meta.height}"}


def same(a, b, rel: float = 1e-4) -> bool:
    """Results equal, numbers within ``rel`` (float32 sums in another order differ in the last digits), on the
    fields both sides have (``added`` lists the fields only the newer side has)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return all(same(a[k], b[k], rel) for k in a.keys() & b.keys())
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(a, b, rel_tol=rel, abs_tol=1e-6)
    return a == b


def added(old: list, new: list) -> set[str]:
    """Top-level fields of a filter's results that only ``new`` has."""
    return {k for o, n in zip(old, new) if isinstance(o, dict) and isinstance(n, dict) for k in n.keys() - o.keys()}


def make_clips(d: str, blur_fill: bool = True) -> list[str]:
    """The benchmark's 5-s 720p clips in ``d`` (the ffmpeg CLI): plain, letterboxed with a subtitle on the bar, and
    blur-filled (20 MB; ``device_kit`` leaves it out)."""
    sys.path.insert(0, ROOT)
    from pipeline.media import synthetic

    clips = [synthetic.lavfi_clip(os.path.join(d, "plain.mp4"), "testsrc2=size=1280x720:rate=25", 5.0),
             synthetic.letterboxed_clip(os.path.join(d, "letterbox.mp4"), 5.0, "1280x544", "1280x720",
                                        subtitle="a subtitle on the bar")]
    if blur_fill:
        clips.append(synthetic.blur_filled_clip(os.path.join(d, "blur_fill.mp4"), "404x720", "1280x720", 5.0))
    return clips


def _clips(directory: str | None) -> list[str]:
    if directory:
        return [os.path.join(directory, n) for n in sorted(os.listdir(directory))]
    return make_clips(tempfile.mkdtemp())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--media")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline", help="a git revision to compare with (run from a worktree of it)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs of each side, best taken")
    parser.add_argument("--code", help=argparse.SUPPRESS)
    parser.add_argument("--media-files", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.json:  # one side of a comparison
        with open(args.json, "w") as f:
            json.dump(measure(args.code, args.media_files, args.repeats), f)
        return 0
    clips = _clips(args.media)
    if not args.baseline:
        now = measure(ROOT, clips, args.repeats)
        sides = {"this checkout": now}
    else:
        sys.path.insert(0, ROOT)
        from tests.benchmarks.baseline import run_side, worktree

        side_args = ["--media-files", *clips, "--repeats", str(args.repeats)]
        runs = {args.baseline: [], "this checkout": []}
        with worktree(args.baseline) as tree:
            for _ in range(args.rounds):
                runs[args.baseline].append(run_side(__file__, tree, side_args))
                runs["this checkout"].append(run_side(__file__, ROOT, side_args))
        sides = {}
        for name, rs in runs.items():
            side = dict(rs[0])
            side["ms"] = {k: min(r["ms"][k] for r in rs) for k in rs[0]["ms"]}
            sides[name] = side
        now = sides["this checkout"]
    print(f"\nsignal filters, ms per clip ({len(clips)} clips, {now['size']}, {now['frames']} decoded frames each; "
          f"torch threads {now['threads']}; best of {args.repeats}"
          + (f" x {args.rounds} alternating processes per side)" if args.baseline else ")"))
    cols = [(name, dev) for dev in now["devices"] for name in sides]
    print(f"{'filter':<16}" + "".join(f"{(dev + ' ' + name)[:24]:>26}" for name, dev in cols)
          + ("   same results" if args.baseline else ""))
    for f in NAMES + ("total",):
        row = f"{f:<16}"
        for name, dev in cols:
            ms = sides[name]["ms"]
            v = sum(ms[f"{dev} {n}"] for n in NAMES) if f == "total" else ms[f"{dev} {f}"]
            row += f"{v:>26.1f}"
        if args.baseline and f != "total":
            old, new = sides[args.baseline]["results"], now["results"]
            row += "   " + ("yes" if all(same(old[f"{d} {f}"], new[f"{d} {f}"]) for d in now["devices"]) else "NO")
            extra = added(old[f"cpu {f}"], new[f"cpu {f}"])
            row += f" (new fields: {', '.join(sorted(extra))})" if extra else ""
        print(row)
    if args.baseline:
        for d in now["devices"]:
            t0 = sum(sides[args.baseline]["ms"][f"{d} {n}"] for n in NAMES)
            t1 = sum(now["ms"][f"{d} {n}"] for n in NAMES)
            print(f"{d}: {t0 / t1:.2f}x the baseline's speed over the five filters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
