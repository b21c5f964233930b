"""``--tensorboard``: each epoch's losses, accuracies, learning rate and confusion matrix for
TensorBoard, in ``RUN/tensorboard/`` (``tensorboard --logdir runs`` shows every run side by side).

An epoch-end reporter like ``runfiles.MetricsCsv``, written with torch's own
``torch.utils.tensorboard.SummaryWriter``; the ``tensorboard`` package it needs is the optional
extra ``cnntrain[tensorboard]``, checked when the configuration is (``TrainConfig.validate``), so
a missing extra stops the run before any data is read. The writer opens at the first epoch's
end (only rank 0 reports, so only rank 0 ever creates the folder), flushes after every epoch,
so a killed run keeps what it logged, and appends on resume: the steps are epoch numbers, and a
resumed run's curves continue where they stopped.
"""

from __future__ import annotations

import math
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from cnntrain.engine import EvalResult
from cnntrain.errors import missing_extra

LOG_DIR = "tensorboard"  # inside the run folder

#: TensorBoard tag -> column of the epoch's row (metrics.csv's names); a missing or None value is skipped.
SCALARS = {
    "loss/train": "train_loss", "loss/val": "val_loss", "loss/val_ema": "val_loss_ema",
    "accuracy/train": "train_acc", "accuracy/val": "val_acc", "accuracy/val_top5": "val_top5",
    "accuracy/val_ema": "val_acc_ema", "lr": "lr",
}
CONFUSION_TAG = "confusion_matrix"


class TensorBoardLog:
    """Epoch-end reporter: scalars and the validation confusion matrix as TensorBoard events."""

    def __init__(self, run_dir: Path, classes: list[str]) -> None:
        self.log_dir = run_dir / LOG_DIR
        self.classes = classes
        self.writer: Any = None

    def epoch_end(self, row: dict[str, Any], history: list[dict[str, Any]], val: EvalResult | None) -> None:
        writer = self._open()
        step = int(row["epoch"])
        for tag, key in SCALARS.items():
            value = row.get(key)
            if value is not None and math.isfinite(value):
                writer.add_scalar(tag, float(value), step)
        if val is not None:
            from cnntrain.plots import confusion_matrix_figure

            figure = confusion_matrix_figure(val.confusion.matrix, self.classes, epoch=step)
            writer.add_image(CONFUSION_TAG, figure_pixels(figure), step, dataformats="HWC")
        writer.flush()

    def _open(self) -> Any:
        if self.writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # a TrainConfig made without validate(), which checks this first
                raise missing_extra("--tensorboard", "the tensorboard package", "tensorboard") from None
            self.writer = SummaryWriter(log_dir=str(self.log_dir))
            # Closed when the reporter goes (the run is over) or at exit; every epoch is flushed anyway.
            weakref.finalize(self, self.writer.close)
        return self.writer


def figure_pixels(figure: Any) -> np.ndarray:
    """A matplotlib figure rendered by its Agg canvas as ``H x W x 3`` uint8 (no pyplot), then freed."""
    canvas = figure.canvas
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    figure.clear()
    return pixels
