#!/usr/bin/env python3
"""Time `cnntrain train` up to its first optimiser step, and its peak memory, on first and second runs.

    python scripts/bench_first_step.py FOLDER [--runs 3] [--tree DIR ...] [-- extra train options]

What happens before the first step (listing, the scan for unreadable files, the decoded-image
cache, building the model) is what a user waits through on a new dataset, and it grows with the
dataset while the model's set-up does not. Each run is `cnntrain train --data-path FOLDER --arch
shufflenet_v2_x1_0 --img-size 112 --epochs 1 --no-pretrained --workers 2` (plus any extra options)
in a subprocess, stopped at the first `optimizer.step()` (a global step hook raises), so the rest
of the epoch is not waited for. A first run gets a fresh, empty CNNTRAIN_HOME (no scan verdicts, no
disk image cache); a second run reuses the home of the first run before it. ``--tree DIR`` (give it
twice or more) runs the cnntrain source tree in DIR (``PYTHONPATH``; e.g. a ``git worktree`` of the
commit before a change) instead of the installed one; the trees take turns run by run, so each
comparison sees the same load on a shared machine.

Reported per run, medians over ``--runs``: wall seconds from starting the command (Python start-up
and imports included) to the first step; CPU seconds (user + system) of the command and of the
worker processes it had finished with by then (the scan's and the cache's; the loader workers that
are still running are not counted); the peak resident memory of the main process and of the largest
finished worker (``getrusage`` ``ru_maxrss``: a RAM image cache counts in full in the process that
filled it); and the seconds the image cache's line reports. The OS file cache is not dropped: first
runs measure decoding, not the disk. On a 2-core machine other work skews the figures (CPU time too:
torch's threads spin while they wait for a core); the 1-minute load average at each start is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_TRAIN = ["--arch", "shufflenet_v2_x1_0", "--img-size", "112", "--epochs", "1", "--no-pretrained",
                 "--workers", "2"]


class FirstStep(BaseException):
    """Raised from the step hook: a BaseException, so no ``except Exception`` in the trainer keeps it."""


def child(report: Path, args: list[str]) -> None:
    """Run ``cnntrain train ARGS`` in this process; at the first optimiser step write ``report`` and stop."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from cnntrain.cli.app import app

    def at_first_step(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        t = os.times()
        report.write_text(json.dumps({
            "at": time.time(),
            "cpu": t.user + t.system + t.children_user + t.children_system,
            "rss_main_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "rss_worker_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
        }))
        raise FirstStep

    register_optimizer_step_pre_hook(at_first_step)
    try:
        app(["train", *args])
    except FirstStep:
        sys.exit(0)
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    sys.exit("the run ended without an optimiser step")


def one_run(folder: Path, home: Path, work: Path, extra: list[str], tree: str | None) -> dict[str, object]:
    """One training command up to its first step: its report plus the cache line it printed."""
    report = work / "report.json"
    report.unlink(missing_ok=True)
    args = ["--data-path", str(folder), *DEFAULT_TRAIN, "--project", str(work / "runs"), *extra]
    env = {**os.environ, "CNNTRAIN_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([tree, *filter(None, [os.environ.get("PYTHONPATH")])])
    load = os.getloadavg()[0]
    started = time.time()
    done = subprocess.run([sys.executable, __file__, "--child", str(report), "--", *args], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0 or not report.exists():
        sys.exit(f"the training command failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    result = json.loads(report.read_text())
    cache = re.search(r"image cache: .*", done.stdout + done.stderr)
    cache_s = re.search(r", ([0-9.]+)s$", cache.group(0)) if cache else None
    return {"wall": result["at"] - started, "cpu": result["cpu"], "rss_main_mb": result["rss_main_kb"] / 1024,
            "rss_worker_mb": result["rss_worker_kb"] / 1024, "cache_s": float(cache_s.group(1)) if cache_s else 0.0,
            "load": load, "cache": cache.group(0) if cache else "-"}


def _table(name: str, runs: list[dict[str, object]]) -> None:
    def median(key: str) -> float:
        return statistics.median(float(r[key]) for r in runs)  # type: ignore[arg-type]

    print(f"{name}: wall {median('wall'):.1f}s, cpu {median('cpu'):.1f}s, peak RSS main {median('rss_main_mb'):.0f} MB,"
          f" largest worker {median('rss_worker_mb'):.0f} MB, cache line {median('cache_s'):.1f}s "
          f"(median of {len(runs)}; load {median('load'):.1f})")
    for r in runs:
        print(f"  wall {float(r['wall']):6.1f}s  cpu {float(r['cpu']):6.1f}s  "  # type: ignore[arg-type]
              f"rss {float(r['rss_main_mb']):6.0f} / {float(r['rss_worker_mb']):5.0f} MB  "  # type: ignore[arg-type]
              f"load {float(r['load']):4.1f}  {r['cache']}")  # type: ignore[arg-type]


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(Path(sys.argv[2]), sys.argv[4:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--runs", type=int, default=3, help="first runs, each followed by a second run (default 3)")
    ap.add_argument("--tree", action="append", default=[], help="a cnntrain source tree to run (repeat to compare)")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    opts = ap.parse_args(argv[:cut])
    opts.extra = argv[cut + 1:]  # more train options, after --
    trees: list[str | None] = [str(Path(t).resolve()) for t in opts.tree] or [None]
    Runs = list[dict[str, object]]
    runs: dict[tuple[str | None, str], Runs] = {(t, k): [] for t in trees for k in ("first", "second")}
    with tempfile.TemporaryDirectory(prefix="bench_first_step_") as tmp:
        for _ in range(opts.runs):
            for kind in ("first", "second"):  # each tree's first run, then each one's second run
                for j, tree in enumerate(trees):
                    home, work = Path(tmp) / f"home{j}", Path(tmp) / f"work{j}"
                    if kind == "first":
                        shutil.rmtree(home, ignore_errors=True)  # fresh caches (a disk image cache can be large)
                        work.mkdir(exist_ok=True)
                    runs[tree, kind].append(one_run(opts.folder, home, work, opts.extra, tree))
    for (tree, kind), measured in runs.items():
        _table(f"{tree or 'installed cnntrain'}, {kind} run", measured)


if __name__ == "__main__":
    main()
