"""``cnntrain eval``: score a checkpoint on a labelled dataset.

The checkpoint's class list is the contract. A test set may hold only some of its classes:
labels are mapped to the checkpoint's indices by class name (a folder's own indices shift
when classes are missing), per-class rows and macro-F1 cover the classes with images, and
the confusion matrix keeps every class of the checkpoint. A class the checkpoint does not
know is an error naming it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.nn as nn
from rich.console import Console
from rich.table import Table

from cnntrain import checkpoint
from cnntrain.checkpoint import on_device
from cnntrain.data import (
    DatasetSplits,
    ImageDataset,
    default_workers,
    eval_transform,
    load_data,
    make_loader,
    scan_samples,
)
from cnntrain.engine import EvalResult, evaluate, evaluate_with_tta
from cnntrain.errors import DataError, UsageError
from cnntrain.metrics import classification_report
from cnntrain.runtime import resolve_device


@dataclasses.dataclass(frozen=True)
class DataChoice:
    """Where the images to score come from: the arguments of :func:`cnntrain.data.load_data`."""

    data_path: str | Path | None = None
    dataset: str | None = None
    labels: str | Path | None = None


def data_of(ckpt: dict[str, Any], weights: str | Path, given: DataChoice,
            log: Callable[[str], None] = lambda s: None) -> DataChoice:
    """The data to score: as given, else the data the checkpoint was trained on (when it is still there)."""
    if given.data_path is not None and given.dataset is not None:
        raise UsageError("give --data-path DIR or --dataset NAME, not both")
    if given != DataChoice():
        return given  # load_data refuses --labels with --dataset
    config = ckpt.get("config")
    if not config:
        raise UsageError(f"{weights} does not say what it was trained on; give --data-path DIR or --dataset NAME")
    if config.get("labels"):
        return DataChoice(config.get("data_path"), None, _still_there(config["labels"], "--labels", weights, log))
    if config.get("data_path"):
        return DataChoice(_still_there(config["data_path"], "--data-path", weights, log))
    name = config.get("dataset") or "shapes"  # training's own default
    log(f"no --dataset given: scoring on the built-in dataset {name}, which {weights} was trained on")
    return DataChoice(dataset=name)


def _still_there(path: str, option: str, weights: str | Path, log: Callable[[str], None]) -> Path:
    """The label file or folder ``weights`` was trained on, when it is still there."""
    found = Path(path)
    if not (found.is_file() if option == "--labels" else found.is_dir()):
        raise UsageError(f"no {option} given, and {found}, which {weights} was trained on, is not there any more; "
                         "give --data-path DIR, --labels FILE.csv or --dataset NAME")
    log(f"no {option} given: scoring on {found}, the data {weights} was trained on")
    return found


def checkpoint_splits(ckpt: dict[str, Any], weights: str | Path, given: DataChoice,
                      log: Callable[[str], None] = lambda s: None) -> DatasetSplits:
    """The splits of :func:`data_of`'s data, cut with the checkpoint's own val_split and seed (so "val"
    is what its training held out) and labelled with the checkpoint's class indices, by name.
    eval scores on them; ``export --int8`` calibrates on the train split and checks on val."""
    data = data_of(ckpt, weights, given, log)
    seed = int((ckpt.get("config") or {}).get("seed", 0))
    val_split = float((ckpt.get("config") or {}).get("val_split", 0.1))
    splits = load_data(data.data_path, data.dataset, data.labels, val_split=val_split, seed=seed)
    to_ckpt = _label_map(splits.classes, list(ckpt["classes"]))
    return dataclasses.replace(splits, classes=list(ckpt["classes"]),
                               train=[(path, to_ckpt[label]) for path, label in splits.train],
                               val=[(path, to_ckpt[label]) for path, label in splits.val])


def evaluate_checkpoint(weights: str | Path, *, data_path: str | Path | None = None, dataset: str | None = None,
                        labels: str | Path | None = None, split: str = "val", batch_size: int = 64,
                        workers: int | None = None,
                        device: str = "auto", plot: str | Path | None = None, tta: bool = False,
                        errors: str | Path | None = None, top_losses: str | Path | None = None,
                        reliability: str | Path | None = None, calibration: bool = True, explain: bool = False,
                        log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Score ``weights`` on a split of ``data_path``, ``labels`` or ``dataset`` (none: the checkpoint's own data).

    ``tta`` adds a ``"tta"`` entry: the headline figures once more with test-time augmentation
    (:mod:`cnntrain.tta`), from the same pass, beside the plain ones it leaves untouched.
    The same pass keeps every image's logits for the per-image entries of
    :func:`cnntrain.analysis.figures.answer_report` (calibration, coverage, most confused) and the
    files ``errors`` (csv), ``top_losses`` and ``reliability`` (PNG); they are of the plain scores,
    with the checkpoint's temperature unless ``calibration`` is False. ``explain`` lays each top
    loss's Grad-CAM heatmap (of the predicted class) over it.
    """
    from cnntrain.analysis.answers import AnswerCollector
    from cnntrain.analysis.calibration import stored_temperature
    from cnntrain.analysis.figures import answer_report, check_output

    for path, option, example in ((errors, "--errors", "errors.csv"), (top_losses, "--top-losses", "top_losses.png"),
                                  (reliability, "--reliability", "reliability.png")):
        check_output(path, option, example)
    if explain and top_losses is None:
        raise UsageError("--explain draws Grad-CAM over the top-loss grid: give --top-losses FILE.png too")
    ckpt = checkpoint.require_full(checkpoint.load(weights), weights)
    splits = checkpoint_splits(ckpt, weights, DataChoice(data_path, dataset, labels), log)
    classes: list[str] = list(ckpt["classes"])
    samples = {"val": splits.val, "train": splits.train, "all": splits.train + splits.val}[split]
    scan = scan_samples(samples)
    samples = scan.good
    if not samples:
        raise DataError(f"the {split} split is empty; use --split all or a dataset with held-out images")

    dev = resolve_device(device)
    model, batcher = on_device(ckpt, dev)
    heatmaps = None
    if explain:  # the layer is found, and a missing extra fails, before the pass
        from cnntrain.explain.grid import heatmaps_of

        heatmaps = heatmaps_of(model, batcher, ckpt["img_size"], arch=ckpt["arch"])
    loader = make_loader(ImageDataset(samples, eval_transform(ckpt["img_size"])), batch_size=batch_size,
                         shuffle=False, workers=default_workers() if workers is None else workers, device=dev)
    with_tta: EvalResult | None = None
    answers = AnswerCollector()
    if tta:  # one pass over the loader gives both
        result, with_tta = evaluate_with_tta(model, loader, nn.CrossEntropyLoss(), batcher, len(classes), keep=answers)
    else:
        result = evaluate(model, loader, nn.CrossEntropyLoss(), batcher, len(classes), keep=answers)
    matrix = result.confusion
    rows = classification_report(matrix, classes)
    scored = [row for row in rows if row["support"]]
    report = {
        "weights": str(weights),
        "arch": ckpt["arch"],
        "data": splits.description,
        "split": split,
        "images": result.images,
        "unreadable": [{"path": p, "reason": r} for p, r in scan.bad],
        **_headline(result),  # loss, top1, top5, balanced_acc, macro_f1
        "per_class": scored,  # the classes with images in this split
        "absent_classes": [str(row["class"]) for row in rows if not row["support"]],
        "classes": classes,  # the confusion matrix's rows and columns: all the checkpoint's classes
        "confusion_matrix": matrix.matrix.tolist(),
    }
    if with_tta is not None:
        report["tta"] = _headline(with_tta)
    report.update(answer_report(answers.answers(samples, classes), matrix.matrix, temperature=stored_temperature(ckpt),
                                calibrated=calibration, img_size=ckpt["img_size"], errors=errors,
                                top_losses_png=top_losses, reliability_png=reliability, heatmaps=heatmaps,
                                what=f"{ckpt['arch']} on {result.images} {split} images"))
    if plot is not None:
        from cnntrain.plots import plot_confusion_matrix

        report["plot"] = str(plot_confusion_matrix(matrix.matrix, classes, Path(plot)))
    return report


