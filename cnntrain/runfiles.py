"""What a run writes besides its checkpoints: config, metrics.csv, plots and summary.json.

Every file is written atomically, and a failed write (disk full, I/O error) is a one-line
error that leaves the previous file as it was. Under torchrun only rank 0 writes.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.nn as nn

from cnntrain import checkpoint, fileio
from cnntrain.config import TrainConfig
from cnntrain.data import DatasetSplits
from cnntrain.distributed import DistContext
from cnntrain.engine import Batcher, evaluate
from cnntrain.errors import CheckpointError

if TYPE_CHECKING:
    from cnntrain.trainer import TrainResult

METRIC_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_top5", "lr", "seconds", "images_per_s"]


def write_text(path: Path, text: str) -> None:
    """Atomic write whose failure (disk full, I/O error) is a one-line error, not a traceback."""
    try:
        fileio.atomic_write_text(path, text)
    except OSError as exc:
        raise CheckpointError(f"could not write {path}: {exc.strerror or exc}; the previous file is unchanged") from None


def write_metrics_csv(path: Path, history: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in METRIC_COLUMNS})
    write_text(path, buf.getvalue())


def finish(result: "TrainResult", model: nn.Module, scorer: tuple[nn.Module, Any, Batcher], criterion: nn.Module,
            classes: list[str], splits: DatasetSplits, cfg: TrainConfig, ctx: DistContext) -> None:
    """Plots and summary.json, from the best weights (``scorer``: network, val loader, batcher).

    Every rank scores its shard of the validation set; rank 0 writes the files."""
    net, val_loader, batcher = scorer
    from cnntrain.plots import plot_confusion_matrix, plot_learning_curves

    run_dir = result.run_dir
    ctx.barrier()  # best.pt is complete before any rank reads it
    best_val: dict[str, Any] = {}
    if val_loader is not None and (run_dir / "best.pt").is_file():
        model.load_state_dict(checkpoint.load(run_dir / "best.pt")["model"])
        best_val = evaluate(net, val_loader, criterion, batcher, len(classes), reduce=ctx.sum)
    if not ctx.is_main:
        return
    plot_learning_curves(result.history, run_dir / "learning_curves.png")
    if best_val:
        plot_confusion_matrix(best_val["confusion"].matrix, classes, run_dir / "confusion_matrix.png")
    summary = {
        "arch": cfg.arch,
        "data": splits.description,
        "classes": classes,
        "train_images": len(splits.train),
        "val_images": len(splits.val),
        "val_images_scored": best_val.get("images"),
        "processes": ctx.world_size,
        "monitor": result.monitor,
        "best_epoch": result.best_epoch,
        "best_metric": result.best_metric,
        "best_val_acc": best_val.get("acc"),
        "best_val_top5": best_val.get("top5"),
        "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early,
        "seconds": round(result.seconds, 2),
        "run_dir": str(run_dir),
        "files": sorted({p.name for p in run_dir.iterdir() if not p.name.startswith(".")} | {"summary.json"}),
    }
    write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
