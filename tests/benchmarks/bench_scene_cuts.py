#!/usr/bin/env python
"""Scene cuts placed at their frames, side by side in one run: the ``scene_cuts`` filter with
``frame_accurate`` off (each cut at the first 4-a-second sample after it) and on (the frames between the two samples
decoded again and compared step by step), per backend, against two peers that compare every frame: FFmpeg's
``scdet`` filter and PySceneDetect's ``ContentDetector`` (where installed: ``pip install scenedetect``).

The clips are built with known cut frames: shots of irregular length (0.12 s to 4 s; a few of 3 to 5 frames) from
lavfi sources with the hue turned per shot, every 4th the shot before it mirrored (a cut that keeps the colours),
720p H.264, once with the encoder's keyframes at the cuts (x264's
default) and once with a keyframe every 250 frames only (a second decode then seeks further). Per run: seconds for
the item (its decode included), frames decoded, cuts found, those at the true frame, and the mean and largest
distance in frames from the true cut of each cut found within half a second of one; and the item's seconds with
the five default signal filters, placing off and on. A clip over 5 minutes (``max_frames`` samples) is sampled at 4 a
second all through (``stream_long_clips``), by the scene cuts and the static filter in one pass; its rows marked
``spread`` are the ``max_frames`` samples spread over it instead (the behaviour before; the static filter's 240).

Where the static filter runs (alone, and with the others), its 2-s windows are scored against the clip's truth:
``still windows`` counts those wholly inside one shot of a still pattern that read static, of all such windows;
``wrong`` those with over half a second of a moving shot (testsrc, testsrc2) that read static.

Usage: python tests/benchmarks/bench_scene_cuts.py [--seconds 60] [--fps 25] [--size 1280x720]
       [--backends decord,torchcodec,pyav] [--keyframes both|cuts|250]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from pipeline.config import FilterSpec, VideoConfig  # noqa: E402
from pipeline.filters import build_filters, frame_requests_of  # noqa: E402
from pipeline.filters.base import FilterContext  # noqa: E402
from pipeline.filters.signal import SceneCutParams  # noqa: E402
from pipeline.media.item import MediaItem  # noqa: E402
from pipeline.video.decoders import available_backends  # noqa: E402

SIGNAL = ("black_borders", "static", "exposure", "sharpness")
"""The other default signal filters: the item's time with all five shows what placing the cuts adds to a job."""
SOURCES = ("testsrc2", "smptehdbars", "testsrc", "rgbtestsrc", "yuvtestsrc", "pal100bars")


def shots(seconds: float, fps: int, seed: int = 0) -> list[int]:
    """Frames per shot: irregular lengths, a few of 3 to 5 frames, adding up to ``seconds``."""
    rng, out, total = random.Random(seed), [], int(seconds * fps)
    while sum(out) < total:
        out.append(rng.randint(3, 5) if rng.random() < 0.15 else rng.randint(fps // 2, 4 * fps))
    out[-1] -= sum(out) - total
    return [n for n in out if n > 0]


def shot(k: int, fps: int, size: str) -> str:
    """The lavfi chain of shot ``k``: a source with its hue turned; every 4th shot is the one before it mirrored
    (the same colours: another view of the same scene)."""
    if k % 4 == 3:
        return shot(k - 1, fps, size) + ",hflip"
    return f"{SOURCES[k % len(SOURCES)]}=size={size}:rate={fps},hue=h={(k * 67) % 360}"


def make_clip(path: str, lengths: list[int], fps: int, cut_keyframes: bool, size: str = "1280x720") -> None:
    graph = ";".join(f"{shot(k, fps, size)},trim=end_frame={n},setpts=PTS-STARTPTS[v{k}]"
                     for k, n in enumerate(lengths))
    graph += ";" + "".join(f"[v{k}]" for k in range(len(lengths))) + f"concat=n={len(lengths)}:v=1:a=0[v]"
    keys = [] if cut_keyframes else ["-g", "250", "-sc_threshold", "0"]
    script = path + ".graph"  # a file: an hour's graph is longer than a command line may be
    with open(script, "w") as f:
        f.write(graph)
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-filter_complex_script", script, "-map",
                    "[v]", "-c:v", "libx264", "-preset", "veryfast", *keys, "-pix_fmt", "yuv420p", path], check=True)


