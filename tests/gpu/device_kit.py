#!/usr/bin/env python
"""Stage what the GPU tests and benchmarks need on a lent GPU machine that has torch but none of our media and
inference packages, and no network (the development workplace's ``device`` tool: its transfers are capped at
64 MiB a call, and files it carries stay on the machine between calls while it is held).

Here (with pip and network):

    python tests/gpu/device_kit.py prepare          # wheels for the device's Python, test and bench media, ORT

prepare writes, all git-ignored: ``.whl/`` (av, silero-vad, ultralytics: about 49 MB) and ``.gpu_media/`` (the
tests' clips and a long speech recording, made with our own generators), which travel in the first call; and
``.ort1/`` ... ``.ortN/``, one stream cut into parts of at most 61 MiB (``PART``): a tar of the benchmarks' media
(``.gpu_bench/``), the decord wheel and the onnxruntime-gpu wheel's contents as tar.xz (203 MB instead of 256: one
call fewer). It prints the calls to make, back to back so that the machine stays held (it goes back after 30 s
idle). The first call starts ``tests/gpu/device_bg.sh`` detached: it installs the small wheels and runs the torch
CUDA tests (``test_cuda_paths.py``) while the parts travel; the last runs ``tests/gpu/device_run.sh``, which joins
the parts and installs ORT (``python3 tests/gpu/device_kit.py install``), then the ORT tests and the benchmarks.

onnx, protobuf and ml_dtypes are not staged: the device image has them (onnx 1.23.1). Not covered: NVDEC through
torchcodec, which needs FFmpeg's shared libraries and a torchcodec built for the machine's torch (2.11 there);
TensorRT, whose libraries are not on the machine (the TensorRT test then sees the fallback to CUDA).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PART = 61 << 20  # with the tree (about 1.5 MB) under a call's 64 MiB
ORT = "onnxruntime-gpu==1.31.1"
SMALL = ["av==18.1.0", "silero-vad==6.2.3", "ultralytics==8.4.190", "ultralytics-thop", "ultralytics-platform"]
LATER = ["decord==0.6.0"]  # in the stream of parts: the first call's 64 MiB hold the rest
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux2010_x86_64", "manylinux1_x86_64"]


def download(spec: str, dest: str, python: str) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           python, "--implementation", "cp", "-d", dest, spec]
    for p in PLATFORMS:
        cmd[5:5] = ["--platform", p]
    subprocess.run(cmd, check=True)


def ort_archive(wheel: str) -> str:
    """The wheel's files as ``ort.tar.xz`` beside it (xz takes 256 MB to 203; two minutes on two cores, once)."""
    out = os.path.join(os.path.dirname(wheel), "ort.tar.xz")
    if not os.path.exists(out):
        subprocess.run(f"set -e; d=$(mktemp -d); cd $d; unzip -q {wheel}; tar cf - . | xz -9e -T0 > {out}.tmp; "
                       f"mv {out}.tmp {out}; rm -rf $d", shell=True, check=True)
    return out


def split(path: str, root: str) -> list[str]:
    """Cut ``path`` into ``<root>/.ort<k>/part`` files of at most ``PART`` bytes (the parts of an earlier stream
    removed first); returns the folders."""
    for old in glob.glob(os.path.join(root, ".ort[0-9]*")):  # an earlier, longer stream's parts
        shutil.rmtree(old)
    folders = []
    with open(path, "rb") as f:
        k = 1
        while chunk := f.read(PART):
            folder = os.path.join(root, f".ort{k}")
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, "part"), "wb") as out:
                out.write(chunk)
            folders.append(folder)
            k += 1
    return folders


def join(root: str) -> str:
    """The stream reassembled from the parts, in order, as ``build/stream.tar``; returns its path."""
    folders = sorted(glob.glob(os.path.join(root, ".ort[0-9]*")), key=lambda p: int(p.rsplit("ort", 1)[1]))
    if not folders:
        raise SystemExit("no .ort<k>/ parts here: carry each of them first")
    out = os.path.join(root, "build", "stream.tar")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "wb") as f:
        for folder in folders:
            with open(os.path.join(folder, "part"), "rb") as part:
                f.write(part.read())
    return out


