#!/usr/bin/env bash
# Packaging check, as a user installs qembed: builds the sdist, builds a wheel from it with
# the default (portable) flags, installs the wheel into a fresh virtual environment outside
# the checkout and runs scripts/smoke_test.py there; then checks with
# scripts/check_isa_code.py that the wheel's library keeps AVX2/AVX-512 code inside the
# kernel variants, and the variants' objects too. Uses .venv (scripts/setup_env.sh) for
# building; the fresh environment gets torch ${QEMBED_TORCH:-2.13.0} and the wheel's
# dependencies. WHEEL_DIR=... keeps the sdist and the wheel there.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
py="$root/.venv/bin/python"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
dist="${WHEEL_DIR:-$work/dist}"
mkdir -p "$dist"
dist="$(cd "$dist" && pwd)"  # the wheel is built from another folder
start=$SECONDS

# The sdist (MANIFEST.in adds csrc/), unpacked and built in place, so that its build folder
# (the variants' objects) stays for the check below.
"$py" setup.py --quiet sdist --dist-dir "$dist" > "$work/sdist.log" 2>&1 || {
  cat "$work/sdist.log"; exit 1; }
sdist=$(ls "$dist"/qembed-*.tar.gz)
mkdir "$work/src"
tar -xzf "$sdist" -C "$work/src"
src=$(ls -d "$work"/src/qembed-*)
for f in setup.py pyproject.toml csrc/qembed.cpp csrc/cpu/dispatch.h \
    csrc/cpu/isa/embedding_bag.cpp; do
  [ -f "$src/$f" ] || { echo "check_wheel: the sdist lacks $f" >&2; exit 1; }
done
(cd "$src" && QEMBED_NATIVE=0 QEMBED_CUDA=0 MAX_JOBS="${MAX_JOBS:-2}" \
  "$py" -m pip wheel --quiet --no-build-isolation --no-deps --wheel-dir "$dist" . \
  > "$work/wheel.log" 2>&1) || {
  tail -50 "$work/wheel.log"; echo "check_wheel: the wheel did not build" >&2; exit 1; }
wheel=$(ls "$dist"/qembed-*.whl)
echo "check_wheel: built $(basename "$sdist") and $(basename "$wheel") in $((SECONDS - start)) s"

python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet "torch==${QEMBED_TORCH:-2.13.0}"
# With the experiments extra: the `qembed` command is the experiment's (the library alone
# loads none of it, tests/test_package.py).
"$work/venv/bin/pip" install --quiet "$wheel[experiments]"
# Run from outside the checkout: qembed must come from the installed wheel.
(cd "$work" && "$work/venv/bin/python" -c \
  "import qembed, sys; sys.exit(not qembed.__file__.startswith('$work/venv/'))") || {
  echo "check_wheel: qembed was not imported from the fresh environment" >&2; exit 1; }
(cd "$work" && "$work/venv/bin/python" "$root/scripts/smoke_test.py")
(cd "$work" && "$work/venv/bin/python" "$root/scripts/check_isa_code.py" \
  --objects "$(ls -d "$src"/build/temp.*)")
echo "check_wheel: ok in $((SECONDS - start)) s"
