#!/usr/bin/env bash
# Compile check of the CUDA kernels on a machine without a GPU: builds qembed._C against a
# CUDA build of torch in its own venv (.venv-cuda) and its own build folder, so the CPU
# build in the tree is left alone. Fails on any compile or link error. Nothing built runs.
# QEMBED_CUDA_TORCH picks the torch release (default 2.14.1, a CUDA 13.0 build).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-cuda
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "check_cuda_build: no nvcc at $CUDA_HOME/bin/nvcc (set CUDA_HOME)" >&2
  exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import torch, sys; sys.exit(torch.version.cuda is None)" 2>/dev/null; then
  "$venv/bin/pip" install --quiet "torch==${QEMBED_CUDA_TORCH:-2.14.1}"
fi
"$venv/bin/pip" install --quiet numpy setuptools wheel ninja
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
start=$SECONDS
# The CPU kernels' AVX2 and AVX-512 variants are left out (QEMBED_CPU_VARIANTS=0): the CPU
# build compiles and checks them; here they would triple the CPU kernels' compile time.
QEMBED_CUDA=1 QEMBED_NATIVE=0 QEMBED_CPU_VARIANTS=0 \
  TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}" MAX_JOBS="${MAX_JOBS:-2}" \
  PATH="$CUDA_HOME/bin:$PATH" \
  "$venv/bin/python" setup.py --quiet build_ext --build-temp "$out/temp" --build-lib "$out/lib" \
  > "$out/build.log" 2>&1 || {
  grep -B2 -A12 -E "error|FAILED" "$out/build.log" | head -150
  echo "check_cuda_build: the CUDA build failed (compiler output above)" >&2
  exit 1
}
so=$(find "$out/lib" -name '_C*.so')
# Every kernel made it into the library (as its host-side launch stub; templates demangle
# with "<", plain functions with "(").
symbols=$(nm -C "$so")
for kernel in $(grep -ho "__global__ void [a-z_]*" csrc/cuda/*.cu | awk '{print $3}'); do
  if ! grep -qE "${kernel}[<(]" <<<"$symbols"; then
    echo "check_cuda_build: kernel $kernel missing from $so" >&2
    exit 1
  fi
done
echo "check_cuda_build: CUDA extension built in $((SECONDS - start)) s: $(basename "$so")"
