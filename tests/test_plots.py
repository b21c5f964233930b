"""Plots render to real PNG files without a display."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from cnntrain.plots import plot_confusion_matrix, plot_learning_curves


def _assert_png(path: Path) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 0
    assert not list(path.parent.glob(".*.tmp*")), "temp file left behind"
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
        return im.size


def _rows(n: int, val: bool = True) -> list[dict]:
    return [
        {
            "epoch": e,
            "train_loss": 2.0 / e,
            "train_acc": 1 - 0.5 / e,
            "val_loss": 2.2 / e if val else None,
            "val_acc": 1 - 0.6 / e if val else None,
        }
        for e in range(1, n + 1)
    ]


@pytest.mark.parametrize("epochs", [1, 7])
def test_learning_curves(tmp_path, epochs):
    out = plot_learning_curves(_rows(epochs), tmp_path / "curves.png")
    assert out == tmp_path / "curves.png"
    width, height = _assert_png(out)
    assert width > height > 100


def test_learning_curves_without_validation(tmp_path):
    none_rows = _rows(3, val=False)
    nan_rows = [{**r, "val_loss": math.nan, "val_acc": float("nan")} for r in _rows(3)]
    absent_rows = [{k: v for k, v in r.items() if not k.startswith("val")} for r in _rows(3)]
    some_rows = _rows(4)
    some_rows[1]["val_acc"] = None  # a gap in the middle
    for name, rows in [("none", none_rows), ("nan", nan_rows), ("absent", absent_rows), ("gap", some_rows)]:
        _assert_png(plot_learning_curves(rows, tmp_path / f"{name}.png"))


def test_learning_curves_overwrites_and_creates_folders(tmp_path):
    path = tmp_path / "run" / "plots" / "curves.png"
    plot_learning_curves(_rows(2), str(path))
    first = path.read_bytes()
    plot_learning_curves(_rows(5), path)
    assert path.read_bytes() != first
    _assert_png(path)


def test_confusion_matrix_3_classes(tmp_path):
    matrix = torch.tensor([[5, 1, 0], [2, 3, 0], [0, 0, 0]])  # last row empty: no NaN allowed
    for normalize in (True, False):
        classes = ["cat", "dog", "a long class name"]
        out = plot_confusion_matrix(matrix, classes, tmp_path / f"cm{normalize}.png", normalize=normalize, title="t")
        _assert_png(out)
    _assert_png(plot_confusion_matrix([[1, 0], [0, 1]], ["a", "b"], tmp_path / "list.png"))


def test_confusion_matrix_25_classes(tmp_path):
    g = torch.Generator().manual_seed(0)
    matrix = torch.randint(0, 10, (25, 25), generator=g) + torch.eye(25, dtype=torch.int64) * 50
    classes = [f"class_{i:02d}" for i in range(25)]
    width, height = _assert_png(plot_confusion_matrix(matrix, classes, tmp_path / "cm25.png"))
    assert min(width, height) > 600


def test_confusion_matrix_rejects_mismatch_without_writing(tmp_path):
    with pytest.raises(ValueError):
        plot_confusion_matrix(torch.zeros(3, 3), ["a", "b"], tmp_path / "bad.png")
    with pytest.raises(ValueError):
        plot_confusion_matrix(torch.zeros(2, 3), ["a", "b"], tmp_path / "bad.png")
    assert list(tmp_path.iterdir()) == []


def test_learning_curves_with_no_epochs_still_writes(tmp_path):
    _assert_png(plot_learning_curves([], tmp_path / "empty.png"))


def test_confusion_matrix_many_classes_drops_labels(tmp_path):
    n = 120
    matrix = torch.eye(n, dtype=torch.int64) * 3
    _assert_png(plot_confusion_matrix(matrix, [str(i) for i in range(n)], tmp_path / "cm120.png"))
