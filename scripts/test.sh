#!/usr/bin/env bash
# Installs everything into .venv from nothing and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
python -m pytest tests -q "$@"
