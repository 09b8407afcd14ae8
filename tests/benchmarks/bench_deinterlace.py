#!/usr/bin/env python
"""Deinterlacing, side by side in one run: interlaced clips (576i and 1080i, woven by FFmpeg from a progressive clip
at 50 frames a second, ``synthetic.moving_box_clip``) decoded with ``video.deinterlace`` off and on, per backend:
seconds to decode what the default signal filters ask for, the mean luma error of full-size frames against the
progressive frame of their first field's moment (the oracle), and the sharpness filter's Laplacian variance
against the progressive clip's.

Usage: python tests/benchmarks/bench_deinterlace.py [--seconds 6]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from pipeline.config import FilterSpec, VideoConfig  # noqa: E402
from pipeline.filters import build_filters, frame_requests_of  # noqa: E402
from pipeline.filters.base import FilterContext  # noqa: E402
from pipeline.media import synthetic  # noqa: E402
from pipeline.media.item import MediaItem  # noqa: E402
from pipeline.video.decoders import available_backends  # noqa: E402
from pipeline.video.sampling import EveryK  # noqa: E402

SIGNAL = ("black_borders", "static", "exposure", "sharpness", "scene_cuts")
EVERY = 5


def _item(path: str, backend: str, requests, **video) -> MediaItem:
    return MediaItem("x", path, 0, requests, VideoConfig(backends=(backend,), **video), available_backends((backend,)))


def _luma_error(a, b) -> float:
    return float((a.float().mean(-1) - b.float().mean(-1)).abs().mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    filters = build_filters(tuple(FilterSpec(n, n) for n in SIGNAL))
    sharpness = next(f for f in filters if f.name == "sharpness")
    backends = [b.name for b in available_backends(("decord", "torchcodec", "pyav"))]
    print(f"{'clip':<7}{'backend':<12}{'decode off':>11}{'on':>8}{'luma error off':>16}{'on':>7}"
          f"{'sharpness off':>15}{'on':>8}{'progressive':>13}")
    with tempfile.TemporaryDirectory() as d:
        for name, size in (("576i", "720x576"), ("1080i", "1920x1080")):
            prog = synthetic.moving_box_clip(os.path.join(d, f"{name}-p.mp4"), size, seconds=args.seconds)
            inter = synthetic.moving_box_clip(os.path.join(d, f"{name}.mp4"), size, seconds=args.seconds,
                                              interlace="tff")
            truth = _item(prog, "pyav", [EveryK(2 * EVERY)]).video().view(EveryK(2 * EVERY))
            sharp_prog = sharpness.apply(_item(prog, "pyav", frame_requests_of([sharpness])),
                                         FilterContext("cpu", None))["laplacian_var"]
            for backend in backends:
                row = {}
                for on in (False, True):
                    item = _item(inter, backend, frame_requests_of(filters), deinterlace=on)
                    t = time.perf_counter()
                    item.video()
                    took = time.perf_counter() - t
                    full = _item(inter, backend, [EveryK(EVERY)], deinterlace=on).video().view(EveryK(EVERY))
                    n = min(len(full), len(truth))
                    row[on] = (took, _luma_error(full[:n], truth[:n]),
                               sharpness.apply(item, FilterContext("cpu", None))["laplacian_var"])
                print(f"{name:<7}{backend:<12}{row[False][0]:>9.2f} s{row[True][0]:>6.2f} s{row[False][1]:>16.2f}"
                      f"{row[True][1]:>7.2f}{row[False][2]:>15.0f}{row[True][2]:>8.0f}{sharp_prog:>13.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