def _headline(result: EvalResult) -> dict[str, Any]:
    """Loss, top-1, top-5, balanced accuracy and macro-F1 of a result, defined as the report's own
    (``scores()``), so the TTA figures and their differences from the plain ones compare like with like."""
    scores = result.confusion.scores()
    return {"loss": result.loss, "top1": result.acc, "top5": result.top5, "balanced_acc": scores["balanced_acc"],
            "macro_f1": scores["macro_f1"]}


def _label_map(data_classes: list[str], ckpt_classes: list[str]) -> list[int]:
    """The checkpoint's index of each of the dataset's labels, by class name; a name the
    checkpoint does not know is an error (missing ones are fine: a test set may hold a few)."""
    index = {name: i for i, name in enumerate(ckpt_classes)}
    unknown = [name for name in data_classes if name not in index]
    if unknown:
        raise DataError(f"the dataset has {'classes' if len(unknown) > 1 else 'a class'} the checkpoint does not know: "
                        f"{_names(unknown)} (it was trained on {_names(ckpt_classes)})")
    return [index[name] for name in data_classes]


def _names(names: list[str], limit: int = 10) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def report_csv(report: dict[str, Any]) -> str:
    """The report as ``metric,class,value`` lines: the overall figures (class empty; with TTA also
    ``tta_loss``, ``tta_top1``...), then each scored class's precision, recall, F1 and support;
    one shape that awk and pandas both read."""
    from cnntrain.rows import to_csv

    rows = [{"metric": key, "class": "", "value": report[key]}
            for key in ("loss", "top1", "top5", "balanced_acc", "macro_f1") if report[key] is not None]
    rows.append({"metric": "images", "class": "", "value": report["images"]})
    rows += [{"metric": f"tta_{key}", "class": "", "value": value}
             for key, value in (report.get("tta") or {}).items() if value is not None]
    rows += [{"metric": metric, "class": row["class"], "value": row[metric]}
             for row in report["per_class"] for metric in ("precision", "recall", "f1", "support")]
    if "calibration" in report:  # temperature, ECE, confused pairs, coverage (cnntrain.analysis.figures)
        from cnntrain.analysis.figures import answer_csv_rows

        rows += answer_csv_rows(report)
    return to_csv(rows, columns=("metric", "class", "value"))


