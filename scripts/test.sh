#!/usr/bin/env bash
# Sets up .venv if needed, then runs the default test suite (slow experiments excluded).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -n 2 -q "$@"
