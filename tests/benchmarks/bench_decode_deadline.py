#!/usr/bin/env python
"""What a decode given up at ``video.decode_timeout_s`` still costs, per backend: how long it goes on decoding after
its item got ``DecodeTimeout``, and the CPU the process spends meanwhile; then whether a plain decode still works
after 16 decodes that hang for good in native code (which no stop reaches). With ``--baseline REV``, side by side
with the code at git revision REV (a worktree, run in its own process).

Usage: python tests/benchmarks/bench_decode_deadline.py [--seconds 60] [--timeout 0.5] [--baseline REV]
(generates a 1280x720 clip of ``--seconds`` with the ffmpeg CLI)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BACKENDS = ("pyav", "torchcodec", "decord")


def measure(code: str, clip: str, short: str, timeout_s: float) -> dict:
    """One side, run with ``code`` first on the path."""
    sys.path.insert(0, code)
    from pipeline.errors import DecodeTimeout
    from pipeline.video.decoders import available_backends, decode_video
    from pipeline.video.sampling import EveryK, Uniform

    class Watched:
        """The real backend; notes when its decode call returns or raises (either code's call signature)."""

        def __init__(self, real):
            self.real, self.name, self.ended = real, real.name, threading.Event()

        def meta(self, path, **kw):
            return self.real.meta(path, **kw)

        def decode(self, *args, **kw):
            try:
                return self.real.decode(*args, **kw)
            finally:
                self.ended.set()

    out: dict = {"ran_on_s": {}, "cpu_s": {}}
    for name in BACKENDS:
        try:
            w = Watched(available_backends((name,))[0])
        except Exception:  # noqa: BLE001 - decord has no wheel off x86_64 Linux
            continue
        w.meta(clip)  # imports and a first open outside the measure
        try:
            decode_video(clip, [EveryK(1)], [w], timeout_s=timeout_s, max_frames=10**6, max_bytes=1 << 40)
        except DecodeTimeout:
            pass
        t0, c0 = time.monotonic(), time.process_time()
        w.ended.wait(600)
        out["ran_on_s"][name] = round(time.monotonic() - t0, 2)
        out["cpu_s"][name] = round(time.process_time() - c0, 2)
        time.sleep(0.5)
    release = threading.Event()

    class Hang:
        name = "hang"

        def meta(self, path, **kw):
            return available_backends(("pyav",))[0].meta(path)

        def decode(self, *args, **kw):
            release.wait()  # a native call that never returns: no stop reaches it

    for _ in range(16):
        try:
            decode_video(short, [Uniform(2)], [Hang()], timeout_s=0.2)
        except DecodeTimeout:
            pass
    t0 = time.monotonic()
    try:
        decode_video(short, [Uniform(2)], available_backends(("pyav",)), timeout_s=2.0)
        out["after_16_stuck"] = f"decoded in {time.monotonic() - t0:.2f} s"
    except DecodeTimeout:
        out["after_16_stuck"] = f"DecodeTimeout after {time.monotonic() - t0:.2f} s"
    release.set()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--timeout", type=float, default=0.5)
    parser.add_argument("--baseline", help="a git revision to compare with (run from a worktree of it)")
    parser.add_argument("--code", help=argparse.SUPPRESS)
    parser.add_argument("--clips", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.json:  # one side of a comparison
        with open(args.json, "w") as f:
            json.dump(measure(args.code, *args.clips, args.timeout), f)
        os._exit(0)  # the hung threads of the last measure must not hold the process
    sys.path.insert(0, ROOT)
    from pipeline.media import synthetic
    from tests.benchmarks.baseline import run_side, worktree

    work = tempfile.mkdtemp(prefix="bench-deadline-")
    clip = synthetic.lavfi_clip(os.path.join(work, "long.mp4"), "testsrc2=size=1280x720:rate=25", args.seconds)
    short = synthetic.lavfi_clip(os.path.join(work, "short.mp4"), seconds=1.0)
    side_args = ["--clips", clip, short, "--timeout", str(args.timeout)]
    sides = {}
    if args.baseline:
        with worktree(args.baseline) as tree:
            sides[args.baseline] = run_side(__file__, tree, side_args, quiet=True)
    sides["this checkout"] = run_side(__file__, ROOT, side_args, quiet=True)
    print(f"a {args.seconds:g} s 1280x720 clip, every frame asked for, given up at {args.timeout:g} s")
    print(f"{'backend':<12}" + "".join(f"{n + ': ran on / CPU':>34}" for n in sides))
    for b in BACKENDS:
        cells = [f"{s['ran_on_s'][b]:.2f} s / {s['cpu_s'][b]:.2f} s" if b in s["ran_on_s"] else "n/a"
                 for s in sides.values()]
        print(f"{b:<12}" + "".join(f"{c:>34}" for c in cells))
    for n, s in sides.items():
        print(f"{n}: a 1 s clip after 16 decodes stuck for good: {s['after_16_stuck']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
