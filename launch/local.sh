#!/usr/bin/env bash
# One node: one rank per GPU, or 2 CPU processes when there is none.
# Usage: launch/local.sh --config configs/X.yaml [section.key=value ...]     (NPROC=N to choose the rank count)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
NPROC=${NPROC:-$($PY -c "import torch; print(torch.cuda.device_count() or 2)")}
# how long torchrun gives its workers after a SIGTERM or Ctrl-C before it kills them (its default, 30 s, can cut
# the clean stop short: keep it above runtime.shutdown_grace_s plus a commit)
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}
exec $PY -m torch.distributed.run --standalone --nproc_per_node="$NPROC" jobs/run.py "$@"
