#!/usr/bin/env python
"""Two clip classifiers at one input size whose windows differ, as in ``configs/sieve.yaml`` (``vfx``: 4-s windows
every 2 s; ``rov``: 4-s windows every 4 s, and reversed), read all through on a long clip, side by side in one run
with the code at git revision ``--baseline REV`` (a worktree, each side in a process of its own). Before, each
classifier's windows were a pass of their own (the film decoded once for each); now one pass decodes the frames of
both (``read_windows``). Per side: seconds, peak process memory, frames decoded, each classifier's windows; and
whether the rows equal the baseline's.

The models are random narrow backbones of the given input shape (16 frames at 224 by default): their rows measure
the passes, never a finding.

Usage: python tests/benchmarks/bench_window_passes.py --baseline REV [--seconds 180] [--size 640x360]
[--frames 16] [--image-size 224]
"""

from __future__ import annotations

import os
import resource
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LAID = {"vfx": {"window_s": 4.0, "stride_s": 2.0}, "rov": {"window_s": 4.0, "reversed_windows": True}}
"""The two classifiers' windows, as ``configs/sieve.yaml`` lays them (``rov``'s stride is its window)."""


def measure(code: str, clip: str, models: dict[str, str]) -> dict:
    """Both classifiers on ``clip`` with ``code`` (a checkout of mediasieve) first on the import path."""
    sys.path.insert(0, code)
    from pipeline.config import FilterSpec, VideoConfig
    from pipeline.filters import build_filters, frame_requests_of
    from pipeline.filters.base import FilterContext, SetupContext
    from pipeline.media.item import MediaItem
    from pipeline.model_pool import ModelPool, localize_model
    from pipeline.video.decoders import available_backends

    filters = build_filters(tuple(FilterSpec(name, "clip_classifier", True, {"model_uri": models[name], **laid,
                                                                               "whole_clip": False})
                                  for name, laid in LAID.items()))
    pool = ModelPool("cpu", instances=1)
    cache = tempfile.mkdtemp()
    for f in filters:
        f.setup(SetupContext("cpu", pool, lambda u, o=None: localize_model(u, cache, 0, lambda: None, o)))
    item = MediaItem("x", clip, 0, frame_requests_of(filters), VideoConfig(),
                     available_backends(("decord", "torchcodec", "pyav")))
    t = time.perf_counter()
    rows = {f.name: f.apply(item, FilterContext("cpu", pool)) for f in filters}
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "frames": item.frames_decoded, "backend": item.decode_backend,
            "windows": {name: len(row["windows"]) for name, row in rows.items()}, "rows": rows}


def main() -> int:
    sys.path.insert(0, ROOT)
    from tests.benchmarks.baseline import classifier_sides, one_side

    args = classifier_sides(__doc__, 180.0, "640x360")
    if one_side(args, measure):
        return 0
    from pipeline.media import synthetic
    from tests.benchmarks.baseline import classifier_runs
    from tests.benchmarks.bench_classifier_windows import same_windows

    clip = synthetic.lavfi_clip(os.path.join(tempfile.mkdtemp(), "long.mp4"), f"testsrc2=size={args.size}:rate=25",
                                args.seconds)
    now, before = classifier_runs(__file__, args, clip, list(LAID))
    sides = {"one pass (now)": now, f"{args.baseline} (a pass each)": before}
    print(f"\nvfx (4-s windows every 2 s) and rov (every 4 s, and reversed), {args.frames} frames at "
          f"{args.image_size}, on {args.seconds:g} s of {args.size} at 25 fps (CPU, a process per row)")
    print(f"{'side':<28}{'seconds':>9}{'peak GiB':>10}{'frames':>8}{'vfx':>6}{'rov':>6}  backend")
    for name, s in sides.items():
        print(f"{name:<28}{s['seconds']:>9.1f}{s['peak_gib']:>10.2f}{s['frames']:>8}{s['windows']['vfx']:>6}"
              f"{s['windows']['rov']:>6}  {s['backend']}")
    same = all(same_windows(now["rows"][n], before["rows"][n]) for n in LAID)
    print("rows equal the baseline's:", "yes" if same else "NO")
    return 0


if __name__ == "__main__":
    sys.exit(main())
