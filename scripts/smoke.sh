#!/usr/bin/env bash
# Shell-level smoke test to copy into CI: train one epoch on a tiny generated folder, then
# predict and eval from the checkpoint, checking every exit code and that JSON output parses.
# Usage: scripts/smoke.sh [WORKDIR]   (uses .venv when present, else `cnntrain` on PATH)
# Without WORKDIR it works in a mktemp folder and removes it on exit; a given WORKDIR is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/cnntrain ] && export PATH="$PWD/.venv/bin:$PATH"
if [ -n "${1:-}" ]; then
    work="$1"  # a given WORKDIR is kept for inspection
else
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT  # our own temporary folder goes, pass or fail
fi
py="$(command -v python3 || command -v python)"
[ -x .venv/bin/python ] && py=.venv/bin/python

"$py" - "$work/data" <<'PY'
import random, sys
from pathlib import Path
from PIL import Image
root = Path(sys.argv[1]); rng = random.Random(0)
for name, colour in {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (30, 60, 220)}.items():
    (root / name).mkdir(parents=True, exist_ok=True)
    for i in range(8):
        Image.new("RGB", (48, 40), tuple(c + rng.randrange(-30, 30) for c in colour)).save(root / name / f"{i}.jpg")
PY

step() { echo "+ $*"; "$@" || { echo "smoke: FAILED (exit $?): $*" >&2; exit 1; }; }
step cnntrain train --data-path "$work/data" --arch resnet18 --no-pretrained --img-size 32 --epochs 1 \
     --batch-size 8 --workers 0 --project "$work/runs" --name smoke --quiet
ckpt="$work/runs/smoke/best.pt"
step test -s "$ckpt"
cnntrain predict "$work/data/red" --weights "$ckpt" --format json > "$work/pred.json" || { echo "smoke: predict failed" >&2; exit 1; }
step "$py" -c "import json,sys; rows=json.load(open(sys.argv[1])); assert len(rows)==8 and all(r['predictions'] for r in rows)" "$work/pred.json"
cnntrain eval --weights "$ckpt" --data-path "$work/data" --split all --format json --workers 0 > "$work/eval.json" || { echo "smoke: eval failed" >&2; exit 1; }
step "$py" -c "import json,sys; r=json.load(open(sys.argv[1])); assert r['images']==24; print('top-1', r['top1'])" "$work/eval.json"
echo "smoke: OK ($work)"
