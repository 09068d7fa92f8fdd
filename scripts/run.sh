#!/usr/bin/env bash
# Sets up .venv if needed, then runs qembed's main job (`python -m qembed`, args passed on).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m qembed "$@"
