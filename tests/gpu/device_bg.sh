#!/bin/bash
# Started detached (setsid) by the first device call: installs the small wheels and runs the torch CUDA tests
# while the other calls carry the onnxruntime-gpu parts. It runs from a copy of the tree, which the later calls'
# transfers cannot touch, and leaves its log and a done mark in /root for tests/gpu/device_run.sh.
rm -rf /root/ms_tree /root/ms_bg.done
python3 tests/gpu/device_kit.py install --small --target /tmp/site > /root/ms_install.log 2>&1
mkdir -p /root/ms_tree && cp -r pipeline models jobs tests configs pyproject.toml .gpu_media /root/ms_tree/ 2>/dev/null
cd /root/ms_tree || exit 1
{
  date +%T
  cat /root/ms_install.log
  PYTHONPATH=/tmp/site MEDIASIEVE_GPU_MEDIA=$PWD/.gpu_media PYTHONUNBUFFERED=1 timeout 420 \
    python3 -m pytest -m gpu tests/gpu/test_cuda_paths.py -ra --tb=short -p no:cacheprovider --durations=8
  echo "pytest exit $?"
  date +%T
} > /root/ms_bg.log 2>&1
touch /root/ms_bg.done
