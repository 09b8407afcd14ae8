#!/usr/bin/env python
"""Decode-and-sample throughput, side by side on the same files and the same frame indices:
our stage (plan + decode once, decord backend), raw decord ``get_batch``, torchcodec, PyAV, and an OpenCV
seek-per-frame loop; the same clips remuxed to MPEG-TS, where only PyAV is trusted (decord and torchcodec return
other frames there), with its seeking decode against decoding from the start; then clips/s of the default
(weight-free) filter set through the whole job.

Targets: our stage >= 0.9x raw decord, >= 2x the OpenCV loop.
Usage: python tests/benchmarks/bench_decode.py [--clips 6] [--seconds 10] [--size 1280x720] [--repeats 3]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from pipeline.config import build_config, load_config, validate_config  # noqa: E402
from pipeline.filters import build_filters, frame_requests_of  # noqa: E402
from pipeline.media import synthetic  # noqa: E402
from pipeline.video.decoders import available_backends, decode_video  # noqa: E402
from pipeline.video.sampling import make_plan  # noqa: E402


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--size", default="1280x720")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cuda: also time torchcodec NVDEC decode")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import cv2
    import decord
    import torch
    from torchcodec.decoders import VideoDecoder

    torch.set_num_threads(1)
    work = tempfile.mkdtemp(prefix="ms-decode-")
    try:
        clips = [synthetic.lavfi_clip(os.path.join(work, f"c{i}.mp4"), f"testsrc2=size={args.size}:rate=25",
                                      args.seconds, extra=("-g", "50")) for i in range(args.clips)]
        cfg = load_config(os.path.join(ROOT, "configs", "default.yaml"))
        filters = build_filters(cfg.filters)
        from pipeline.video.stream import Stream, WindowStream

        # the item's decode: a long clip's streams are read by their own passes (MediaItem.streamed), not here
        requests = [r for r in frame_requests_of(filters) if not isinstance(r, (Stream, WindowStream))]
        backends = {b.name: b for b in available_backends(("decord", "torchcodec", "pyav"))}
        plans = {}
        for c in clips:
            vr = decord.VideoReader(c)
            plans[c] = make_plan(requests, len(vr), vr.get_avg_fps()).indices
        frames = sum(len(p) for p in plans.values())

        def ours(name="decord", device="cpu"):
            def run():
                for c in clips:  # each item's frames are dropped before the next, as in a consumer and the raw loops
                    decode_video(c, requests, [backends[name]], device=device)
            return run

        def raw_decord():
            for c in clips:
                decord.VideoReader(c, ctx=decord.cpu(0), num_threads=1).get_batch(plans[c]).asnumpy()

        def raw_decord_dlpack():  # the frames as a torch tensor without asnumpy's copy, as our stage takes them
            from decord.bridge import to_torch

            for c in clips:
                to_torch(decord.VideoReader(c, ctx=decord.cpu(0), num_threads=1).get_batch(plans[c]))

        def raw_torchcodec():
            for c in clips:
                VideoDecoder(c, seek_mode="exact", dimension_order="NHWC").get_frames_at(plans[c])

        def opencv_seek():
            for c in clips:
                cap = cv2.VideoCapture(c)
                for i in plans[c]:
                    cap.set(cv2.CAP_PROP_POS_FRAMES, i)
                    ok, img = cap.read()
                    assert ok
                    cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
                cap.release()

        rows = [("our stage (plan + decode once, decord)", best_of(ours("decord"), args.repeats)),
                ("raw decord get_batch", best_of(raw_decord, args.repeats)),
                ("raw decord get_batch, DLPack", best_of(raw_decord_dlpack, args.repeats)),
                ("our stage, torchcodec backend", best_of(ours("torchcodec"), args.repeats)),
                ("raw torchcodec get_frames_at", best_of(raw_torchcodec, args.repeats)),
                ("our stage, PyAV backend", best_of(ours("pyav"), args.repeats)),
                ("OpenCV seek-per-frame loop", best_of(opencv_seek, args.repeats))]
        if args.device.startswith("cuda"):
            rows.append(("our stage, torchcodec NVDEC (cuda)", best_of(ours("torchcodec", args.device), args.repeats)))

        # MPEG-TS: the same streams remuxed; the job sends these to PyAV
        ts = {}
        for c in clips:
            ts[c] = c[:-4] + ".ts"
            synthetic._ffmpeg(["-i", c, "-c", "copy", ts[c]])
        pyav = backends["pyav"]
        seeking = best_of(lambda: [decode_video(ts[c], requests, [pyav], random_access=False) for c in clips],
                          args.repeats)

        def from_the_start():
            for c in clips:
                m = pyav.meta(ts[c])
                pyav._decode_in_order(ts[c], plans[c], (m.width, m.height))

        in_order = best_of(from_the_start, args.repeats)

        # clips/s of the default filter set through the whole job (one process)
        corpus = os.path.join(work, "corpus")
        os.makedirs(corpus)
        import pyarrow as pa
        import pyarrow.parquet as pq

        for i, c in enumerate(clips):
            shutil.copy(c, os.path.join(corpus, f"{i}.mp4"))
        pq.write_table(pa.table({"video_id": [str(i) for i in range(len(clips))],
                                 "video_path": [f"{i}.mp4" for i in range(len(clips))]}),
                       os.path.join(work, "m.parquet"))
        from pipeline.config import to_dict
        from pipeline.distributed import DistContext
        from pipeline.runner import run_rank

        raw = to_dict(cfg)
        raw["input"]["manifest"] = os.path.join(work, "m.parquet")
        raw["storage"]["cache_dir"] = os.path.join(work, "cache")
        raw["storage"]["tiers"] = [{"name": "shared", "root": corpus}]
        raw["output"]["dir"] = os.path.join(work, "out")
        raw["runtime"]["progress"] = False
        raw["runtime"]["device"] = args.device if args.device.startswith("cuda") else "cpu"
        job_cfg = build_config(raw)
        validate_config(job_cfg)
        t = time.perf_counter()
        outcome = run_rank(job_cfg, DistContext(), "cpu" if not args.device.startswith("cuda") else args.device)
        job_s = time.perf_counter() - t
        assert outcome.summary["this_run"]["succeeded"] == len(clips), outcome.summary
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\ndecode benchmark: {args.clips} clips of {args.seconds:.0f}s {args.size} H.264, {frames} planned frames "
          f"({frames // args.clips} per clip for the default filters), best of {args.repeats}, {os.cpu_count()} cores")
    print(f"{'decoder':<42}{'seconds':>9}{'frames/s':>10}{'vs decord':>11}")
    base = rows[1][1]
    for label, secs in rows:
        print(f"{label:<42}{secs:>9.3f}{frames / secs:>10.1f}{base / secs:>10.2f}x")
    ours_s, dlpack_s, cv_s = rows[0][1], rows[2][1], rows[6][1]
    print(f"our stage / raw decord = {base / ours_s:.2f}x (target >= 0.9; {dlpack_s / ours_s:.2f}x raw decord without "
          f"asnumpy's copy); our stage / OpenCV = {cv_s / ours_s:.2f}x (target >= 2)")
    print(f"MPEG-TS, PyAV (keyframe every 2 s): our stage, seeking {seeking:.3f}s = {frames / seeking:.1f} frames/s; "
          f"decoding from the start {in_order:.3f}s = {frames / in_order:.1f} frames/s ({in_order / seeking:.2f}x)")
    print(f"default filter set end to end: {args.clips} clips in {job_s:.2f}s = {args.clips / job_s:.2f} clips/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