def make_media(dest: str) -> None:
    sys.path.insert(0, ROOT)
    from pipeline.media import synthetic

    os.makedirs(dest, exist_ok=True)
    synthetic.motion_clip(os.path.join(dest, "motion.mp4"), seconds=2.0)
    synthetic.motion_clip(os.path.join(dest, "motion720.mp4"), seconds=4.0, size="1280x720")
    synthetic.still_clip(os.path.join(dest, "still.mp4"), seconds=2.0)
    synthetic.long_speech_wav(os.path.join(dest, "long.wav"), repeats=2)
    gpu_clips(dest)


def bench_media(dest: str) -> None:
    """What the benchmarks would make with the ffmpeg CLI, which the device lacks: two of bench_signal_filters'
    720p clips (its blur-filled one is 20 MB), bench_tonemap's PQ clip and bench_nvdec's clips."""
    sys.path.insert(0, ROOT)
    from tests.benchmarks import bench_nvdec, bench_signal_filters, bench_tonemap

    for sub in ("signal", "nvdec"):
        os.makedirs(os.path.join(dest, sub), exist_ok=True)
    bench_signal_filters.make_clips(os.path.join(dest, "signal"), blur_fill=False)
    bench_tonemap.make_clip(dest)
    bench_nvdec.make_clips(os.path.join(dest, "nvdec"))


def gpu_clips(dest: str) -> dict[str, str]:
    """The clips ``tests/gpu/test_cuda_paths.py`` runs the signal filters and the decoders on, made in ``dest``."""
    from pipeline.media import synthetic

    cut = synthetic.two_scene_clip(os.path.join(dest, "cut.mp4"))
    return {"letterbox": synthetic.letterboxed_clip(os.path.join(dest, "letterbox.mp4"),
                                                    subtitle="Subtitles on the bar"),
            "cut": cut,
            "rotated": synthetic.rotated_copy(cut, os.path.join(dest, "rotated.mp4"), 90),  # a phone held sideways
            "blurfill": synthetic.blur_filled_clip(os.path.join(dest, "blurfill.mp4"), seconds=1.0)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["prepare", "install"])
    parser.add_argument("--python", default="3.12", help="the device's Python version (prepare)")
    parser.add_argument("--target", default="/tmp/site", help="install into this folder (install)")
    parser.add_argument("--small", action="store_true", help="install: only the first call's wheels (.whl/)")
    args = parser.parse_args(argv)
    whl = os.path.join(ROOT, ".whl")
    if args.step == "prepare":
        build = os.path.join(ROOT, "build", "gpu")
        os.makedirs(whl, exist_ok=True)
        for spec in SMALL:
            download(spec, whl, args.python)
        for spec in [ORT, *LATER]:
            download(spec, build, args.python)
        make_media(os.path.join(ROOT, ".gpu_media"))
        bench = os.path.join(ROOT, ".gpu_bench")
        bench_media(bench)
        stream = os.path.join(build, "stream.tar")
        with tarfile.open(stream, "w") as tar:
            tar.add(bench, ".gpu_bench")
            for w in glob.glob(os.path.join(build, "decord-*.whl")):
                tar.add(w, os.path.join(".whl2", os.path.basename(w)))
            tar.add(ort_archive(glob.glob(os.path.join(build, "onnxruntime_gpu-*.whl"))[0]), "ort.tar.xz")
        names = [os.path.basename(f) for f in split(stream, ROOT)]
        print("device calls, back to back (each within 30 s of the last's end):")
        print("  run(carry=['.whl', '.gpu_media'], command='setsid nohup bash tests/gpu/device_bg.sh "
              ">/dev/null 2>&1 </dev/null & sleep 2; nvidia-smi -L')")
        for name in names[:-1]:
            print(f"  run(carry=['{name}'], command='ls -la {name}')")
        print(f"  run(carry=['{names[-1]}'], command='bash tests/gpu/device_run.sh', timeout_s=600)")
        return 0
    site = args.target
    wheels = sorted(glob.glob(os.path.join(whl, "*.whl")))
    if not args.small:
        with tarfile.open(join(ROOT)) as tar:
            tar.extractall(ROOT, filter="data")
        with tarfile.open(os.path.join(ROOT, "ort.tar.xz")) as tar:
            tar.extractall(site, filter="data")
        wheels = sorted(glob.glob(os.path.join(ROOT, ".whl2", "*.whl")))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", site, *wheels], check=True)
    print(f"installed {len(wheels)} wheels{'' if args.small else ' and onnxruntime-gpu'} into {site}; "
          f"export PYTHONPATH={site}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
