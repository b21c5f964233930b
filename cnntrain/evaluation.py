"""``cnntrain eval``: score a checkpoint on a labelled dataset.

The checkpoint's class list is the contract: a dataset whose classes differ is an error
naming them, never a silent re-mapping of label indices.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.nn as nn
from rich.console import Console
from rich.table import Table

from cnntrain import checkpoint
from cnntrain.checkpoint import on_device
from cnntrain.data import (
    ImageDataset,
    default_workers,
    eval_transform,
    load_builtin,
    load_folder,
    make_loader,
    scan_samples,
)
from cnntrain.engine import evaluate
from cnntrain.errors import DataError, UsageError
from cnntrain.metrics import classification_report
from cnntrain.runtime import resolve_device


def evaluate_checkpoint(weights: str | Path, *, data_path: str | Path | None = None, dataset: str | None = None,
                        split: str = "val", batch_size: int = 64, workers: int | None = None,
                        device: str = "auto", plot: str | Path | None = None) -> dict[str, Any]:
    if (data_path is None) == (dataset is None):
        raise UsageError("give exactly one of --data-path DIR or --dataset NAME")
    ckpt = checkpoint.require_full(checkpoint.load(weights), weights)
    seed = int((ckpt.get("config") or {}).get("seed", 0))
    val_split = float((ckpt.get("config") or {}).get("val_split", 0.1))
    if data_path is not None:
        splits = load_folder(data_path, val_split=val_split, seed=seed)
    else:
        assert dataset is not None
        splits = load_builtin(dataset, val_split=val_split, seed=seed)
    if splits.classes != ckpt["classes"]:
        only_data = sorted(set(splits.classes) - set(ckpt["classes"]))
        only_ckpt = sorted(set(ckpt["classes"]) - set(splits.classes))
        detail = "; ".join(filter(None, [
            f"only in the data: {', '.join(only_data)}" if only_data else "",
            f"only in the checkpoint: {', '.join(only_ckpt)}" if only_ckpt else "",
        ])) or "same names in another order"
        raise DataError(f"the dataset's classes differ from the checkpoint's ({detail})")
    samples = {"val": splits.val, "train": splits.train, "all": splits.train + splits.val}[split]
    scan = scan_samples(samples)
    samples = scan.good
    if not samples:
        raise DataError(f"the {split} split is empty; use --split all or a dataset with held-out images")

    dev = resolve_device(device)
    model, batcher = on_device(ckpt, dev)
    loader = make_loader(ImageDataset(samples, eval_transform(ckpt["img_size"])), batch_size=batch_size,
                         shuffle=False, workers=default_workers() if workers is None else workers, device=dev)
    result = evaluate(model, loader, nn.CrossEntropyLoss(), batcher, len(ckpt["classes"]))
    matrix = result.confusion
    report = {
        "weights": str(weights),
        "arch": ckpt["arch"],
        "data": splits.description,
        "split": split,
        "images": result.images,
        "unreadable": [{"path": p, "reason": r} for p, r in scan.bad],
        "loss": result.loss,
        "top1": result.acc,
        "top5": result.top5,
        "macro_f1": matrix.macro_f1(),
        "per_class": classification_report(matrix, ckpt["classes"]),
        "classes": ckpt["classes"],
        "confusion_matrix": matrix.matrix.tolist(),
    }
    if plot is not None:
        from cnntrain.plots import plot_confusion_matrix

        report["plot"] = str(plot_confusion_matrix(matrix.matrix, ckpt["classes"], Path(plot)))
    return report


def format_report(report: dict[str, Any], console: Console) -> None:
    console.print(f"{report['arch']} on {report['data']} ({report['split']}, {report['images']} images)")
    if report["unreadable"]:
        console.print(f"[yellow]skipped {len(report['unreadable'])} unreadable image(s): "
                      + ", ".join(u["path"] for u in report["unreadable"][:5]) + "[/]")
    console.print(f"loss {report['loss']:.4f}   top-1 {report['top1']:.4f}   top-5 {report['top5']:.4f}   "
                  f"macro-F1 {report['macro_f1']:.4f}")
    table = Table(title="per class")
    for col in ("class", "precision", "recall", "F1", "support"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for row in report["per_class"]:
        table.add_row(str(row["class"]), f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}",
                      str(row["support"]))
    console.print(table)
    classes = report["classes"]
    if len(classes) <= 20:
        cm = Table(title="confusion matrix (rows: true, columns: predicted)")
        cm.add_column("")
        for c in classes:
            cm.add_column(c[:10], justify="right")
        for c, counts in zip(classes, report["confusion_matrix"]):
            cm.add_row(c, *(str(v) for v in counts))
        console.print(cm)
    if report.get("plot"):
        console.print(f"confusion matrix written to {report['plot']}")
