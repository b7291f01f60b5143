#!/usr/bin/env bash
# Set up (scripts/setup.sh), compile every CUDA kernel with nvcc (no GPU needed), check the
# formatting and lint (ruff), run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate

if command -v nvcc >/dev/null 2>&1; then
  echo "== nvcc compile check of csrc/kernels/cuda (CMakeLists.txt) =="
  cmake -S . -B build/cuda-check -G Ninja -DCMAKE_MAKE_PROGRAM="$(command -v ninja)" \
    -DCMAKE_CUDA_ARCHITECTURES="${SPARSE_ATTN_CHECK_ARCHS:-90a}" >/dev/null
  cmake --build build/cuda-check
else
  echo "== nvcc not found: CUDA compile check skipped =="
fi

echo "== ruff (format + lint) =="
ruff format --check .
ruff check .

echo "== tests =="
python -m pytest -q tests "$@"
