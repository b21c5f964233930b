#!/usr/bin/env python3
"""What each "better models" option buys, measured offline on the project's own `shapes` data.

    .venv/bin/python scripts/bench_better_models.py [--out /tmp/better] [--epochs 6] [--seed 0]

Every run is `cnntrain train` with the same seed and epochs, resnet18 from scratch at 64 px (the
shapes defaults); only the option under test differs. Printed: a markdown table of the metric each
option should move, with and without it, and the training time. Two data sets:

- imbalanced: shapes with 160/80/40/20/10 training images per class (16x), the full balanced
  validation split, so accuracy on it is not flattered by the big class;
- few: shapes with 40 training images per class (balanced), trained twice as many epochs, for
  EMA, mixup, cutmix and TTA: the few-hundred-photo regime where they are meant to help.

Fine-tuning with --backbone-lr-mult starts from the imbalanced baseline's weights and trains 3
epochs on the few set, head first for one epoch, then all layers.

`--part augment` measures the augmentation options instead, on generated arrows pointing left,
right, up and down (a horizontal flip turns left into right): the photo default, --hflip 0 and
each preset, at 32 px.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CNNTRAIN = [sys.executable, "-m", "cnntrain"]
KEEP = {"circle": 160, "cross": 80, "square": 40, "star": 20, "triangle": 10}
FEW = 40  # training images per class for the balanced runs: the few-hundred-photo regime


def run(args: list[str], out: Path) -> dict:
    """One training run (reused when its summary is already there, so an interrupted benchmark resumes)."""
    name = args[args.index("--name") + 1]
    done = out / "runs" / name / "summary.json"
    if done.is_file():
        return json.loads(done.read_text())
    subprocess.run([*CNNTRAIN, "train", *args, "--quiet", "--device", "cpu", "--project", str(out / "runs"),
                    "--exist-ok"], check=True, cwd=out, env={**os.environ, "MPLBACKEND": "Agg"})
    return json.loads(done.read_text())


def subset_copy(shapes: Path, dest: Path, keep_per_class: dict[str, int]) -> Path:
    """shapes with only the first N training images of each class, and all of its validation split."""
    if dest.exists():
        return dest
    shutil.copytree(shapes / "val", dest / "val")
    for cls, keep in keep_per_class.items():
        (dest / "train" / cls).mkdir(parents=True)
        for path in sorted((shapes / "train" / cls).iterdir())[:keep]:
            shutil.copy(path, dest / "train" / cls / path.name)
    return dest


def arrows_folder(dest: Path, per_class: int = 150, seed: int = 0) -> Path:
    """Arrows on noisy grey backgrounds, 40-56 px, in four directions: mirror images are other classes."""
    import random

    from PIL import Image, ImageDraw

    if dest.exists():
        return dest
    rng = random.Random(seed)
    for split, count in (("train", per_class), ("val", per_class // 3)):
        for name, turn in (("right", 0), ("up", 90), ("left", 180), ("down", 270)):
            (dest / split / name).mkdir(parents=True)
            for i in range(count):
                side = rng.randint(40, 56)
                img = Image.new("L", (side, side), rng.randint(0, 90))
                draw = ImageDraw.Draw(img)
                for _ in range(20):  # speckle
                    x, y = rng.randrange(side), rng.randrange(side)
                    draw.point((x, y), fill=rng.randint(0, 255))
                ink = rng.randint(170, 255)
                mid, half = side / 2 + rng.uniform(-4, 4), side * rng.uniform(0.3, 0.4)
                draw.rectangle((mid - half, mid - 3, mid + half * 0.2, mid + 3), fill=ink)  # shaft
                draw.polygon([(mid + half * 0.2, mid - 10), (mid + half, mid), (mid + half * 0.2, mid + 10)], fill=ink)
                img.rotate(turn + rng.uniform(-8, 8)).convert("RGB").save(dest / split / name / f"{i:03d}.png")
    return dest


def augment_part(out: Path, epochs: int, seed: int) -> list[str]:
    arrows = arrows_folder(out / "arrows")
    common = ["--data-path", str(arrows), "--img-size", "32", "--no-pretrained", "--opt", "adamw", "--lr", "0.002",
              "--weight-decay", "0.05", "--epochs", str(epochs), "--seed", str(seed)]
    lines = ["| augmentation (arrows: a mirror is another class) | val accuracy | train accuracy (last epoch) | time |",
             "| --- | --- | --- | --- |"]
    for option in ([], ["--hflip", "0"], ["--aug-preset", "no-mirror"], ["--aug-preset", "light"], ["--aug", "none"]):
        summary = run([*common, *option, "--name", "arrows" + "-".join(option)], out)
        last = summary["run_dir"] + "/metrics.csv"
        train_acc = float(Path(last).read_text().splitlines()[-1].split(",")[2])
        lines.append(f"| {' '.join(option) or 'default (photo)'} | {summary['best_val_acc']:.3f} | {train_acc:.3f} | "
                     f"{summary['seconds']:.0f} s |")
    return lines


def shapes_folder(out: Path) -> Path:
    env = {**os.environ, "CNNTRAIN_HOME": str(out / "home")}
    code = "from cnntrain.data import load_builtin; print(load_builtin('shapes').root)"
    return Path(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                               env=env).stdout.strip().splitlines()[-1])


def row(option: str, metric: str, base: dict, other: dict, key: str) -> str:
    a, b = base[key], other[key]
    return (f"| {option} | {metric} | {a:.3f} | {b:.3f} ({b - a:+.3f}) | {base['seconds']:.0f} s | "
            f"{other['seconds']:.0f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/cnntrain-better-models"))
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--part", choices=("models", "augment"), default="models")
    opts = parser.parse_args()
    out = opts.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ["CNNTRAIN_HOME"] = str(out / "home")
    if opts.part == "augment":
        print("\n".join(augment_part(out, opts.epochs, opts.seed)))
        return
    shapes = shapes_folder(out)
    skewed = subset_copy(shapes, out / "shapes-imbalanced", KEEP)
    few = subset_copy(shapes, out / "shapes-few", {cls: FEW for cls in KEEP})
    common = ["--epochs", str(opts.epochs), "--seed", str(opts.seed)]
    on_skewed = ["--data-path", str(skewed), "--img-size", "64", "--no-pretrained", "--opt", "adamw", "--lr", "0.002",
                 "--weight-decay", "0.05", *common]
    on_shapes = ["--data-path", str(few), "--img-size", "64", "--no-pretrained", "--opt", "adamw", "--lr", "0.002",
                 "--weight-decay", "0.05", "--epochs", str(2 * opts.epochs), "--seed", str(opts.seed)]

    lines = ["| option | metric | without | with | time without | time with |", "| --- | --- | --- | --- | --- | --- |"]
    base = run([*on_skewed, "--name", "skewed-base"], out)
    for option in (["--class-weights", "auto"], ["--sampler", "balanced"]):
        other = run([*on_skewed, *option, "--name", "skewed" + "-".join(option)], out)
        for metric, key in (("balanced accuracy", "best_val_balanced_acc"), ("macro-F1", "best_val_macro_f1")):
            lines.append(row(" ".join(option) + " (16x imbalance)", metric, base, other, key))

    plain = run([*on_shapes, "--name", "few-base"], out)
    for option in (["--ema"], ["--mixup", "0.2"], ["--cutmix", "1.0"]):
        other = run([*on_shapes, *option, "--name", "few" + "-".join(option)], out)
        lines.append(row(" ".join(option), "val accuracy", plain, other, "best_val_acc"))

    best = out / "runs" / "few-base" / "best.pt"
    reports = [json.loads(subprocess.run([*CNNTRAIN, "eval", "--weights", str(best), "--format", "json", *extra],
                                         check=True, capture_output=True, text=True).stdout)
               for extra in ([], ["--tta"])]
    lines.append(f"| eval --tta | val accuracy | {reports[0]['top1']:.3f} | {reports[1]['tta']['top1']:.3f} "
                 f"({reports[1]['tta']['top1'] - reports[0]['top1']:+.3f}) | | |")

    start = out / "runs" / "skewed-base" / "best.pt"
    tune = ["--data-path", str(few), "--img-size", "64", "--weights", str(start), "--epochs", "3", "--freeze-layers",
            "--unfreeze-epoch", "2", "--seed", str(opts.seed)]
    flat = run([*tune, "--name", "tune-1x"], out)
    slow = run([*tune, "--backbone-lr-mult", "0.1", "--name", "tune-0.1x"], out)
    lines.append(row("--backbone-lr-mult 0.1 (fine-tune, 3 epochs)", "val accuracy", flat, slow, "best_val_acc"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
