#!/usr/bin/env bash
# Create .venv with everything oecl needs, once. Safe to run again: it only fills what is missing.
#
# torch is installed first and pinned, because packages that depend on it (kornia) would
# otherwise pull the newest CUDA build (several GB) onto machines without a GPU:
#   - no NVIDIA GPU: TORCH_SPEC (default torch==2.13.0) from the configured index / wheel folder
#     (for the CPU-only wheel elsewhere, set PIP_EXTRA_INDEX_URL to PyTorch's CPU index);
#   - NVIDIA GPU:    the regular CUDA build (TORCH_SPEC_CUDA, default torch>=2.4).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
STAMP="$VENV/.oecl-bootstrap"

if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && [ "$STAMP" -nt "$0" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "bootstrap: NVIDIA GPU found, installing the CUDA build of torch" >&2
  "$VENV/bin/python" -c "import torch" 2>/dev/null || pip install "${TORCH_SPEC_CUDA:-torch>=2.4}"
  extras="train,dev"
else
  echo "bootstrap: no GPU, installing the CPU build of torch" >&2
  "$VENV/bin/python" -c "import torch" 2>/dev/null || pip install "${TORCH_SPEC:-torch==2.13.0}"
  extras="train,dev"
fi
pip install -e ".[$extras]"
touch "$STAMP"
echo "bootstrap: ready ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))" >&2
