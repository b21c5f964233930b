#!/usr/bin/env python3
"""A frozen fine-tune against what it cannot do without: importing torch and one backbone pass.

    python scripts/bench_frozen.py FOLDER [--runs 3] [--tree DIR ...] [-- extra train options]

The 10-epoch frozen fine-tune (``cnntrain train --arch shufflenet_v2_x1_0 --img-size 224
--batch-size 16 --epochs 10 --freeze-layers --aug none --no-pretrained``) has to import torch and
torchvision and push every image through the backbone once; everything else it does (the scan, the
caches, ten head epochs, checkpoints, the end-of-run analysis, figures and report) is overhead. This
script times, in turns so that a load that comes and goes hits all of them alike:

- ``import``: ``python -c "import torch, torchvision"``, the whole process;
- ``pass``: the backbone pass a tutorial writes, timed inside its process after imports and model
  set-up: ``ImageFolder`` with Resize(256), CenterCrop(224), ToTensor, Normalize, a DataLoader of
  batch 16 with 2 workers, the model in eval mode under ``torch.no_grad`` over every image;
- ``train``: the whole ``cnntrain train`` process, with a fresh CNNTRAIN_HOME each time (no scan
  verdicts or disk cache from an earlier run: what a user's first run on a folder pays).

and prints the medians and ``train / (import + pass)``. ``--tree DIR`` runs the cnntrain source tree
in DIR (``PYTHONPATH``; repeat it to compare commits); the trees take turns too. Python may write
bytecode (``PYTHONDONTWRITEBYTECODE`` is dropped) as it does on a user's machine after the first run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRAIN = ["--arch", "shufflenet_v2_x1_0", "--img-size", "224", "--batch-size", "16", "--epochs", "10",
         "--freeze-layers", "--aug", "none", "--no-pretrained", "--quiet"]

PASS = """
import sys, time, torch, torchvision
from torchvision import transforms as T
data = torchvision.datasets.ImageFolder(sys.argv[1], T.Compose([
    T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]))
loader = torch.utils.data.DataLoader(data, batch_size=16, num_workers=2)
model = torchvision.models.shufflenet_v2_x1_0().eval()
start = time.perf_counter()
with torch.no_grad():
    for images, _ in loader:
        model(images)
print(time.perf_counter() - start)
"""


def _env(tree: str | None, home: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    if home is not None:
        env["CNNTRAIN_HOME"] = str(home)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([tree, *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd[:4])} ... failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return time.perf_counter() - started, done.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tree", action="append", default=[], help="a cnntrain source tree to run (repeat to compare)")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    opts = ap.parse_args(argv[:cut])
    extra = argv[cut + 1:]
    trees: list[str | None] = [str(Path(t).resolve()) for t in opts.tree] or [None]
    imports: list[float] = []
    passes: list[float] = []
    trains: dict[str | None, list[float]] = {t: [] for t in trees}
    with tempfile.TemporaryDirectory(prefix="bench_frozen_") as tmp:
        _timed([sys.executable, "-m", "cnntrain", "--help"], _env(trees[0]))  # bytecode written once, not timed
        for _ in range(opts.runs):
            imports.append(_timed([sys.executable, "-c", "import torch, torchvision"], _env(None))[0])
            passes.append(float(_timed([sys.executable, "-c", PASS, str(opts.folder)], _env(None))[1].split()[-1]))
            for j, tree in enumerate(trees):
                home = Path(tmp) / f"home{j}-{len(trains[tree])}"
                cmd = [sys.executable, "-m", "cnntrain", "train", "--data-path", str(opts.folder), *TRAIN,
                       "--project", str(Path(tmp) / f"runs{j}"), *extra]
                trains[tree].append(_timed(cmd, _env(tree, home))[0])
            print(f"load {os.getloadavg()[0]:.1f}: import {imports[-1]:.1f}s, pass {passes[-1]:.1f}s, train "
                  + ", ".join(f"{trains[t][-1]:.1f}s" for t in trees), flush=True)
    floor = statistics.median(imports) + statistics.median(passes)
    print(f"import torch, torchvision {statistics.median(imports):.2f}s, one backbone pass "
          f"{statistics.median(passes):.2f}s (medians of {opts.runs})")
    for tree, seconds in trains.items():
        train = statistics.median(seconds)
        print(f"{tree or 'installed cnntrain'}: frozen fine-tune {train:.2f}s = {train / floor:.2f} x (import + pass)")


if __name__ == "__main__":
    main()
