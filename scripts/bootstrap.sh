#!/usr/bin/env bash
# Create .venv with everything oecl needs, once. Safe to run again: it only fills what is missing.
#
# torch is installed first and pinned, because packages that depend on it (kornia) would
# otherwise pull the newest CUDA build (several GB) onto machines without a GPU:
#   - no NVIDIA GPU: TORCH_SPEC (default torch==2.13.0) from the configured index / wheel folder
#     (for the CPU-only wheel elsewhere, set PIP_EXTRA_INDEX_URL to PyTorch's CPU index);
#   - NVIDIA GPU:    the regular CUDA build (TORCH_SPEC_CUDA, default torch>=2.4), the `gpu`
#     extra (TensorRT, cuda-python pinned to the driver's CUDA major), and onnxruntime-gpu in
#     place of onnxruntime, so the GPU backends and their tests run instead of skipping.
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
  echo "bootstrap: NVIDIA GPU found, installing the CUDA build of torch and the gpu extra" >&2
  "$VENV/bin/python" -c "import torch" 2>/dev/null || pip install "${TORCH_SPEC_CUDA:-torch>=2.4}"
  # The highest CUDA the driver runs, e.g. "CUDA Version: 12.8" -> 12.
  cuda_major=$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9]*\).*/\1/p' | head -n 1)
  cuda_spec=${CUDA_PYTHON_SPEC:-cuda-python>=${cuda_major:-12}.0,<$(( ${cuda_major:-12} + 1 ))}
  pip install -e ".[train,dev,gpu]" "$cuda_spec"
  if [ "$(uname -m)" = "x86_64" ]; then
    # onnxruntime-gpu replaces onnxruntime: both write the `onnxruntime` module, so the CPU
    # wheel goes first and the GPU wheel (same version where one exists) is laid down whole.
    ort_version=$("$VENV/bin/python" -c \
      'import importlib.metadata as m; print(m.version("onnxruntime"))' 2>/dev/null || true)
    pip uninstall -y onnxruntime
    pip install --force-reinstall --no-deps "onnxruntime-gpu==${ort_version}" 2>/dev/null \
      || pip install --force-reinstall --no-deps onnxruntime-gpu
  else
    echo "bootstrap: $(uname -m): install onnxruntime-gpu from NVIDIA's Jetson wheels and use" \
         "JetPack's TensorRT (see README.md, 'Edge box')" >&2
  fi
else
  echo "bootstrap: no GPU, installing the CPU build of torch" >&2
  "$VENV/bin/python" -c "import torch" 2>/dev/null || pip install "${TORCH_SPEC:-torch==2.13.0}"
  pip install -e ".[train,dev]"
fi
# The Triton-side environment of the protocol tests (see the triton-test extra): its own venv,
# because it needs numpy < 2. Optional: without it those tests skip and say why.
if [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ] && [ "${OECL_TRITON_TEST:-1}" != 0 ]; then
  TVENV=${TRITON_VENV:-.venv-triton}
  if { [ -x "$TVENV/bin/python" ] || "$PY" -m venv "$TVENV"; } \
     && "$TVENV/bin/python" -m pip --disable-pip-version-check -q install -e ".[triton-test]"; then
    echo "bootstrap: Triton test environment ready in $TVENV" >&2
  else
    echo "bootstrap: could not build $TVENV; the tests against tritonserver will skip" >&2
  fi
fi
touch "$STAMP"
echo "bootstrap: ready ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))" >&2
