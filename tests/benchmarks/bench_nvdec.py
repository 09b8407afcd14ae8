#!/usr/bin/env python
"""NVDEC against CPU decode, on the same clips and frames: our decode stage (``decode_video``) with PyAV on the CPU
and with NVDEC through PyAV's FFmpeg (``video.decode_device: cuda``; in torch's CUDA context as the job does, and
in one of FFmpeg's own: ``NVDEC own``), beside decord on the CPU, each at the source size and downscaled; wall
seconds, the process's CPU seconds (every thread), frames per second and frames per CPU-second. The CPU is what
NVDEC saves: eight ranks share a node's cores.

Needs a GPU for the NVDEC rows (without one they fall back to the CPU decode, and the table says so).
Usage: python tests/benchmarks/bench_nvdec.py [--media DIR] [--frames 0] [--max-side 256] [--repeats 2]
(without --media: 1080p H.264 and HEVC, 20 s each, and 8 s of 4K H.264, made with the ffmpeg CLI)
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

from pipeline.errors import DependencyError  # noqa: E402
from pipeline.video.decoders import available_backends, decode_video  # noqa: E402
from pipeline.video.sampling import Uniform  # noqa: E402


def make_clips(d: str) -> list[str]:
    from pipeline.media import synthetic

    src = "testsrc2=size={}:rate=25"
    return [synthetic.lavfi_clip(os.path.join(d, "h264_1080p.mp4"), src.format("1920x1080"), 20.0,
                                 codec=("-c:v", "libx264", "-preset", "veryfast", "-crf", "30")),
            synthetic.lavfi_clip(os.path.join(d, "hevc_1080p.mp4"), src.format("1920x1080"), 20.0,
                                 codec=("-c:v", "libx265", "-preset", "veryfast", "-crf", "32", "-tag:v", "hvc1")),
            synthetic.lavfi_clip(os.path.join(d, "h264_2160p.mp4"), src.format("3840x2160"), 8.0,
                                 codec=("-c:v", "libx264", "-preset", "veryfast", "-crf", "32"))]


def installed(name: str) -> list:
    """The backend, or nothing where it is not installed here."""
    try:
        return available_backends((name,))
    except DependencyError:
        return []


def own_context(device: str):
    """NVDEC in a CUDA context of FFmpeg's own (made per file, blocking sync) instead of torch's primary context
    (``_nvdec_accel``: ``current_ctx``): the row that tells whether the extra CPU time of NVDEC at full size is
    spent waiting in torch's context (spin-wait scheduling)."""
    from av.codec.hwaccel import HWAccel

    index = int(device.split(":")[1]) if ":" in device else 0
    return HWAccel("cuda", device=str(index), allow_software_fallback=False)


def measure(path: str, backend, device: str, frames: int, max_side: int | None, repeats: int,
            accel=None) -> dict:
    from unittest import mock

    from pipeline.video import decoders

    best = None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        with mock.patch.object(decoders, "_nvdec_accel", accel or decoders._nvdec_accel):
            v = decode_video(path, [Uniform(frames)], [backend], device=device, max_side=max_side,
                             max_frames=1 << 20, max_bytes=64 << 30)
        if v.frames.is_cuda:
            torch.cuda.synchronize()
        run = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu, "n": v.frames.shape[0],
               "label": v.backend, "shape": tuple(v.frames.shape[1:3])}
        best = run if best is None or run["wall"] < best["wall"] else best
        del v
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--media", help="a folder of clips (default: made with the ffmpeg CLI)")
    parser.add_argument("--frames", type=int, default=0, help="frames per clip, spread evenly (0: every frame)")
    parser.add_argument("--max-side", type=int, default=256, help="the downscaled rows' long side")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    clips = ([os.path.join(args.media, n) for n in sorted(os.listdir(args.media))] if args.media
             else make_clips(tempfile.mkdtemp()))
    gpu = "cuda:0" if torch.cuda.is_available() else None
    pyav = available_backends(("pyav",))[0]
    modes = [("PyAV, CPU", pyav, "cpu", None)]
    if gpu:
        modes += [("PyAV, NVDEC", pyav, gpu, None), ("PyAV, NVDEC own", pyav, gpu, own_context)]
    modes += [(f"{b.name}, CPU", b, "cpu", None) for b in installed("decord")]
    if gpu:  # a CUDA build of torchcodec (PyTorch's index) decodes with NVDEC; PyPI's does not
        modes += [(f"{b.name}, NVDEC", b, gpu, None) for b in installed("torchcodec")]
    print(f"\n{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
          f"GPU {torch.cuda.get_device_name(0) if gpu else 'none'}; best of {args.repeats}")
    print(f"{'clip':<18}{'decoded at':<12}{'mode':<18}{'backend':<16}{'frames':>7}{'wall s':>9}{'CPU s':>8}"
          f"{'frames/s':>10}{'fr/CPU-s':>10}")
    for path in clips:
        n = pyav.meta(path).num_frames
        frames = args.frames or n
        for max_side in (None, args.max_side):
            for name, backend, device, accel in modes:
                try:
                    r = measure(path, backend, device, frames, max_side, args.repeats, accel)
                except Exception as e:  # noqa: BLE001 - a backend that cannot decode this clip: say so, go on
                    print(f"{os.path.basename(path):<18}{'':<12}{name:<18}failed: {type(e).__name__}: {e}"[:160])
                    continue
                at = f"{r['shape'][1]}x{r['shape'][0]}"
                print(f"{os.path.basename(path):<18}{at:<12}{name:<18}{r['label']:<16}{r['n']:>7}{r['wall']:>9.2f}"
                      f"{r['cpu']:>8.2f}{r['n'] / r['wall']:>10.0f}{r['n'] / max(r['cpu'], 1e-6):>10.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
