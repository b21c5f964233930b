#!/usr/bin/env bash
# Set up .venv if needed, then benchmark architectures on this machine (`cnntrain bench`).
# Arguments go to `cnntrain bench`, e.g.
#   scripts/bench.sh --arch resnet50,efficientnet_b0 --batch-size 64 --format json
#   scripts/bench.sh --pipeline --data-path ~/data/flower_photos --arch shufflenet_v2_x1_0
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_venv.sh
if [ "$#" -eq 0 ]; then
  set -- --arch resnet18,shufflenet_v2_x1_0,mobilenet_v3_small --batch-size 32
fi
exec .venv/bin/python -m cnntrain bench "$@"
