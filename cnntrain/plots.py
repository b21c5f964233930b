"""Learning curves and confusion-matrix heatmaps written as PNG files.

Figures are built with matplotlib's object API (``matplotlib.figure.Figure``) and rendered by
the Agg canvas, never through pyplot: no display is needed (servers, CI, torchrun workers), the
caller's own pyplot backend (e.g. in a notebook) is left alone, and no figure stays registered
in pyplot's global list to leak memory or race between threads. Files are written atomically
so a crash never leaves a half-written PNG where a previous good one was.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from cnntrain.fileio import atomic_open

__all__ = ["confusion_matrix_figure", "plot_confusion_matrix", "plot_learning_curves", "plot_lr_find"]

ANNOTATE_MAX_CLASSES = 20  # above this, cell numbers become unreadable
LABEL_MAX_CLASSES = 100  # above this, tick labels overlap whatever the font size
MARKER_MAX_EPOCHS = 50  # markers make a 1-epoch run visible, but clutter long ones


def new_figure(width: float, height: float, layout: Literal["constrained"] | None = "constrained") -> Figure:
    """A figure on its own Agg canvas (no pyplot state). ``layout=None`` where the margins are known
    in advance (grids of equal cells, axes whose labels have a known length): the constrained-layout
    solver draws the figure an extra time and costs about 0.4 s of a figure's 1 s."""
    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: str | os.PathLike[str], dpi: int = 120) -> Path:
    """Render ``fig`` into ``path`` through :func:`cnntrain.fileio.atomic_open` (fsynced temp file,
    then rename), so a crash leaves the previous PNG, never half of one; then free the figure."""
    path = Path(path)
    try:
        with atomic_open(path, "wb") as f:
            fig.savefig(f, format="png", dpi=dpi)
    finally:
        fig.clear()
    return path


def _as_float(value: Any) -> float:
    """None, missing, NaN and tensors all become a float (NaN breaks the line there)."""
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _series(rows: Sequence[Mapping[str, Any]], key: str, scale: float = 1.0) -> np.ndarray:
    return np.array([_as_float(r.get(key)) * scale for r in rows], dtype=np.float64)


