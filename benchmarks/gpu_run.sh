#!/usr/bin/env bash
# On a GPU machine (no network, no pip): builds qembed._C with its CUDA kernels in place,
# runs the GPU tests (`pytest -m gpu`: the cuda backend's, under compute-sanitizer's memcheck
# too where installed; the triton-cuda backend's where triton is installed), the GPU lookup
# benchmark and the training-step benchmark. Everything it prints and writes goes to OUT_DIR.
#   bash benchmarks/gpu_run.sh OUT_DIR [STEP ...]
# STEPs (default: all, in this order): build tests triton_tests memcheck bench bench_train.
# Naming some lets a machine that limits each command's time run them over several calls
# (the build stays in place between them).
# Exits non-zero if the build fails (at once) or any later step failed (after the rest ran).
set -uo pipefail
if [ $# -lt 1 ]; then
  echo "usage: bash benchmarks/gpu_run.sh OUT_DIR [build|tests|triton_tests|memcheck|bench|bench_train ...]" >&2
  exit 2
fi
mkdir -p "$1"
out="$(cd "$1" && pwd)"
arg1=$1
shift
steps=" ${*:-build tests triton_tests memcheck bench bench_train} "
want() { [[ "$steps" == *" $1 "* ]]; }
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
die() { echo "gpu_run: $*" >&2; exit 1; }

# Preflight: everything the steps need, named if missing.
missing=$("$py" - <<'PY'
import importlib.util
need = ["torch", "numpy", "tqdm", "matplotlib", "pytest", "hypothesis", "setuptools", "ninja"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
PY
) || die "cannot run $py"
[ -z "$missing" ] || die "python modules missing: $missing (no network here: install them in the image)"
"$py" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" ||
  die "torch $("$py" -c 'import torch; print(torch.__version__)') sees no CUDA device"
nvcc=$(command -v nvcc || ls "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" 2>/dev/null) || die "nvcc not found"
export CUDA_HOME="${CUDA_HOME:-$(dirname "$(dirname "$nvcc")")}"
export PATH="$CUDA_HOME/bin:$PATH"
arch=$("$py" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
{
  echo "date: $(date -u +%FT%TZ)"; echo "command: bash benchmarks/gpu_run.sh $arg1$steps"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  "$nvcc" --version | tail -1
} | tee -a "$out/environment.txt"

if want build; then
  echo "== build (sm_$arch)"
  start=$SECONDS
  QEMBED_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    "$py" setup.py build_ext --inplace > "$out/build.log" 2>&1 ||
    { tail -50 "$out/build.log"; die "build failed, see $out/build.log"; }
  echo "built in $((SECONDS - start)) s"
fi

status=0
step() {  # step NAME COMMAND...: runs it if wanted, logs to OUT_DIR/NAME.log, remembers a failure
  local name=$1; shift
  want "$name" || return 0
  echo "== $name"
  "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "gpu_run: $name failed (exit $rc)" >&2; status=1; }
}

step tests "$py" -m pytest tests -m "gpu and not triton" -v -p no:cacheprovider
if "$py" -c "import triton" 2>/dev/null; then
  step triton_tests "$py" -m pytest tests -m "gpu and triton" -v -p no:cacheprovider
elif want triton_tests; then
  echo "triton not installed: the Triton kernels' GPU tests skipped" | tee "$out/triton_tests.log"
fi
sanitizer=$(command -v compute-sanitizer || ls "$CUDA_HOME/bin/compute-sanitizer" 2>/dev/null)
if [ -n "$sanitizer" ]; then
  # memcheck slows kernels down a lot: the kernel tests only, no compiler
  step memcheck "$sanitizer" --tool memcheck --error-exitcode 1 \
    "$py" -m pytest tests -m "gpu and not triton" -q -x -p no:cacheprovider \
    -k "not compile and not opcheck"
elif want memcheck; then
  echo "compute-sanitizer not found: memcheck skipped" | tee "$out/memcheck.log"
fi
step bench "$py" benchmarks/bench_lookup_gpu.py --out "$out"
step bench_train "$py" benchmarks/bench_train_gpu.py --out "$out"
echo "results in $out"
exit $status
