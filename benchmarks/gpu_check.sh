#!/usr/bin/env bash
# Everything only a GPU can show, in one command of at most 9 minutes (about 6 expected) on one
# H100/H200:
#   pytest   pytest -m gpu: kernel parity and memory on CUDA, no host sync per step, CUDA graphs
#   targets  ptxas -v of this machine's triton for the launch configurations training uses
#   loss     eager, torch.compile and the fused kernel, N = 4k, 16k, 64k, d = 128, fp32 inputs
#            with TF32 (what training runs) and bf16, forward and forward + backward
#   train    reference-style pipeline vs ours on ResNet-18, CIFAR stem, 32x32, same settings
#   score    eager fp32 vs bf16 CUDA graphs, and onnxruntime on the CPU cores
#
#   bash benchmarks/gpu_check.sh --out "$OUT"              # on the GPU machine (carry .whl)
#   bash benchmarks/gpu_check.sh --out "$OUT" --steps loss  # rerun some steps only
#   bash benchmarks/gpu_check.sh --smoke [--out DIR]        # CPU, tiny sizes, kernels interpreted
#
# What comes back is at most five files in the output folder, each kept current as the run goes,
# so a step (or the whole command) cut off by its time limit keeps what finished:
#   gpu-check.jsonl   preflight, every measurement as it is made, and each step's exit code
#   gpu-check.log     the run's progress
#   gpu-check.md      the summary tables; gpu-check.json the same as data (rewritten per step)
#   gpu-check.tar.gz  every step's JSON, CSV, log and junit XML (refreshed after each step)
#
# Time limits, from what each step costs on a fresh H100/H200 with 16 cores (a device command
# may run 600 s; 15 device minutes in all, machine start included, so the whole run is sized to
# leave room for a rerun of one step):
#   preflight + wheels   ~10 s
#   pytest      90 s  (expected ~40: collecting the whole suite ~10 s, first Triton JIT compiles
#                      of the loss kernels, two CUDA graph captures, one tiny training run)
#   targets     45 s  (expected ~15: 8 kernels to PTX and through ptxas, on 16 cores)
#   loss       150 s  (expected ~100: 2 dtypes x 3 N x 3 implementations x 2 passes at ~2 s
#                      each, plus 4 cold torch.compile builds of the loss at ~10 s)
#   train      180 s  (expected ~130: reference ~15 s, ours eager ~10 s, then two cold
#                      torch.compile builds of ResNet-18 forward + backward at ~50 s each;
#                      the compiled variants run last, so a time-out costs only them)
#   score       60 s  (expected ~35: 4 batch sizes x 2 s x 2 GPU scorers, ONNX export, 3 CPU runs)
#   total      525 s worst case (+ preflight), ~330 s expected
#
# The GPU machine has torch and triton but not kornia or the HTTP stack: their wheels, fetched
# by benchmarks/fetch_wheels.sh into .whl/ (git-ignored, so carried explicitly), are installed
# first without network into a private folder. The preflight checks, in the first seconds,
# Python, torch, triton, the GPU and those packages, and stops with one line naming what is
# missing.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SMOKE=0
OUT=""
STEPS="pytest,targets,loss,train,score"
while [[ $# -gt 0 ]]; do
  case $1 in
    --smoke) SMOKE=1 ;;
    --out) OUT=${2:?--out needs a folder}; shift ;;
    --steps) STEPS=${2:?--steps needs a list}; shift ;;
    *) echo "gpu_check.sh: unknown argument $1 (use --smoke, --out DIR, --steps LIST)" >&2
       exit 2 ;;
  esac
  shift
done
for s in ${STEPS//,/ }; do
  case $s in pytest|targets|loss|train|score) ;;
    *) echo "gpu_check.sh: unknown step $s (steps: pytest,targets,loss,train,score)" >&2
       exit 2 ;;
  esac
done
if [[ -z $OUT ]]; then
  if [[ $SMOKE == 1 ]]; then OUT=$(mktemp -d); else OUT=benchmarks/results/gpu-check; fi
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)/gpu-check  # every step's own files; archived into $OUT after each step
mkdir -p "$WORK"
JSONL="$OUT/gpu-check.jsonl"
LOG="$OUT/gpu-check.log"
exec 2> >(tee -a "$LOG" >&2)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}

