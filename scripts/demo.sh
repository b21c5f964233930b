#!/usr/bin/env bash
# The main job on a fresh machine, offline: set up .venv, train a small network from scratch on
# the built-in `shapes` dataset (about two minutes on 2 CPU cores), then predict a held-out image.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_venv.sh
export PATH="$PWD/.venv/bin:$PATH"

cnntrain train --config configs/shapes_demo.yaml --project runs --name demo --device cpu

run="$(cd runs/latest && pwd -P)"
image="$(find "${CNNTRAIN_HOME:-$HOME/.cache/cnntrain}/datasets/shapes-v1/val/star" -name '*.png' | sort | head -n 1)"
echo
echo "predicting $image with $run/best.pt"
cnntrain predict "$image" --weights "$run/best.pt" --topk 3
echo
echo "done: the run folder is $run (metrics.csv, learning_curves.png, confusion_matrix.png, best.pt ...)"
