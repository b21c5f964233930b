"""What a run writes besides its checkpoints: config, class names, metrics.csv, plots, summary.json.

Every file is written atomically, and a failed write (disk full, I/O error) is a one-line
error that leaves the previous file as it was. Under torchrun only rank 0 writes.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnntrain import checkpoint, fileio
from cnntrain.data import DatasetSplits
from cnntrain.engine import EvalResult
from cnntrain.metrics import classification_report
from cnntrain.report import REPORT_NAME, write_report
from cnntrain.train.distributed import DistContext
from cnntrain.train.state import TrainResult

if TYPE_CHECKING:
    from cnntrain.analysis.run_end import RunAnalysis

LEAK_PAIRS = 50  # train/val leak pairs listed in summary.json (all are counted); check-data lists them all
METRIC_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_top5", "lr", "seconds",
                  "images_per_s", "val_loss_ema", "val_acc_ema"]  # the last two: with --ema only


def write_text(path: Path, text: str) -> None:
    """Atomic write whose failure (disk full, I/O error) is a one-line error, not a traceback."""
    with checkpoint.write_errors_reported(path):
        fileio.atomic_write_text(path, text)


def write_metrics_csv(path: Path, history: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in METRIC_COLUMNS})
    write_text(path, buf.getvalue())


class MetricsCsv:
    """Epoch-end reporter: the whole history as ``metrics.csv``, rewritten atomically each epoch."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def epoch_end(self, row: dict[str, Any], history: list[dict[str, Any]], val: EvalResult | None) -> None:
        write_metrics_csv(self.path, history)


def write_run_description(run_dir: Path, config_yaml: str, classes: list[str]) -> None:
    """config.yaml (reruns the run with ``--config``) and class_indices.json (index -> class name)."""
    write_text(run_dir / "config.yaml", config_yaml)
    write_text(run_dir / "class_indices.json", json.dumps({str(i): c for i, c in enumerate(classes)}, indent=2))


def draw_plots(run_dir: Path, history: list[dict[str, Any]], classes: list[str], best_val: EvalResult | None,
               best_epoch: int) -> None:
    """learning_curves.png and, given the best epoch's validation, confusion_matrix.png. Drawn when a
    run finishes and when it is interrupted, so a stopped run can be judged before it is resumed."""
    from cnntrain.plots import plot_confusion_matrix, plot_learning_curves

    if history:
        plot_learning_curves(history, run_dir / "learning_curves.png")
    if best_val is not None:
        plot_confusion_matrix(best_val.confusion.matrix, classes, run_dir / "confusion_matrix.png", epoch=best_epoch)


def finish(result: TrainResult, best_val: EvalResult | None, splits: DatasetSplits, arch: str,
           ctx: DistContext, analysis: RunAnalysis | None = None) -> None:
    """Plots and summary.json of a finished run; ``best_val``: the best weights on the validation set,
    ``analysis``: what the same pass said about them (temperature, most confused, top losses)."""
    if not ctx.is_main:
        return
    run_dir = result.run_dir
    draw_plots(run_dir, result.history, splits.classes, best_val, result.best_epoch)
    summary = {
        "arch": arch,
        "data": splits.description,
        "classes": splits.classes,
        "train_images": len(splits.train),
        "val_images": len(splits.val),
        "val_images_scored": best_val.images if best_val else None,
        "processes": ctx.world_size,
        "monitor": result.monitor,
        "best_epoch": result.best_epoch,
        "best_metric": result.best_metric,
        "best_val_acc": best_val.acc if best_val else None,
        "best_val_top5": best_val.top5 if best_val else None,
        # beside accuracy, the two figures that weigh every class alike (imbalanced data)
        "best_val_balanced_acc": result.best_scores["balanced_acc"] if result.best_scores else None,
        "best_val_macro_f1": result.best_scores["macro_f1"] if result.best_scores else None,
        "best_weights_averaged": result.best_is_ema,  # --ema: best.pt holds the average of the weights
        "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early,
        "seconds": round(result.seconds, 2),
        "run_dir": str(run_dir),
        "files": sorted({p.name for p in run_dir.iterdir() if not p.name.startswith(".")}
                        | {"summary.json", REPORT_NAME}),
    }
    if result.leaks is not None:  # checked before the first epoch: byte copies of training images in val
        summary["train_val_leaks"] = len({val for _, val in result.leaks})
        summary["train_val_leak_pairs"] = [{"train": a, "val": b} for a, b in result.leaks[:LEAK_PAIRS]]
    if best_val is not None:  # the report's per-class table, and scripts', without loading best.pt
        summary["per_class"] = classification_report(best_val.confusion, splits.classes)
        summary["confusion_matrix"] = best_val.confusion.matrix.tolist()
    if analysis is not None:  # temperature, calibration, most_confused, top_losses (RunAnalysis.summary)
        summary.update(analysis.summary())
    write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    write_report(run_dir)