def plot_learning_curves(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Loss and accuracy per epoch, train and validation, side by side; returns the PNG path.

    ``rows`` are the per-epoch records the trainer logs (``epoch``, ``train_loss``,
    ``train_acc``, ``val_loss``, ``val_acc``; accuracies as fractions 0..1, drawn as %).
    Missing, None or NaN values leave gaps; a series with no value at all is not drawn, so a
    run without validation shows train lines only.
    """
    epochs = np.array([_as_float(r.get("epoch", i + 1)) for i, r in enumerate(rows)], dtype=np.float64)
    epochs = np.where(np.isnan(epochs), np.arange(1, len(rows) + 1), epochs)
    marker = "o" if len(rows) <= MARKER_MAX_EPOCHS else None

    fig = new_figure(11, 4.2, layout=None)  # labels of known length: fixed margins, no layout solver
    ax_loss, ax_acc = fig.subplots(1, 2, gridspec_kw={"left": 0.08, "right": 0.99, "bottom": 0.12, "top": 0.92,
                                                      "wspace": 0.2})
    panels = ((ax_loss, "loss", 1.0, "Loss"), (ax_acc, "acc", 100.0, "Accuracy (%)"))
    for ax, metric, scale, ylabel in panels:
        for split, colour in (("train", "tab:blue"), ("val", "tab:orange")):
            values = _series(rows, f"{split}_{metric}", scale)
            if values.size == 0 or np.isnan(values).all():
                continue
            ax.plot(epochs, values, label=split, color=colour, marker=marker, markersize=3, linewidth=1.5)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(ylabel.split(" ")[0])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(rows) and epochs.min() == epochs.max():  # one epoch: avoid ticks like 0.975, 1.025
            ax.set_xlim(epochs[0] - 1, epochs[0] + 1)
        ax.grid(True, alpha=0.3)
        if ax.get_lines():
            ax.legend()

    ax_loss.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))  # short tick labels fit the margin
    val_acc = _series(rows, "val_acc", 100.0)
    if val_acc.size and not np.isnan(val_acc).all():
        best = int(np.nanargmax(val_acc))
        ax_acc.plot(epochs[best], val_acc[best], marker="*", markersize=12, color="tab:red", linestyle="none")
        ax_acc.set_title(f"Accuracy (best val {val_acc[best]:.2f}% at epoch {epochs[best]:g})")
    return save_png(fig, path)


def plot_confusion_matrix(
    matrix: torch.Tensor | np.ndarray | Sequence[Sequence[float]],
    classes: Sequence[str],
    path: str | os.PathLike[str],
    normalize: bool = True,
    title: str | None = None,
    epoch: int | None = None,
) -> Path:
    """:func:`confusion_matrix_figure` written as a PNG; returns its path."""
    return save_png(confusion_matrix_figure(matrix, classes, normalize, title, epoch), path)


def confusion_matrix_figure(
    matrix: torch.Tensor | np.ndarray | Sequence[Sequence[float]],
    classes: Sequence[str],
    normalize: bool = True,
    title: str | None = None,
    epoch: int | None = None,
) -> Figure:
    """Heatmap of true (rows) against predicted (columns) classes (a PNG file, or TensorBoard's image).

    With ``normalize`` each row is divided by its total, so the diagonal reads as per-class
    recall and rare classes are as visible as common ones (a row with no samples stays 0);
    each cell then shows its count under the fraction, because 1.00 of 2 images and 1.00 of
    200 are not the same evidence. Cells are annotated when there are at most 20 classes; tick
    labels are dropped above 100. The title says how many images (and which ``epoch``) it sums.
    """
    counts = torch.as_tensor(matrix).detach().to("cpu", torch.float64).numpy()
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"a confusion matrix must be square, got shape {counts.shape}")
    n = counts.shape[0]
    if len(classes) != n:
        raise ValueError(f"{len(classes)} class names for a {n}-class confusion matrix")
    if normalize:
        totals = counts.sum(axis=1, keepdims=True)
        values = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
        vmax = 1.0
    else:
        values = counts
        vmax = max(float(counts.max(initial=0.0)), 1.0)
    if title is None:
        what = f"{int(counts.sum()):,} images" + (f", epoch {epoch}" if epoch is not None else "")
        title = f"Confusion matrix, {what}" + ("\n(colour and upper number: fraction of the true class)"
                                               if normalize else "")

    side = min(max(5.0, 0.45 * n + 3.0), 30.0)
    fig = new_figure(side + 1.2, side)
    ax = fig.subplots()
    image = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=vmax, interpolation="nearest")
    # No fraction=/pad= here: under constrained layout they push the y label off the canvas.
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set_title(title)
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")

    if n <= LABEL_MAX_CLASSES:
        fontsize = 9 if n <= ANNOTATE_MAX_CLASSES else max(4, 9 - n // 20)
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        ax.set_xticklabels(classes, rotation=45, ha="right", rotation_mode="anchor", fontsize=fontsize)
        ax.set_yticklabels(classes, fontsize=fontsize)
    else:
        ax.set_xticks([])
        ax.set_yticks([])

    if n <= ANNOTATE_MAX_CLASSES:
        threshold = vmax / 2
        for i in range(n):
            for j in range(n):
                v = values[i, j]
                count = int(round(counts[i, j]))
                text = f"{v:.2f}\n{count}" if normalize else f"{count}"
                colour = "white" if v > threshold else "black"
                ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=8)
    return fig


class LrCurve(Protocol):
    """What :func:`plot_lr_find` draws: ``cnntrain.train.lr_find.LrFindResult`` (named by its
    fields, so the pictures module imports nothing of the trainer)."""

    @property
    def lrs(self) -> Sequence[float]: ...
    @property
    def losses(self) -> Sequence[float]: ...
    @property
    def smoothed(self) -> Sequence[float]: ...
    @property
    def suggestion(self) -> float: ...
    @property
    def method(self) -> str: ...
    @property
    def diverged(self) -> bool: ...


def plot_lr_find(result: LrCurve, path: str | os.PathLike[str]) -> Path:
    """Training loss against the learning rate of a range test, lr on a log axis; returns the PNG path.

    Each batch's loss is drawn faintly under the smoothed loss the suggestion is read from; a
    dashed line marks the suggested rate, its value and rule in the legend. The loss axis ends a
    little above the curve before its minimum, so the blow-up that ends a diverged test does not
    squash the part worth reading into a flat line."""
    lrs = np.asarray(result.lrs, dtype=np.float64)
    losses = np.asarray(result.losses, dtype=np.float64)
    smoothed = np.asarray(result.smoothed, dtype=np.float64)
    fig = new_figure(8, 4.8)
    ax = fig.subplots()
    ax.plot(lrs, losses, color="tab:blue", alpha=0.3, linewidth=1, label="loss of each batch")
    ax.plot(lrs, smoothed, color="tab:blue", linewidth=2, label="smoothed loss")
    ax.axvline(result.suggestion, color="tab:red", linestyle="--", linewidth=1.5,
               label=f"suggested lr {result.suggestion:.2e} ({result.method})")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    if lrs.size:
        end = "stopped early: the loss diverged" if result.diverged else f"up to {lrs[-1]:.0e}"
        ax.set_title(f"Learning-rate range test: {lrs.size} steps from {lrs[0]:.0e}, {end}")
        best = int(np.argmin(smoothed))
        low = min(losses.min(), smoothed.min())
        high = max(smoothed[: best + 1].max(), np.percentile(losses[: best + 1], 95))
        span = (high - low) or abs(high) or 1.0
        ax.set_ylim(low - 0.05 * span, high + 0.15 * span)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return save_png(fig, path)
