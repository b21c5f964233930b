#!/usr/bin/env bash
# Every GPU figure and check in one run, on a fresh CUDA machine without network (about 8 minutes):
#   scripts/gpu_check.sh            logs under $OUT (the device tool's folder) or /tmp/gpu_check
#
# CI has no GPU: tests/test_cuda_paths.py pins the CUDA code paths on the CPU with mocks, and what only
# a GPU can confirm is here (CUDA-paths issue items 1's speed, 4, 5 and 10; the performance issue's
# GPU targets):
#   1. the suite's CUDA tests (pytest -m cuda): bf16 from capability 8.0 else fp16 with a scaler (1),
#      nvjpeg results right under a busy stream (4), --device cuda:N made current (5, with 2+ GPUs),
#      validation reading the device once per pass (10)
#   2. bench of resnet50, resnet18, shufflenet_v2_x1_0 with AMP and channels_last (training step img/s)
#   3. bench --pipeline on a cached generated JPEG folder (end-to-end against the bare step)
#   4. --gpu-decode against CPU decoding (bench --pipeline, no cache)
#   5. --compile against eager (2-epoch trainings, the second epoch's img/s)
#   6. DDP over every visible GPU, when there are two or more
#   7. a 3-epoch train, then predict and eval of its best.pt
# Each step has its own time limit; a step that fails is reported and the next one runs.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${OUT:-/tmp/gpu_check}
mkdir -p "$LOG"
DATA=${GPU_CHECK_DATA:-/tmp/gpu_check_data}
START=$(date +%s)
declare -a SUMMARY=()

step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep the log, note the outcome
  local name=$1 limit=$2
  shift 2
  echo
  echo "=== $name (limit ${limit}s) ==="
  local t0=$(date +%s)
  timeout "$limit" "$@" 2>&1 | tee "$LOG/$name.log"
  local rc=${PIPESTATUS[0]}
  SUMMARY+=("$(printf '%-22s rc=%-3s %4ss' "$name" "$rc" "$(( $(date +%s) - t0 ))")")
}

# A virtual environment over the machine's own PyTorch (nothing can be fetched there).
if [ ! -x .venv/bin/python ]; then
  python3 -m venv --system-site-packages .venv
  if ! .venv/bin/python -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>/dev/null; then
    site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "$PWD" > "$site/cnntrain-dev.pth"  # the same as an editable install, without pip
  fi
fi
PY=.venv/bin/python
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
nvidia-smi -L || true
$PY - <<'EOF'
import torch
from cnntrain.runtime import amp_dtype_for
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
for i in range(torch.cuda.device_count()):
    d = torch.device("cuda", i)
    print(f"cuda:{i} {torch.cuda.get_device_name(i)} capability {torch.cuda.get_device_capability(i)} "
          f"-> autocast {amp_dtype_for(d, None)}")
EOF

# A flowers-like folder: 5 classes of 800 photo-sized JPEGs, drawn once.
if [ ! -f "$DATA/.done" ]; then
  $PY - "$DATA" <<'EOF'
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
import numpy as np
from PIL import Image

root = Path(sys.argv[1])

def draw(job):
    cls, i = job
    rng = np.random.default_rng(cls * 100_000 + i)
    h, w = int(rng.integers(240, 400)), int(rng.integers(320, 500))
    base = np.array([60 + 40 * cls, 200 - 30 * cls, 90 + 25 * cls], dtype=np.float32)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = base + 50 * np.sin(x / (8 + 3 * cls))[..., None] + rng.normal(0, 25, (h, w, 3))
    out = root / f"class{cls}" / f"{i:04d}.jpg"
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(out, quality=88)

with ProcessPoolExecutor() as pool:
    list(pool.map(draw, [(c, i) for c in range(5) for i in range(800)], chunksize=64))
(root / ".done").write_text("ok")
print(f"{root}: 4000 JPEGs")
EOF
fi

step cuda_tests 120 $PY -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda_device.py -rs
step bench_models 150 $PY -m cnntrain bench --arch resnet50,resnet18,shufflenet_v2_x1_0 --batch-size 128 --runs 5
step bench_pipeline 120 $PY -m cnntrain bench --pipeline --data-path "$DATA" --arch resnet50 --batch-size 128 \
  --epochs 3 --cache auto
step gpu_decode 120 $PY -m cnntrain bench --pipeline --data-path "$DATA" --arch resnet50 --batch-size 128 \
  --epochs 2 --gpu-decode
step cpu_decode 120 $PY -m cnntrain bench --pipeline --data-path "$DATA" --arch resnet50 --batch-size 128 \
  --epochs 2 --cache none
step train_eager 120 $PY -m cnntrain train --data-path "$DATA" --arch resnet18 --no-pretrained --img-size 160 \
  --epochs 2 --batch-size 128 --project /tmp/gpu_runs --name eager
step train_compile 200 $PY -m cnntrain train --data-path "$DATA" --arch resnet18 --no-pretrained --img-size 160 \
  --epochs 2 --batch-size 128 --compile --project /tmp/gpu_runs --name compiled
GPUS=$($PY -c 'import torch; print(torch.cuda.device_count())')
if [ "$GPUS" -ge 2 ]; then
  step ddp 150 $PY -m cnntrain train --data-path "$DATA" --arch resnet18 --no-pretrained --img-size 160 \
    --epochs 2 --batch-size 128 --nproc "$GPUS" --project /tmp/gpu_runs --name ddp
else
  echo; echo "=== ddp: skipped, $GPUS GPU visible (the gloo tests in tests/test_cuda_paths.py cover the logic) ==="
fi
step train_3_epochs 150 $PY -m cnntrain train --data-path "$DATA" --arch shufflenet_v2_x1_0 --no-pretrained \
  --epochs 3 --batch-size 128 --project /tmp/gpu_runs --name three
step predict 60 $PY -m cnntrain predict "$DATA/class0/0000.jpg" "$DATA/class3/0001.jpg" \
  --weights /tmp/gpu_runs/three/best.pt
step eval 90 $PY -m cnntrain eval --weights /tmp/gpu_runs/three/best.pt --data-path "$DATA" --format json

echo
echo "=== summary ($(( $(date +%s) - START ))s in all; logs in $LOG) ==="
printf '%s\n' "${SUMMARY[@]}"
grep -h "epoch\[2/2\]" "$LOG/train_eager.log" "$LOG/train_compile.log" 2>/dev/null | sed 's/^/eager, then compiled: /'
