"""The analysis pictures: ``top_losses.png`` and the reliability diagram.

Drawn like the others (:mod:`cnntrain.plots`: matplotlib's object API on the Agg canvas, written
atomically). This module imports matplotlib, so callers import it inside the function that
draws, keeping ``import cnntrain`` and the CLI's start-up free of it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from cnntrain.analysis.calibration import ReliabilityBins
from cnntrain.analysis.mistakes import Mistake
from cnntrain.plots import new_figure, save_png

COLUMNS = 4


def shown_image(path: str, img_size: int) -> torch.Tensor | None:
    """The image as the model saw it at evaluation: decoded, resized and centre-cropped to
    ``img_size`` (uint8 CHW, before normalisation); None when the file cannot be read now."""
    from cnntrain.data import decode_image, eval_transform
    from cnntrain.errors import DataError

    try:
        return eval_transform(img_size)(decode_image(path))
    except (DataError, OSError):
        return None


def _short(name: str, limit: int = 18) -> str:
    return name if len(name) <= limit else name[:limit - 1] + "…"


def plot_top_losses(mistakes: Sequence[Mistake], img_size: int, path: str | os.PathLike[str], *,
                    scored: int, temperature: float = 1.0,
                    heatmaps: Sequence[torch.Tensor | None] | None = None) -> Path:
    """A grid of the images with the highest loss, worst first, each titled true / predicted /
    probability of the prediction (and the probability the model gave the true class); the
    title of a right answer is green, of a wrong one red. ``scored``: how many images they
    were chosen from. ``heatmaps`` (``eval --explain``): one Grad-CAM map per image, of the
    predicted class, laid over it."""
    rows = max(1, math.ceil(len(mistakes) / COLUMNS))
    height = 2.9 * rows + 0.7
    fig = new_figure(2.6 * COLUMNS, height, layout=None)
    # cells of 2.6 x 2.9 in: a two-line title above each image, a file name below, the heading on top
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.25 / height, top=1 - 0.95 / height, wspace=0.12,
                        hspace=0.62 / 2.2)
    axes = np.atleast_1d(fig.subplots(rows, COLUMNS)).reshape(-1)
    for index, (ax, mistake) in enumerate(zip(axes, mistakes)):
        image = shown_image(mistake.path, img_size)
        heatmap = heatmaps[index] if heatmaps is not None else None
        if image is None:
            ax.text(0.5, 0.5, "unreadable now", ha="center", va="center", transform=ax.transAxes)
        elif heatmap is not None:
            from cnntrain.explain.overlay import overlay

            ax.imshow(overlay(image, heatmap), interpolation="nearest")
        else:
            ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
        wrong = mistake.true != mistake.predicted
        ax.set_title(f"{_short(mistake.true)} / {_short(mistake.predicted)} / {mistake.prob:.2f}\n"
                     f"true class {mistake.true_prob:.2f}, loss {mistake.loss:.2f}", fontsize=8,
                     color="tab:red" if wrong else "tab:green")
        where = Path(mistake.path)
        ax.set_xlabel(_short(f"{where.parent.name}/{where.name}", 32), fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(mistakes):]:
        ax.set_axis_off()
    calibrated = f", temperature {temperature:.2f}" if temperature != 1.0 else ""
    cam = "; Grad-CAM of the predicted class over each" if heatmaps is not None else ""
    fig.suptitle(f"Top {len(mistakes)} losses of {scored} images: true / predicted / probability of the "
                 f"prediction{calibrated}\n(red: wrong answer; as the model saw them, {img_size} px{cam})", fontsize=10)
    return save_png(fig, path)


def plot_reliability(curves: Sequence[tuple[str, ReliabilityBins]], path: str | os.PathLike[str], *,
                     what: str) -> Path:
    """Reliability diagram, one column per curve (e.g. raw and with the temperature): accuracy
    against confidence per bin above the diagonal of perfect calibration, the gap shaded, the
    ECE in the title, and below it how many images each bin holds. ``what``: the images."""
    inches = 5.0 * len(curves)
    fig = new_figure(inches, 6.0, layout=None)  # fixed labels: fixed margins, no layout solver
    grid = fig.add_gridspec(2, len(curves), height_ratios=(3, 1), left=0.65 / inches, right=1 - 0.3 / inches,
                            bottom=0.08, top=0.9, wspace=0.25, hspace=0.28)
    for column, (label, bins) in enumerate(curves):
        ax, hist = fig.add_subplot(grid[0, column]), fig.add_subplot(grid[1, column])
        width = 1.0 / bins.bins
        centres = (np.arange(bins.bins) + 0.5) * width
        accuracy = np.nan_to_num(np.asarray(bins.accuracy, dtype=np.float64))
        confidence = np.asarray(bins.confidence, dtype=np.float64)
        filled = np.asarray(bins.counts) > 0
        ax.bar(centres[filled], accuracy[filled], width=width, edgecolor="black", color="tab:blue",
               label="accuracy of the bin")
        low = np.minimum(confidence, accuracy)[filled]
        ax.bar(centres[filled], np.abs(confidence - accuracy)[filled], bottom=low, width=width, color="tab:red",
               alpha=0.3, edgecolor="tab:red", hatch="//", label="gap to its mean confidence")
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.set_title(f"{label}: ECE {bins.ece:.3f}")
        ax.legend(loc="upper left", fontsize=8)
        hist.bar(centres, bins.counts, width=width, color="tab:grey", edgecolor="black")
        hist.set_xlim(0, 1)
        hist.set_xlabel("confidence (top probability)")
        hist.set_ylabel("images")
    fig.suptitle(f"Reliability: {what}, {bins.bins} bins", fontsize=10)
    return save_png(fig, path)
