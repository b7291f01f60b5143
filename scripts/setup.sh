#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment in .venv with torch, the test tools,
# and sparse_attn built in place (CPU kernels always; CUDA kernels when nvcc and a CUDA torch are
# present). Re-running it only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip setuptools wheel ninja numpy
# Any torch already in the venv is kept; otherwise SPARSE_ATTN_TORCH (default: the CPU-capable
# torch 2.13.0 wheel) is installed.
python -c "import torch" 2>/dev/null || python -m pip install -q "${SPARSE_ATTN_TORCH:-torch==2.13.0}"
# --no-build-isolation: build against the torch installed above (as flash-attn does).
MAX_JOBS="${MAX_JOBS:-2}" python -m pip install -q --no-build-isolation -e ".[test]"