def _tta_line(report: dict[str, Any]) -> str:
    """The TTA figures, each with its change from the plain one, so the gain is read at a glance."""
    figures = [("loss", "loss"), ("top-1", "top1"), ("top-5", "top5"), ("balanced", "balanced_acc"),
               ("macro-F1", "macro_f1")]
    parts = [f"{name} {report['tta'][key]:.4f} ({report['tta'][key] - report[key]:+.4f})"
             for name, key in figures if report["tta"][key] is not None and report[key] is not None]
    return "with --tta (flip): " + "   ".join(parts)


def format_report(report: dict[str, Any], console: Console) -> None:
    console.print(f"{report['arch']} on {report['data']} ({report['split']}, {report['images']} images)")
    if report["unreadable"]:
        console.print(f"[yellow]skipped {len(report['unreadable'])} unreadable image(s): "
                      + ", ".join(u["path"] for u in report["unreadable"][:5]) + "[/]")
    top5 = f"top-5 {report['top5']:.4f}   " if report["top5"] is not None else ""
    console.print(f"loss {report['loss']:.4f}   top-1 {report['top1']:.4f}   {top5}"
                  f"balanced {report['balanced_acc']:.4f}   macro-F1 {report['macro_f1']:.4f}")
    if report.get("tta"):
        console.print(_tta_line(report))
    table = Table(title="per class")
    for col in ("class", "precision", "recall", "F1", "support"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for row in report["per_class"]:
        table.add_row(str(row["class"]), f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}",
                      str(row["support"]))
    console.print(table)
    if report["absent_classes"]:
        absent = report["absent_classes"]
        console.print(f"no images of {_names(absent)} in this split: {len(absent)} of the checkpoint's "
                      f"{len(report['classes'])} classes not scored (predicting one is still a mistake)")
    classes = report["classes"]
    if len(classes) <= 20:
        cm = Table(title="confusion matrix (rows: true, columns: predicted)")
        cm.add_column("")
        for c in classes:
            cm.add_column(c[:10], justify="right")
        for c, counts in zip(classes, report["confusion_matrix"]):
            cm.add_row(c, *(str(v) for v in counts))
        console.print(cm)
    if "calibration" in report:
        from cnntrain.analysis.figures import format_answer_report

        format_answer_report(report, console)
    if report.get("plot"):
        console.print(f"confusion matrix written to {report['plot']}")
