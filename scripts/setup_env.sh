#!/usr/bin/env bash
# Creates .venv (once) with torch and the test/bench extras, and (re)builds qembed._C.
# QEMBED_TORCH picks the torch release (default: the CPU build 2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
torch_spec="torch==${QEMBED_TORCH:-2.13.0}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install --quiet "$torch_spec"
fi
# numpy, the test and experiments extras of pyproject.toml, and the build tools
.venv/bin/pip install --quiet numpy pytest pytest-xdist hypothesis tqdm matplotlib setuptools wheel ninja
# Triton runs the qembed.triton kernels' tests in its interpreter (no GPU needed). Pinned: a
# version known to work with the CPU torch above.
.venv/bin/pip install --quiet "triton==${QEMBED_TRITON:-3.9.0}"
# Build in place: CPU kernels always, CUDA ones where torch has CUDA and nvcc exists.
MAX_JOBS="${MAX_JOBS:-2}" .venv/bin/pip install --quiet --no-build-isolation --no-deps -e .