def score(found: list[int], truth: list[int], fps: int) -> str:
    """Cuts found, at the true frame, and the mean / largest frames off of those within half a second of one."""
    off = [min(abs(f - t) for t in truth) for f in found]
    near = [o for o in off if o <= fps // 2]
    mean = sum(near) / len(near) if near else float("nan")
    return f"{len(found):>6}{sum(o == 0 for o in off):>7}{mean:>8.2f}{max(near, default=0):>6}"


def still_shot(k: int) -> bool:
    """Whether shot ``k`` holds a still picture (the bars and the plain test patterns; testsrc and testsrc2 move)."""
    return still_shot(k - 1) if k % 4 == 3 else SOURCES[k % len(SOURCES)] not in ("testsrc2", "testsrc")


def static_score(windows: list[dict], lengths: list[int], fps: int) -> str:
    """The static filter's windows against the clip's truth: of the windows wholly inside one still shot, how many
    read static; and how many of those with over half a second of a moving shot in them read static (wrong). The
    others (a cut between two still shots, a moving edge under half a second) are not scored."""
    bounds = [sum(lengths[:k]) / fps for k in range(len(lengths) + 1)]
    still, found, wrong = 0, 0, 0
    for w in windows:
        a, b = w["start_s"], w["end_s"]
        # a window holds the samples at both its ends: one ending where a shot ends holds the next shot's first frame
        inside = [k for k in range(len(lengths)) if bounds[k] <= a + 1e-6 and b <= bounds[k + 1] - 1 / fps + 1e-6]
        moving = sum(max(0.0, min(b, bounds[k + 1]) - max(a, bounds[k])) for k in range(len(lengths))
                     if not still_shot(k))
        if inside and still_shot(inside[0]):
            still += 1
            found += w["static"]
        elif moving > 0.5:
            wrong += w["static"]
    return f"{f'{found}/{still}':>15}{wrong:>6}"


def ours(path: str, backend: str, frame_accurate: bool | None, others: tuple[str, ...] = (),
         stream: bool = True) -> tuple[float, int, list[int] | None, list[dict] | None]:
    """The item's seconds and frames decoded with the scene-cut filter (None: without it) and ``others``, its cut
    frames and the static filter's windows (where they ran). ``stream`` false: the behaviour before, samples
    spread over a long clip (the static filter's 240, its default then)."""
    spread = {"stream_long_clips": stream} | ({} if stream else {"max_frames": 240})
    specs = tuple(FilterSpec(n, n, True, spread if n == "static" else {}) for n in others)
    if frame_accurate is not None:
        specs += (FilterSpec("scene_cuts", "scene_cuts", True,
                             {"frame_accurate": frame_accurate, "stream_long_clips": stream}),)
    filters = build_filters(specs)
    t = time.perf_counter()
    item = MediaItem("x", path, 0, frame_requests_of(filters), VideoConfig(backends=(backend,)),
                     available_backends((backend,)))
    rows = {f.name: f.apply(item, FilterContext("cpu", None)) for f in filters}
    cuts = [c["frame"] for c in rows["scene_cuts"]["transitions"]] if "scene_cuts" in rows else None
    windows = rows["static"]["windows"] if "static" in rows else None
    return time.perf_counter() - t, item.frames_decoded, cuts, windows


def scdet(path: str, fps: int) -> tuple[float, list[int]]:
    t = time.perf_counter()
    err = subprocess.run(["ffmpeg", "-hide_banner", "-nostats", "-i", path, "-vf", "scdet", "-an", "-f", "null", "-"],
                         capture_output=True, text=True, check=True).stderr
    return time.perf_counter() - t, [round(float(s) * fps) for s in re.findall(r"lavfi\.scd\.time: ([\d.]+)", err)]


def pyscenedetect(path: str) -> tuple[float, list[int]] | None:
    try:
        from scenedetect import ContentDetector, detect
    except ImportError:
        return None
    t = time.perf_counter()
    scenes = detect(path, ContentDetector())
    return time.perf_counter() - t, [s.frame_num for s, _ in scenes[1:]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--size", default="1280x720", help="WxH (a long clip: 640x360 keeps the encode short)")
    parser.add_argument("--backends", default="decord,torchcodec,pyav", help="ours with each of these, in order")
    parser.add_argument("--keyframes", choices=("both", "cuts", "250"), default="both",
                        help="the clip with keyframes at its cuts, every 250 frames, or both")
    args = parser.parse_args()
    lengths = shots(args.seconds, args.fps)
    truth = [sum(lengths[:k]) for k in range(1, len(lengths))]
    print(f"{len(truth)} cuts in {args.seconds:g} s at {args.fps} fps, {sum(n <= 5 for n in lengths)} shots of 3-5 "
          f"frames, {len(lengths) // 4} cuts to a mirrored copy; {args.size} H.264\n")
    print(f"{'keyframes':<11}{'run':<38}{'seconds':>8}{'frames':>8}{'found':>6}{'exact':>7}{'mean':>8}{'max':>6}"
          f"{'still windows':>15}{'wrong':>6}")
    backends = [b.name for b in available_backends(tuple(args.backends.split(",")))]
    long_clip = args.seconds * 4 > SceneCutParams().max_frames  # sampled all through, or spread (before)
    runs = [(False, True), (True, True)] + ([(False, False), (True, False)] if long_clip else [])
    none = f"{'':>27}"

    def line(label: str, run: str, secs: float, frames: int, cuts: list[int] | None, windows: list[dict] | None):
        found = score(cuts, truth, args.fps) if cuts is not None else none
        still = static_score(windows, lengths, args.fps) if windows is not None else ""
        print(f"{label:<11}{run:<38}{secs:>8.2f}{frames:>8}{found}{still}")

    with tempfile.TemporaryDirectory() as d:
        for cut_keys in {"both": (True, False), "cuts": (True,), "250": (False,)}[args.keyframes]:
            path = os.path.join(d, f"shots-{cut_keys}.mp4")
            make_clip(path, lengths, args.fps, cut_keys, args.size)
            label = "at cuts" if cut_keys else "every 250"
            for backend in backends:
                for on, stream in runs:
                    run = f"ours {backend}, {'placed' if on else 'samples'}{'' if stream else ', spread'}"
                    line(label, run, *ours(path, backend, on, stream=stream))
            for stream in (True, False) if long_clip else (True,):
                line(label, f"static alone {backends[0]}{'' if stream else ', spread'}",
                     *ours(path, backends[0], None, ("static",), stream))
            for on, stream in runs:
                run = f"five filters {backends[0]}, {'placed' if on else 'samples'}{'' if stream else ', spread'}"
                line(label, run, *ours(path, backends[0], on, SIGNAL, stream))
            secs, found = scdet(path, args.fps)
            print(f"{label:<11}{'ffmpeg scdet':<38}{secs:>8.2f}{sum(lengths):>8}"
                  f"{score(found, truth, args.fps)}")
            peer = pyscenedetect(path)
            if peer is not None:
                print(f"{label:<11}{'PySceneDetect content':<38}{peer[0]:>8.2f}{sum(lengths):>8}"
                      f"{score(peer[1], truth, args.fps)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
