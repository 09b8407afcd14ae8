#!/usr/bin/env python
"""Per-filter cost of the weight-free signal filters on CPU and (when present) CUDA, on the same decoded clips.

Usage: python tests/benchmarks/bench_signal_filters.py [--media DIR] [--repeats 5]
(DIR: clips to use; default: three generated 5 s 1280x720 clips, which needs the ffmpeg CLI)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from pipeline.config import FilterSpec, VideoConfig  # noqa: E402
from pipeline.filters import build_filters, frame_requests_of  # noqa: E402
from pipeline.filters.base import FilterContext  # noqa: E402
from pipeline.media.item import MediaItem  # noqa: E402
from pipeline.video.decoders import available_backends  # noqa: E402

NAMES = ("black_borders", "static", "exposure", "sharpness", "scene_cuts")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--media")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.media:
        clips = [os.path.join(args.media, n) for n in sorted(os.listdir(args.media))]
    else:
        from pipeline.media import synthetic

        d = tempfile.mkdtemp()
        clips = [synthetic.lavfi_clip(os.path.join(d, f"{i}.mp4"), "testsrc2=size=1280x720:rate=25", 5.0)
                 for i in range(3)]
    filters = build_filters(tuple(FilterSpec(n, n) for n in NAMES))
    reqs = frame_requests_of(filters)
    items = []
    for c in clips:
        item = MediaItem("x", c, 0, reqs, VideoConfig(), available_backends(("decord", "torchcodec", "pyav")))
        item.video()
        items.append(item)
    devices = ["cpu"] + (["cuda:0"] if torch.cuda.is_available() else [])
    results = {}
    for dev in devices:
        ctx = FilterContext(dev, None)
        for f in filters:
            for it in items:  # warm-up (CUDA context, kernels)
                f.apply(it, ctx)
            if dev.startswith("cuda"):
                torch.cuda.synchronize()
            best = float("inf")
            for _ in range(args.repeats):
                t = time.perf_counter()
                for it in items:
                    f.apply(it, ctx)  # each apply ends in .cpu()/float() reads, so the GPU work is finished
                best = min(best, time.perf_counter() - t)
            results[(dev, f.name)] = best / len(items) * 1000
    v = items[0].video()
    print(f"\nsignal filters, ms per clip ({len(items)} clips, {v.meta.width}x{v.meta.height}, "
          f"{len(v.plan.indices)} decoded frames each; torch threads {torch.get_num_threads()}; best of {args.repeats})")
    print(f"{'filter':<16}" + "".join(f"{d:>12}" for d in devices))
    for name in NAMES:
        print(f"{name:<16}" + "".join(f"{results[(d, name)]:>12.1f}" for d in devices))
    print(f"{'total':<16}" + "".join(f"{sum(results[(d, n)] for n in NAMES):>12.1f}" for d in devices))
    return 0


if __name__ == "__main__":
    sys.exit(main())
