#!/usr/bin/env bash
# Installs everything into .venv from nothing and runs the op benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
python -m pytest benchmarks/bench_ops.py -q -p no:cacheprovider "$@"
