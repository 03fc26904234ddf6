#!/usr/bin/env bash
# On a GPU machine, with gpu-carry/ from scripts/gpu-prepare.sh: the tests that need CUDA, then the pack
# benchmark (member-images/s for K = 1, 8, 32, 64 beside the solo path, over 2 epochs and in the second alone; the best K).
# Under 3 minutes on one H100. `scripts/gpu-check.sh --study` also times `bench.run --trials 50` (full CIFAR-10,
# default space, --pack auto) and prints its occupancy, distinct shapes, members per launch and best trial.
# A failing step does not stop the later ones (a device lease is short: one run should report everything); each has
# a time limit, and the script exits 1 naming the steps that failed.
set -euo pipefail
cd "$(dirname "$0")/.."
# CUBLAS_WORKSPACE_CONFIG before CUDA starts: cuBLAS is deterministic only with it (the tests enable strict mode)
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/bench-site:$PWD" CUBLAS_WORKSPACE_CONFIG=:4096:8
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/bench-site gpu-carry/wheels/*.whl
[ -d /tmp/cifar10-jpeg/train ] || python3 gpu-carry/data/unpack.py /tmp/cifar10-jpeg >/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"

failed=()
step() {  # step NAME SECONDS COMMAND...: run it under a time limit, note a failure, go on
  local name=$1 limit=$2 started=$SECONDS rc=0
  shift 2
  echo "== $name"
  timeout "$limit" "$@" || rc=$?
  if [ "$rc" -ne 0 ]; then failed+=("$name (exit $rc)"); fi
  echo "== $name: exit $rc after $((SECONDS - started)) s"
}
step "CUDA tests" 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py
# 2 epochs: the table's last column is the second epoch alone, past cuDNN's tuning and the graph capture (the first
# run measured --deterministic against the default at 1 epoch; it is left out to keep the time)
step "pack benchmark" 180 python3 -m bench.perf --device cuda --dataset /tmp/cifar10-jpeg --cache-dir /tmp/bench-cache \
  --epochs 2 --paths harness --pack 1,8,32,64 --quiet
if [ "${1:-}" = "--study" ]; then
  rm -f /tmp/gpu50.db
  step "bench.run --trials 50" 300 python3 -m bench.run --trials 50 \
    --dataset /tmp/cifar10-jpeg --cache-dir /tmp/bench-cache --storage sqlite:////tmp/gpu50.db --study-name gpu50 \
    --quiet --keep-models none
fi
# how packed studies search (no training: the CPU draws a synthetic landscape), beside the throughput above
step "search simulator" 120 python3 -m bench.perf --simulate-search --pack 1,8,32 --repeats 3 --trials 50
if [ ${#failed[@]} -gt 0 ]; then
  printf 'failed: %s\n' "${failed[@]}"
  exit 1
fi
echo "all steps passed"
