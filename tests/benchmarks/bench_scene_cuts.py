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
second all through by the filter (``stream_long_clips``); its rows marked ``spread`` are the ``max_frames`` samples
spread over it instead (the behaviour before).

Usage: python tests/benchmarks/bench_scene_cuts.py [--seconds 60] [--fps 25] [--size 1280x720]
       [--backends decord,torchcodec,pyav]
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


def ours(path: str, backend: str, frame_accurate: bool, others: tuple[str, ...] = (),
         stream: bool = True) -> tuple[float, int, list[int]]:
    """The item's seconds and frames decoded with the scene-cut filter (and ``others``), and its cut frames."""
    params = {"frame_accurate": frame_accurate, "stream_long_clips": stream}
    filters = build_filters(tuple(FilterSpec(n, n) for n in others)
                            + (FilterSpec("scene_cuts", "scene_cuts", True, params),))
    t = time.perf_counter()
    item = MediaItem("x", path, 0, frame_requests_of(filters), VideoConfig(backends=(backend,)),
                     available_backends((backend,)))
    got = [f.apply(item, FilterContext("cpu", None)) for f in filters][-1]
    return time.perf_counter() - t, item.frames_decoded, [c["frame"] for c in got["transitions"]]


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
    args = parser.parse_args()
    lengths = shots(args.seconds, args.fps)
    truth = [sum(lengths[:k]) for k in range(1, len(lengths))]
    print(f"{len(truth)} cuts in {args.seconds:g} s at {args.fps} fps, {sum(n <= 5 for n in lengths)} shots of 3-5 "
          f"frames, {len(lengths) // 4} cuts to a mirrored copy; {args.size} H.264\n")
    print(f"{'keyframes':<11}{'run':<38}{'seconds':>8}{'frames':>8}{'found':>6}{'exact':>7}{'mean':>8}{'max':>6}")
    backends = [b.name for b in available_backends(tuple(args.backends.split(",")))]
    long_clip = args.seconds * 4 > SceneCutParams().max_frames  # sampled all through, or spread (before)
    runs = [(False, True), (True, True)] + ([(False, False), (True, False)] if long_clip else [])
    with tempfile.TemporaryDirectory() as d:
        for cut_keys in (True, False):
            path = os.path.join(d, f"shots-{cut_keys}.mp4")
            make_clip(path, lengths, args.fps, cut_keys, args.size)
            label = "at cuts" if cut_keys else "every 250"
            for backend in backends:
                for on, stream in runs:
                    secs, frames, found = ours(path, backend, on, stream=stream)
                    run = f"ours {backend}, {'placed' if on else 'samples'}{'' if stream else ', spread'}"
                    print(f"{label:<11}{run:<38}{secs:>8.2f}{frames:>8}{score(found, truth, args.fps)}")
            for on, stream in runs:
                secs, frames, found = ours(path, backends[0], on, SIGNAL, stream)
                run = f"five filters {backends[0]}, {'placed' if on else 'samples'}{'' if stream else ', spread'}"
                print(f"{label:<11}{run:<38}{secs:>8.2f}{frames:>8}{score(found, truth, args.fps)}")
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
