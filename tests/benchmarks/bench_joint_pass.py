#!/usr/bin/env python
"""The signal filters and two clip classifiers as ``configs/sieve.yaml`` lays them (``static`` and ``scene_cuts``
sampling 4 frames a second; ``vfx``, 4-s windows every 2 s, and ``rov``, every 4 s and reversed), all reading a
clip past their caps (5 minutes for the samples, about 2 for the windows) all through, side by side in one run with the code at git revision ``--baseline REV`` (a
worktree, each side in a process of its own). Before, the samples were one pass over the film and the windows
another; now one pass decodes both (``pipeline.video.stream.passes``). Per side: seconds, peak process memory,
decodes (each walks the film from a keyframe: a pass's groups, the cuts' placing), frames kept, each filter's
``filter_s``; and whether the rows agree with the baseline's (the classifiers' windows, the cut frames, the static
windows).

The models are random narrow backbones of the given input shape (16 frames at 224 by default): their rows measure
the passes, never a finding.

Usage: python tests/benchmarks/bench_joint_pass.py --baseline REV [--seconds 420] [--size 1280x720] [--grain]
"""

from __future__ import annotations

import os
import resource
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LAID = {"vfx": {"window_s": 4.0, "stride_s": 2.0}, "rov": {"window_s": 4.0, "reversed_windows": True}}
SHOTS = ("testsrc2", "smptebars", "testsrc", "rgbtestsrc", "pal100bars", "yuvtestsrc")


def measure(code: str, clip: str, models: dict[str, str]) -> dict:
    """The four filters on ``clip`` with ``code`` (a checkout of mediasieve) first on the import path."""
    sys.path.insert(0, code)
    from pipeline.config import FilterSpec, VideoConfig
    from pipeline.filters import build_filters, frame_requests_of
    from pipeline.filters.base import FilterContext, SetupContext
    from pipeline.media.item import MediaItem
    from pipeline.model_pool import ModelPool, localize_model
    from pipeline.video.decoders import available_backends

    specs = [FilterSpec("static", "static", True, {}), FilterSpec("scene_cuts", "scene_cuts", True, {})]
    specs += [FilterSpec(name, "clip_classifier", True, {"model_uri": models[name], **laid, "whole_clip": False})
              for name, laid in LAID.items()]
    filters = build_filters(tuple(specs))
    pool = ModelPool("cpu", instances=1)
    cache = tempfile.mkdtemp()
    for f in filters:
        f.setup(SetupContext("cpu", pool, lambda u, o=None: localize_model(u, cache, 0, lambda: None, o)))
    calls = []
    more = MediaItem.more_frames

    def counted(self, request):
        calls.append(len(request.indices))
        return more(self, request)

    MediaItem.more_frames = counted
    item = MediaItem("x", clip, 0, frame_requests_of(filters), VideoConfig(decode_max_side=1280),
                     available_backends(("decord", "torchcodec", "pyav")))
    t = time.perf_counter()
    rows, seconds = {}, {}
    for f in filters:
        rows[f.name], seconds[f.name] = f.run(item, FilterContext("cpu", pool))
    wall = time.perf_counter() - t
    return {"seconds": wall, "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "decodes": len(calls), "frames": item.frames_decoded, "backend": item.decode_backend,
            "filter_s": seconds, "rows": rows}


def agree(now: dict, before: dict) -> dict[str, bool]:
    """Per filter, whether its row agrees with the baseline's: the classifiers' windows (``same_windows``), the
    frames of the cuts, the static windows' verdicts."""
    from tests.benchmarks.bench_classifier_windows import same_windows

    out = {name: same_windows(now[name], before[name]) for name in LAID}
    out["scene_cuts"] = [t["frame"] for t in now["scene_cuts"]["transitions"]] == \
        [t["frame"] for t in before["scene_cuts"]["transitions"]]
    out["static"] = [w["static"] for w in now["static"]["windows"]] == [w["static"] for w in before["static"]["windows"]]
    return out


def main() -> int:
    sys.path.insert(0, ROOT)
    from tests.benchmarks.baseline import classifier_sides, one_side

    args = classifier_sides(__doc__, 420.0, "1280x720", {"--grain": "grain over the shots, x264's veryfast preset "
                                                                     "(B-frames, CABAC): a decode that costs what a "
                                                                     "film's does, not a flat pattern's"})
    if one_side(args, measure):
        return 0
    from pipeline.media import synthetic
    from tests.benchmarks.baseline import classifier_runs

    shot_s = 7.3  # shots of several lengths: cuts that fall between samples and windows alike
    shots = tuple((SHOTS[k % len(SHOTS)], shot_s + (k % 3)) for k in range(int(args.seconds // (shot_s + 1))))
    clip = synthetic.shots_clip(os.path.join(tempfile.mkdtemp(), "long.mp4"), shots, size=args.size,
                                **({"grain": 12, "preset": "veryfast"} if args.grain else {}))
    now, before = classifier_runs(__file__, args, clip, list(LAID))
    sides = {"one pass (now)": now, f"{args.baseline} (two passes)": before}
    print(f"\nstatic and scene_cuts (4 a second), vfx (4-s windows every 2 s) and rov (every 4 s, reversed), "
          f"{args.frames} frames at {args.image_size}, on {sum(s for _, s in shots):g} s of {args.size} at 25 fps, "
          f"{len(shots)} shots{' with grain (veryfast)' if args.grain else ' (ultrafast)'} (CPU, a process per row)")
    names = ["static", "scene_cuts", *LAID]
    print(f"{'side':<26}{'seconds':>9}{'peak GiB':>10}{'decodes':>9}{'frames':>8}"
          + "".join(f"{n + ' s':>14}" for n in names) + "  backend")
    for name, s in sides.items():
        print(f"{name:<26}{s['seconds']:>9.1f}{s['peak_gib']:>10.2f}{s['decodes']:>9}{s['frames']:>8}"
              + "".join(f"{s['filter_s'][n]:>14.1f}" for n in names) + f"  {s['backend']}")
    same = agree(now["rows"], before["rows"])
    print("rows agree with the baseline's:", ", ".join(f"{n} {'yes' if ok else 'NO'}" for n, ok in same.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
