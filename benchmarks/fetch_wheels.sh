#!/usr/bin/env bash
# Download the Python 3.12 x86-64 wheels that a GPU machine with torch and triton but no
# network lacks (kornia for device-side augmentation, the HTTP stack of `oecl serve`) into
# .whl/ (git-ignored), for gpu_check.sh to install there with --no-index. Versions are the
# ones this project is tested with.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=(kornia==0.9.0 kornia_rs==0.2.0 starlette==1.10.0 uvicorn==0.54.0 httptools==0.9.0
        python-multipart==0.0.34)
mkdir -p .whl
for w in "${WHEELS[@]}"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl "$w"
done
ls -l .whl
