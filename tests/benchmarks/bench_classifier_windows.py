#!/usr/bin/env python
"""A clip classifier's sliding windows on a long clip, side by side in one run: the windows held at once from the
item's decode (``stream_windows: false``: ``max_windows`` spread over the clip) and read all through at the
configured stride (``WindowStream``, the default); with ``--baseline REV``, the code at git revision REV too (a
worktree, in its own process). Per side: seconds, peak process memory (``ru_maxrss`` of a process of its own),
windows, their stride, frames decoded; and whether the spread windows' rows equal the baseline's.

The model is the users' input shape (48 frames at 256x256, tubelet 2, patch 16: 6,144 tokens) with a narrow
randomly initialised backbone: its rows measure memory and speed, never a finding.

Usage: python tests/benchmarks/bench_classifier_windows.py [--seconds 300] [--size 640x360] [--window 2]
[--reversed] [--device cuda:0] [--baseline REV]
(``--device``: where the model runs, FP16 on a GPU; the frames are decoded on the CPU either way)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def measure(code: str, clip: str, model: str, window_s: float, reversed_windows: bool, stream: bool | None,
            device: str = "cpu") -> dict:
    """One classifier on ``clip`` with ``code`` (a checkout of mediasieve) on the import path, its model on
    ``device``; ``stream`` None: the parameter left out (a revision before it)."""
    sys.path.insert(0, code)
    from pipeline.config import FilterSpec, VideoConfig
    from pipeline.filters import build_filters
    from pipeline.filters.base import FilterContext, SetupContext
    from pipeline.media.item import MediaItem
    from pipeline.model_pool import ModelPool, localize_model
    from pipeline.video.decoders import available_backends

    params = {"model_uri": model, "window_s": window_s, "reversed_windows": reversed_windows, "whole_clip": True}
    if stream is not None:
        params["stream_windows"] = stream
    (f,) = build_filters((FilterSpec("vfx", "clip_classifier", True, params),))
    pool = ModelPool(device, instances=1)
    cache = tempfile.mkdtemp()
    f.setup(SetupContext(device, pool, lambda u, o=None: localize_model(u, cache, 0, lambda: None, o)))
    item = MediaItem("x", clip, 0, f.frame_requests(), VideoConfig(), available_backends(("decord", "torchcodec",
                                                                                          "pyav")))
    t = time.perf_counter()
    out = f.apply(item, FilterContext(device, pool))
    seconds = time.perf_counter() - t
    starts = [w["start_s"] for w in out["windows"]]
    return {"seconds": seconds, "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "windows": len(starts), "stride": (starts[1] - starts[0]) if len(starts) > 1 else None,
            "frames": item.frames_decoded, "backend": item.decode_backend, "row": out}


def _side(code: str, args, stream: bool | None) -> dict:
    """One row, measured in a process of its own (``baseline.run_side``: its peak memory is its own)."""
    from tests.benchmarks.baseline import run_side

    side_args = ["--clip", args.clip, "--model", args.model, "--window", str(args.window), "--device", args.device]
    side_args += ["--reversed"] if args.reversed else []
    side_args += [] if stream is None else ["--stream", str(int(stream))]
    return run_side(__file__, code, side_args, quiet=True)


def same_windows(a: dict, b: dict, tol: float = 1e-4) -> bool:
    """The rows' windows equal: the same spans and labels, probabilities within ``tol`` (batches composed another
    way sum in another order)."""
    for key in ("windows", "reversed_windows"):
        if len(a[key]) != len(b[key]):
            return False
        for x, y in zip(a[key], b[key]):
            if (x["start_s"], x["end_s"], x["label"]) != (y["start_s"], y["end_s"], y["label"]) or \
                    not math.isclose(x["prob"], y["prob"], abs_tol=tol):
                return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--size", default="640x360")
    parser.add_argument("--window", type=float, default=2.0, help="window_s (the stride is the window)")
    parser.add_argument("--reversed", action="store_true", help="reversed windows too")
    parser.add_argument("--device", default="cpu", help="where the model runs (cuda:0: FP16)")
    parser.add_argument("--baseline", help="a git revision to compare with (run from a worktree of it)")
    parser.add_argument("--code", help=argparse.SUPPRESS)
    parser.add_argument("--clip", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--stream", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.json:  # one side of a comparison
        stream = None if args.stream is None else bool(args.stream)
        with open(args.json, "w") as f:
            json.dump(measure(args.code, args.clip, args.model, args.window, args.reversed, stream, args.device), f)
        return 0
    sys.path.insert(0, ROOT)
    from pipeline.media import synthetic
    from tests.video.tiny_models import tiny_videomae

    d = tempfile.mkdtemp()
    args.clip = synthetic.lavfi_clip(os.path.join(d, "long.mp4"), f"testsrc2=size={args.size}:rate=25", args.seconds)
    args.model = tiny_videomae(os.path.join(d, "model"), num_frames=48, image_size=256)
    sides = {"read all through (default)": _side(ROOT, args, True),
             "spread (stream_windows false)": _side(ROOT, args, False)}
    if args.baseline:
        from tests.benchmarks.baseline import worktree

        with worktree(args.baseline) as tree:
            sides[f"{args.baseline} (before)"] = _side(tree, args, None)
    print(f"\none classifier, 48 frames at 256x256, windows of {args.window:g} s every {args.window:g} s"
          f"{' and reversed' if args.reversed else ''}, on {args.seconds:g} s of {args.size} at 25 fps (model on "
          f"{args.device}, decode on the CPU, a process per row)")
    print(f"{'side':<34}{'seconds':>9}{'peak GiB':>10}{'windows':>9}{'stride s':>10}{'frames':>8}  backend")
    for name, s in sides.items():
        stride = f"{s['stride']:.2f}" if s["stride"] is not None else "-"
        print(f"{name:<34}{s['seconds']:>9.1f}{s['peak_gib']:>10.2f}{s['windows']:>9}{stride:>10}{s['frames']:>8}"
              f"  {s['backend']}")
    if args.baseline:
        before = sides[f"{args.baseline} (before)"]["row"]
        print("spread rows equal the baseline's:", "yes" if same_windows(sides["spread (stream_windows false)"]["row"],
                                                                          before) else "NO")
    return 0


if __name__ == "__main__":
    sys.exit(main())