if compgen -G ".whl/*.whl" > /dev/null && ! "$PY" -c "import kornia, starlette" 2>/dev/null; then
  SITE=$(mktemp -d)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl >&2 || { echo "gpu_check.sh: installing .whl/ failed (its" \
    "wheels are for CPython 3.12 on x86-64; this is $("$PY" -V 2>&1))" >&2; exit 2; }
  export PYTHONPATH="$PYTHONPATH:$SITE"
fi
if [[ $SMOKE == 1 ]]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  "$PY" benchmarks/_gpu_env.py preflight --cpu --wheels .whl --jsonl "$JSONL" >&2 || exit 2
else
  "$PY" benchmarks/_gpu_env.py preflight --wheels .whl --jsonl "$JSONL" >&2 || exit 2
fi

FAILED=0
publish() {  # the summary and the archive of everything so far, replaced atomically
  "$PY" benchmarks/gpu_check_summary.py "$WORK" "$OUT" > /dev/null || true
  tar -czf "$OUT/.gpu-check.tar.gz" -C "$(dirname "$WORK")" gpu-check \
    && mv "$OUT/.gpu-check.tar.gz" "$OUT/gpu-check.tar.gz"
}
step() {  # step NAME SECONDS CMD...: run with a time limit, log to WORK/NAME.log
  local name=$1 limit=$2; shift 2
  [[ ",$STEPS," == *",$name,"* ]] || return 0
  local t0=$SECONDS
  echo "== $name (limit ${limit}s)" >&2
  timeout --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$WORK/$name.log" >&2
  echo "{\"kind\": \"step\", \"step\": \"$name\", \"rc\": $rc, \"limit_s\": $limit," \
       "\"seconds\": $((SECONDS - t0)), \"timed_out\": $([[ $rc == 124 || $rc == 137 ]] \
       && echo true || echo false)}" >> "$JSONL"
  [[ $rc == 0 ]] || FAILED=1
  publish
}

if [[ $SMOKE == 1 ]]; then
  step pytest 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py \
    -k "tile_sizes_agree or hand_computed" --junitxml "$WORK/pytest.xml"
  step targets 300 env -u TRITON_INTERPRET "$PY" -m kernels.targets --registers \
    --cc 86 --precisions bf16 --d 128 --workers 1 --out "$WORK/targets.json"
  step loss 300 "$PY" benchmarks/bench_loss.py --device cpu --sizes 64 --dtypes fp32 \
    --reps 1 --out-dir "$WORK" --jsonl "$JSONL"
  step train 300 "$PY" benchmarks/bench_train.py --data digits --depth resnet10 --width 4 \
    --batch-size 8 --steps 1 --warmup 1 --workers 0 --variants reference,ours-fp32 \
    --device cpu --out "$WORK" --jsonl "$JSONL"
  step score 300 "$PY" benchmarks/bench_score_gpu.py --smoke --out "$WORK" --jsonl "$JSONL"
else
  step pytest 90 "$PY" -m pytest -q -p no:cacheprovider -m gpu --junitxml "$WORK/pytest.xml"
  step targets 45 "$PY" -m kernels.targets --registers --cc 90 \
    --precisions fp32-tf32 bf16 --d 128 --out "$WORK/targets.json"
  step loss 150 "$PY" benchmarks/bench_loss.py --device cuda --sizes 4096 16384 65536 \
    --dtypes fp32-tf32 bf16 --impls eager compile triton --modes fwd fwd+bwd \
    --out-dir "$WORK" --jsonl "$JSONL"
  step train 180 "$PY" benchmarks/bench_train.py --data digits --image-size 32 \
    --depth resnet18 --width 64 --batch-size 256 --steps 15 --warmup 3 --workers 8 \
    --variants reference,ours-fp32,ours,ours-fp32-compiled --device cuda --out "$WORK" \
    --jsonl "$JSONL"
  step score 60 "$PY" benchmarks/bench_score_gpu.py --max-seconds 2 --out "$WORK" \
    --jsonl "$JSONL"
fi
"$PY" benchmarks/gpu_check_summary.py "$WORK" "$OUT" >&2 || FAILED=1
exit $FAILED
