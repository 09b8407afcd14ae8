#!/usr/bin/env python
"""HDR tone mapping per frame, side by side in one run: the look-up table ``tone_map_`` uses against the same
mapping computed pixel by pixel (``_map``), on decoded frames of a generated clip (1080p and the reduced pass's
455x256), on CPU and (when present) CUDA; and the one-off cost of building the table.

Usage: python tests/benchmarks/bench_tonemap.py [--frames 16]
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

from pipeline.media import synthetic  # noqa: E402
from pipeline.video import tonemap  # noqa: E402
from pipeline.video.decoders import available_backends, decode_video  # noqa: E402
from pipeline.video.sampling import Uniform  # noqa: E402


def per_frame_ms(fn, frames: torch.Tensor, device: str) -> float:
    fn(frames[:1].clone())  # warm
    work = frames.clone()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn(work)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / frames.shape[0] * 1000


def make_clip(d: str) -> str:
    """A 2-s 1080p PQ (smpte2084) clip in ``d`` (the ffmpeg CLI), its SDR source removed."""
    sdr = synthetic.lavfi_clip(os.path.join(d, "sdr.mp4"), "testsrc2=size=1920x1080:rate=25", 2.0)
    hdr = synthetic.hdr_copy(sdr, os.path.join(d, "pq.mp4"))
    os.remove(sdr)
    return hdr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--clip", help="a PQ (smpte2084) clip to use instead of making one (needs the ffmpeg CLI)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        hdr = args.clip or make_clip(d)
        full = decode_video(hdr, [Uniform(args.frames)], available_backends(("pyav",))).frames
        small = decode_video(hdr, [Uniform(args.frames)], available_backends(("pyav",)), max_side=455).frames
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"{'device':<8}{'frames':<12}{'table build':>14}{'look-up':>12}{'arithmetic':>14}{'ratio':>8}")
    for dev in devices:
        tonemap._TABLES.clear()
        t = time.perf_counter()
        tonemap._table("smpte2084", torch.device(dev))
        if dev == "cuda":
            torch.cuda.synchronize()
        build = time.perf_counter() - t
        for frames in (full, small):
            f = frames.to(dev)
            table = per_frame_ms(lambda x: tonemap.tone_map_(x, "smpte2084"), f, dev)
            direct = per_frame_ms(lambda x: x.copy_(tonemap._map(x, "smpte2084")), f, dev)
            size = f"{f.shape[2]}x{f.shape[1]}"
            print(f"{dev:<8}{size:<12}{build:>12.2f} s{table:>9.1f} ms{direct:>11.1f} ms{direct / table:>7.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
