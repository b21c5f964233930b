#!/usr/bin/env python3
"""Time `cnntrain check-data` and train's leakage check on a folder; measure the duplicate search.

    python scripts/bench_check_data.py FOLDER [--runs 3]          # first and second runs, medians
    python scripts/bench_check_data.py FOLDER --plant 40          # precision and recall on planted copies

Timing: each first run gets a fresh, empty CNNTRAIN_HOME (no scan verdicts, no hashes: every
image is decoded and hashed); then at least three second runs reuse the home of the last first run. Times are
wall clock and CPU time (user + system) of the whole command (`cnntrain check-data --format json
--no-plot` in a subprocess, Python start-up and imports included), and the seconds spent inside
`check_data` (its JSON's `seconds`). The leakage check is `leak_line(splits)`, what `train`
calls before its first epoch, timed in this process after the scan, cold (no hashes) and warm.
The OS file cache is not dropped: first runs measure decoding and hashing, not the disk.

--plant K copies FOLDER (a flat class folder, e.g. from make_image_folder.py) to a temporary
folder, adds K copies of each kind (byte copy, half size, JPEG quality 50, 2% cropped off each
side, 5% off one side) of distinct originals, some in another class, and reports how many
planted pairs check-data finds (recall) and how many of its pairs were planted (precision), for
each of --thresholds.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

KINDS = {
    "exact": None,
    "half size": lambda im: im.resize((im.width // 2, im.height // 2), Image.LANCZOS),
    "jpeg q50": lambda im: _jpeg(im, 50),
    "crop 2% a side": lambda im: im.crop((im.width // 50, im.height // 50, im.width - im.width // 50,
                                          im.height - im.height // 50)),
    "crop 5% one side": lambda im: im.crop((im.width // 20, 0, im.width, im.height)),
}


def _jpeg(im: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    im.save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer)


def _cli(folder: Path, home: Path) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds (user + system) and check_data's own seconds of one command."""
    env = {**os.environ, "CNNTRAIN_HOME": str(home)}
    cmd = [sys.executable, "-m", "cnntrain", "check-data", "--data-path", str(folder), "--format", "json", "--no-plot"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, check=True, stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall, cpu, json.loads(done.stdout)["seconds"]


def _median(runs: list[tuple[float, float, float]], k: int) -> str:
    values = [r[k] for r in runs]
    return f"{statistics.median(values):.1f}s ({', '.join(f'{v:.1f}' for v in values)})"


def time_runs(folder: Path, runs: int) -> None:
    firsts = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(runs):
            home = Path(tmp) / f"home{i}"
            firsts.append(_cli(folder, home))
        seconds = [_cli(folder, home) for _ in range(max(3, runs))]
        os.environ["CNNTRAIN_HOME"] = str(Path(tmp) / "leak")
        from cnntrain.data import load_folder, scan_samples
        from cnntrain.datacheck.findings import leak_line

        splits = load_folder(folder)
        scan_samples(splits.train + splits.val)  # what train does first; leak_line follows it
        leak = []
        for _ in range(2):
            start = time.perf_counter()
            leak_line(splits)
            leak.append(time.perf_counter() - start)
    images = len(splits.train) + len(splits.val)
    print(f"{images:,} images in {folder}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end")
    for name, times in (("first run: ", firsts), ("second run:", seconds)):
        print(f"check-data {name} wall median {_median(times, 0)}; CPU {_median(times, 1)}; "
              f"inside check_data {_median(times, 2)}")
    print(f"train's leak check: {leak[0]:.2f}s without hashes cached, {leak[1]:.3f}s with")


def plant(folder: Path, per_kind: int, seed: int, thresholds: list[int]) -> None:
    from cnntrain.data import load_folder
    from cnntrain.datacheck.findings import check_data

    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        shutil.copytree(folder, root)
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        originals = rng.sample(sorted(root.rglob("*.jpg")), per_kind * len(KINDS))
        expected: dict[frozenset[str], str] = {}
        for n, original in enumerate(originals):
            kind = list(KINDS)[n % len(KINDS)]
            label = rng.choice(classes) if n % 4 == 0 else original.parent.name  # a quarter are label conflicts
            copy = root / label / f"planted{n}.jpg"
            make = KINDS[kind]
            if make is None:
                shutil.copyfile(original, copy)
            else:
                with Image.open(original) as im:
                    make(im.convert("RGB")).convert("RGB").save(copy, quality=90)
            expected[frozenset({str(original), str(copy)})] = kind
        os.environ["CNNTRAIN_HOME"] = str(Path(tmp) / "home")
        result = check_data(load_folder(root), near_threshold=max(thresholds))  # hashed once, cut below
    print(f"{len(originals)} planted pairs among {sum(1 for _ in folder.rglob('*.jpg')):,} images")
    for threshold in thresholds:
        matches = [m for m in result.matches if m.distance <= threshold]
        found = {frozenset({m.a.path, m.b.path}) for m in matches}
        true = found & set(expected)
        print(f"--near-threshold {threshold}: precision {len(true) / max(1, len(found)):.3f} "
              f"({len(found - true)} unplanted pairs found), recall {len(true) / len(expected):.3f}")
        for kind in KINDS:
            pairs = [p for p, k in expected.items() if k == kind]
            print(f"  {kind:17} {sum(p in found for p in pairs)}/{len(pairs)} found")
        for m in matches:
            if frozenset({m.a.path, m.b.path}) not in expected:
                print(f"  unplanted: {m.kind} {m.distance} bits: {m.a.path} ~ {m.b.path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--runs", type=int, default=3, help="first runs (second runs: at least 3)")
    ap.add_argument("--plant", type=int, default=0, help="copies of each kind to plant (0: time instead)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--thresholds", default="20", help="with --plant: comma-separated --near-threshold values")
    args = ap.parse_args()
    if args.plant:
        plant(args.folder, args.plant, args.seed, [int(t) for t in args.thresholds.split(",")])
    else:
        time_runs(args.folder, args.runs)


if __name__ == "__main__":
    main()
