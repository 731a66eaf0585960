#!/usr/bin/env bash
# Everything only a GPU can show, in one run of at most 8 minutes on one H100/H200:
#   1. pytest -m gpu: kernel parity and memory on CUDA, no host sync per step, CUDA-graph scoring
#   2. bench_loss.py: eager, torch.compile and the fused kernel, N = 4k, 16k, 65k, fwd/bwd/both
#   3. bench_train.py: reference-style pipeline vs ours on ResNet-18, CIFAR stem, 32x32
#   4. bench_score_gpu.py: eager fp32 vs bf16 CUDA graphs, and onnxruntime on the CPU cores
# Each part writes JSON into the results folder; gpu-check.md there sums them up.
#
#   bash benchmarks/gpu_check.sh [--out DIR]           # on the GPU machine
#   bash benchmarks/gpu_check.sh --smoke [--out DIR]   # CPU, tiny sizes, kernels interpreted
#
# Wheels in .whl/ (benchmarks/fetch_wheels.sh) are installed first, without network, into a
# private folder: the GPU machine has torch and triton but not kornia or the HTTP stack.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SMOKE=0
RESULTS=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --smoke) SMOKE=1 ;;
    --out) RESULTS=$2; shift ;;
    *) echo "gpu_check.sh: unknown argument $1 (use --smoke, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done
if [[ -z $RESULTS ]]; then
  if [[ $SMOKE == 1 ]]; then RESULTS=$(mktemp -d); else RESULTS=benchmarks/results; fi
fi
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null && ! "$PY" -c "import kornia" 2>/dev/null; then
  SITE=$(mktemp -d)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl || exit 1
  export PYTHONPATH="$PYTHONPATH:$SITE"
fi
if [[ $SMOKE == 1 ]]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
elif ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_check.sh: no CUDA device here (use --smoke on a CPU)" >&2; exit 2
fi

STATUS="$RESULTS/gpu-check-steps.jsonl"
: > "$STATUS"
FAILED=0
step() {  # step NAME SECONDS CMD...: run with a time limit, log to RESULTS/NAME.log
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s)" >&2
  timeout "$limit" "$@" > "$RESULTS/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$RESULTS/$name.log" >&2
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0))}" >> "$STATUS"
  [[ $rc == 0 ]] || FAILED=1
}

if [[ $SMOKE == 1 ]]; then
  step pytest 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py \
    -k "tile_sizes_agree or hand_computed" --junitxml "$RESULTS/pytest.xml"
  step loss 300 "$PY" benchmarks/bench_loss.py --device cpu --sizes 64 --dtypes fp32 \
    --reps 1 --out-dir "$RESULTS"
  step train 300 "$PY" benchmarks/bench_train.py --data digits --depth resnet10 --width 4 \
    --batch-size 8 --steps 1 --warmup 1 --workers 0 --variants reference,ours-fp32 \
    --device cpu --out "$RESULTS"
  step score 300 "$PY" benchmarks/bench_score_gpu.py --smoke --out "$RESULTS"
else
  step pytest 90 "$PY" -m pytest -q -p no:cacheprovider -m gpu --junitxml "$RESULTS/pytest.xml"
  # bf16, the training dtype: each size recompiles the torch.compile baseline, and both
  # dtypes would not fit the time (bench_loss.py without --dtypes adds fp32).
  step loss 150 "$PY" benchmarks/bench_loss.py --device cuda --sizes 4096 16384 65536 \
    --dtypes bf16 --out-dir "$RESULTS"
  step train 150 "$PY" benchmarks/bench_train.py --data digits --image-size 32 \
    --depth resnet18 --width 64 --batch-size 256 --steps 20 --warmup 4 --workers 8 \
    --device cuda --out "$RESULTS"
  step score 80 "$PY" benchmarks/bench_score_gpu.py --max-seconds 2 --out "$RESULTS"
fi
"$PY" benchmarks/gpu_check_summary.py "$RESULTS" || FAILED=1
exit $FAILED
