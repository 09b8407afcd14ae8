#!/usr/bin/env bash
# Install everything mediasieve needs on a fresh Debian/Ubuntu machine with Python 3.10+ (run as root or with sudo).
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null; then SUDO="sudo"; fi
if command -v apt-get >/dev/null; then
  $SUDO apt-get update -qq
  # system FFmpeg (torchcodec, the ffmpeg CLI), espeak-ng (real speech in generated media), a font for the
  # burnt-in text of generated clips (ffmpeg's drawtext)
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq ffmpeg espeak-ng fonts-dejavu-core fontconfig >/dev/null
  # Java 17+ for Spark, which the tests read the output with as users do (pyspark, the dev extra)
  if ! java -version 2>&1 | grep -qE 'version "(1[7-9]|[2-9][0-9])'; then
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq openjdk-17-jre-headless >/dev/null \
      || DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq default-jre-headless >/dev/null
  fi
fi
PY=${PYTHON:-python3}
$PY -m pip install -q --upgrade pip
# torch first, pinned to the build the other wheels are made for (a CUDA build that also runs on CPU)
$PY -m pip install -q torch==2.14.1 torchvision==0.29.1
$PY -m pip install -q -e '.[dev]'
$PY - <<'PY'
import shutil, subprocess
import av, pyarrow, pyspark, s3fs, torch, onnxruntime
java = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr.splitlines()[0] if shutil.which("java") else None
assert java, "no java on PATH: Spark (the readers' tests) needs Java 17 or later"
print(f"mediasieve set up: torch {torch.__version__} (cuda={torch.cuda.is_available()}), pyav {av.__version__}, "
      f"pyarrow {pyarrow.__version__}, onnxruntime {onnxruntime.__version__} {onnxruntime.get_available_providers()}, "
      f"pyspark {pyspark.__version__} on {java}")
PY
