#!/usr/bin/env python
"""Stage what the GPU tests and benchmarks need on a lent GPU machine that has torch but none of our media and
inference packages, and no network (the development workplace's ``device`` tool: its transfers are capped at
64 MiB a call, and files it carries stay on the machine between calls while it is held).

Here (with pip and network):

    python tests/gpu/device_kit.py prepare          # wheels for the device's Python, test media, ORT in parts

prepare writes ``.whl/`` (small wheels), ``.gpu_media/`` (clips and a long speech recording made with our own
generators) and ``.ort1/`` ... ``.ortN/`` (the 250 MB onnxruntime-gpu wheel cut into parts of at most 56 MiB),
all git-ignored, and prints the calls to make: one call per ORT part and one for ``.whl/`` (about 60 MB), back to
back so that the machine stays held, then the install and the tests with the media. There:

    python3 tests/gpu/device_kit.py install         # joins the parts, installs every wheel into /tmp/site

and ``export PYTHONPATH=/tmp/site``. Not covered: NVDEC through torchcodec, which needs FFmpeg's shared
libraries and a torchcodec built for the machine's torch; TensorRT, whose libraries are not on the machine.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PART = 56 << 20
ORT = "onnxruntime-gpu==1.31.1"
SMALL = ["av==18.1.0", "decord==0.6.0", "silero-vad==6.2.3", "ultralytics==8.4.190", "ultralytics-thop",
         "ultralytics-platform",
         "onnx==1.23.2", "protobuf", "ml_dtypes"]  # the ONNX exports and the out-of-memory model of tests/gpu
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux2010_x86_64", "manylinux1_x86_64"]


def download(spec: str, dest: str, python: str) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           python, "--implementation", "cp", "-d", dest, spec]
    for p in PLATFORMS:
        cmd[5:5] = ["--platform", p]
    subprocess.run(cmd, check=True)


def split(path: str, root: str) -> list[str]:
    """Cut ``path`` into ``<root>/.ort<k>/part`` files of at most ``PART`` bytes; returns the folders."""
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
    with open(os.path.join(root, ".ort1", "name"), "w") as f:
        f.write(os.path.basename(path))
    return folders


def join(root: str) -> str:
    """Reassemble the wheel from the parts (in order) into ``.whl/``; returns its path."""
    folders = sorted(glob.glob(os.path.join(root, ".ort[0-9]*")), key=lambda p: int(p.rsplit("ort", 1)[1]))
    if not folders:
        raise SystemExit("no .ort<k>/ parts here: carry each of them first")
    name = open(os.path.join(root, ".ort1", "name")).read().strip()
    out = os.path.join(root, ".whl", name)
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


def gpu_clips(dest: str) -> dict[str, str]:
    """The clips ``tests/gpu/test_cuda_paths.py`` runs the signal filters and the decoders on, made in ``dest``."""
    from pipeline.media import synthetic

    return {"letterbox": synthetic.letterboxed_clip(os.path.join(dest, "letterbox.mp4"),
                                                    subtitle="Subtitles on the bar"),
            "cut": synthetic.two_scene_clip(os.path.join(dest, "cut.mp4")),
            "blurfill": synthetic.blur_filled_clip(os.path.join(dest, "blurfill.mp4"), seconds=1.0)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["prepare", "install"])
    parser.add_argument("--python", default="3.12", help="the device's Python version (prepare)")
    parser.add_argument("--target", default="/tmp/site", help="install into this folder (install)")
    args = parser.parse_args(argv)
    whl = os.path.join(ROOT, ".whl")
    if args.step == "prepare":
        os.makedirs(whl, exist_ok=True)
        for spec in SMALL:
            download(spec, whl, args.python)
        big = os.path.join(ROOT, "build", "ort")
        download(ORT, big, args.python)
        folders = split(glob.glob(os.path.join(big, "onnxruntime_gpu-*.whl"))[0], ROOT)
        make_media(os.path.join(ROOT, ".gpu_media"))
        names = [os.path.basename(f) for f in folders]
        print("device calls, back to back (each within the machine's idle limit of the last):")
        for name in names + [".whl"]:
            print(f"  run(carry=['{name}'], command='ls -la {name}')")
        print("  run(carry=['.gpu_media'], command='python3 tests/gpu/device_kit.py install && "
              "PYTHONPATH=/tmp/site MEDIASIEVE_GPU_MEDIA=$PWD/.gpu_media python3 -m pytest -m gpu tests/gpu -ra')")
        return 0
    wheel = join(ROOT)
    wheels = sorted(glob.glob(os.path.join(whl, "*.whl")))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", args.target, *wheels], check=True)
    print(f"installed {len(wheels)} wheels (with {os.path.basename(wheel)}) into {args.target}; "
          f"export PYTHONPATH={args.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
