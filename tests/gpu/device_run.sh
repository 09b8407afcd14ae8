#!/bin/bash
# The last device call: join the parts and install onnxruntime-gpu, collect the torch CUDA tests that
# device_bg.sh ran, then the ORT CUDA tests and the benchmarks, each capped so that the whole ends inside the
# call's 600 s. Logs go to $OUT (at most 8 files come back). STEPS="ort_tests bench_nvdec" runs only those steps.
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
BUDGET=${BUDGET:-540}
T0=$SECONDS
export PYTHONUNBUFFERED=1 MEDIASIEVE_GPU_MEDIA=$PWD/.gpu_media

step() {  # step NAME CAP command...: run with the smaller of CAP and what is left, log to $OUT/NAME.log
  local name=$1 cap=$2 left=$((BUDGET - (SECONDS - T0)))
  shift 2
  case " ${STEPS:-all} " in *" all "*|*" $name "*) ;; *) echo "== $name: not in STEPS"; return;; esac
  [ "$left" -lt 15 ] && { echo "== $name: skipped, $left s left"; return; }
  [ "$cap" -gt "$left" ] && cap=$left
  echo "== $name (cap $cap s, at $((SECONDS - T0)) s)"
  timeout "$cap" "$@" > "$OUT/$name.log" 2>&1
  echo "   exit $?"
  tail -n 25 "$OUT/$name.log"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 tests/gpu/device_kit.py install --target /tmp/site; } 2>&1 | tail -3
export PYTHONPATH=/tmp/site
python3 -c "import torch, onnxruntime as o; print('torch', torch.__version__, 'ort', o.__version__, o.get_available_providers())"
for _ in $(seq 150); do [ -e /root/ms_bg.done ] && break; sleep 1; done
cp /root/ms_bg.log "$OUT/cuda_paths.log" 2>/dev/null
echo "== test_cuda_paths (run in the background): $([ -e /root/ms_bg.done ] && echo done || echo NOT DONE)"
grep -E "^(PASSED|FAILED|ERROR|SKIPPED)|passed|failed|pytest exit|^E " /root/ms_bg.log | head -40
step ort_tests 200 python3 -m pytest -m gpu tests/gpu/test_ort_cuda.py -ra --tb=short -p no:cacheprovider --durations=5
step bench_nvdec 150 python3 tests/benchmarks/bench_nvdec.py --media .gpu_bench/nvdec
step bench_onnx 110 python3 tests/benchmarks/bench_onnx.py --repeats 5
step bench_vad 110 python3 tests/benchmarks/bench_vad.py --device cuda --wav .gpu_media/long.wav --minutes 10 --repeat 3
step bench_signal 60 python3 tests/benchmarks/bench_signal_filters.py --media .gpu_bench/signal --repeats 3
step bench_tonemap 40 python3 tests/benchmarks/bench_tonemap.py --clip .gpu_bench/pq.mp4
echo "== total $((SECONDS - T0)) s"
