"""``cnntrain predict``, ``eval`` and ``export``: the commands that start from a trained checkpoint."""

# One option per line: the signatures read as tables of options.
# ruff: noqa: E501

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from cnntrain.choices import (
    EVAL_FORMATS,
    EVAL_SPLITS,
    EXPORT_FORMATS,
    PREDICT_FORMATS,
)
from cnntrain.cli.app import Opt, check_choice, command, err, one_of, out
from cnntrain.errors import UsageError


def _weights_or_latest(weights: Path | None, project: str) -> Path:
    """``--weights``, or best.pt of the latest run, saying so on stderr."""
    from cnntrain.checkpoint import resolve_weights

    path, was_default = resolve_weights(weights, project)
    if was_default:
        err.print(f"using {path} (the latest run); pass --weights to choose another")
    return path


# --------------------------------------------------------------------------- predict


@command()
def predict(
    inputs: Annotated[list[str], typer.Argument(metavar="IMAGE", help="Images, folders or globs (quote globs: 'imgs/*.jpg').")],
    weights: Annotated[Path | None, Opt(help="Checkpoint, or an export from `cnntrain export` (.onnx, or TorchScript) with its .json sidecar (default: best.pt of runs/latest). A TorchScript file is a program that runs when loaded: use only your own or ones you trust (checkpoints load as data, ONNX runs no Python).")] = None,
    topk: Annotated[int, Opt(help="Classes to show per image.")] = 5,
    fmt: Annotated[str, Opt("--format", help=f"{one_of(PREDICT_FORMATS)}.")] = "table",
    batch_size: Annotated[int, Opt(help="Images per forward pass.")] = 32,
    tta: Annotated[bool, Opt("--tta", help="Test-time augmentation: average the probabilities of each image and its mirror image (two forward passes).")] = False,
    min_confidence: Annotated[float | None, Opt("--min-confidence", metavar="P", help="Answer 'unknown' for an image whose top probability is below P (0-1); `cnntrain eval` shows the answers kept and their accuracy at each P.")] = None,
    calibration: Annotated[bool, Opt("--calibration/--no-calibration", help="Divide the logits by the temperature training stored (best.pt, or the export's sidecar); --no-calibration shows the raw softmax.")] = True,
    device: Annotated[str, Opt(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    project: Annotated[str, Opt(help="Where runs live (for the default weights).")] = "runs",
) -> None:
    """Classify images with a trained checkpoint; exit code 1 if any image could not be read."""
    from cnntrain.predict import check_confidence, format_predictions, predict_files

    check_choice("--format", fmt, PREDICT_FORMATS)
    check_confidence(min_confidence)  # before the weights are looked for
    rows = predict_files(inputs, _weights_or_latest(weights, project), topk=topk, batch_size=batch_size,
                         device=device, tta=tta, calibrated=calibration, min_confidence=min_confidence)
    if fmt == "table":
        _print_prediction_table(rows)
    else:
        print(format_predictions(rows, fmt), end="")
    if any(r.get("error") for r in rows):
        raise typer.Exit(1)


def _print_prediction_table(rows: list[dict]) -> None:
    from rich.table import Table

    table = Table(show_lines=False)
    table.add_column("image", overflow="fold")
    table.add_column("prediction")
    table.add_column("prob", justify="right")
    table.add_column("next", overflow="fold")
    for r in rows:
        if r["error"]:
            table.add_row(r["path"], "[red]error[/]", "", escape(r["error"]))
            continue
        top, rest = r["predictions"][0], r["predictions"][1:]
        if r["answer"] != top["class"]:  # --min-confidence: unsure, with its best guesses
            table.add_row(r["path"], f"[yellow]{r['answer']}[/]", f"{top['prob']:.3f}",
                          "best guesses " + ", ".join(f"{p['class']} {p['prob']:.3f}" for p in r["predictions"]))
            continue
        table.add_row(r["path"], top["class"], f"{top['prob']:.3f}",
                      ", ".join(f"{p['class']} {p['prob']:.3f}" for p in rest))
    out.print(table)


# --------------------------------------------------------------------------- eval


@command("eval")
def eval_(
    weights: Annotated[Path | None, Opt(help="Checkpoint (default: best.pt of runs/latest).")] = None,
    data_path: Annotated[Path | None, Opt("--data-path", "--data", help="ImageFolder root (or train/ + val/) (default: the data the checkpoint was trained on).")] = None,
    labels: Annotated[Path | None, Opt(help="CSV of path,label[,split] rows instead of class folders; paths relative to the CSV, or to --data-path DIR when given (default: the checkpoint's own label file, if it was trained on one).")] = None,
    dataset: Annotated[str | None, Opt(help="Built-in dataset: shapes, flowers, cifar10, cifar100.")] = None,
    split: Annotated[str, Opt(help=f"{one_of(EVAL_SPLITS)}.")] = "val",
    fmt: Annotated[str, Opt("--format", help=f"{one_of(EVAL_FORMATS)}.")] = "table",
    plot: Annotated[Path | None, Opt(help="Also write the confusion matrix as a PNG here.")] = None,
    batch_size: Annotated[int, Opt(help="Images per forward pass.")] = 64,
    tta: Annotated[bool, Opt("--tta", help="Also score with test-time augmentation (each image and its mirror image, probabilities averaged) and show what it changes; the plain figures stay as they are.")] = False,
    errors: Annotated[Path | None, Opt(help="Write every misclassified file to this CSV: path, true, predicted, prob, true_prob, loss (most confident mistakes first).")] = None,
    top_losses: Annotated[Path | None, Opt("--top-losses", help="Write a PNG grid of the 16 images with the highest loss, titled true / predicted / probability.")] = None,
    reliability: Annotated[Path | None, Opt(help="Write the reliability diagram (accuracy against confidence, raw and with the checkpoint's temperature) as a PNG.")] = None,
    calibration: Annotated[bool, Opt("--calibration/--no-calibration", help="Divide the logits by the temperature training stored in the checkpoint; --no-calibration shows the raw softmax.")] = True,
    explain: Annotated[bool, Opt("--explain", help="Lay each top loss's Grad-CAM heatmap (of the predicted class) over it, in the --top-losses grid (needs the explain extra).")] = False,
    workers: Annotated[int | None, Opt(help="DataLoader worker processes.")] = None,
    device: Annotated[str, Opt(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    project: Annotated[str, Opt(help="Where runs live (for the default weights).")] = "runs",
) -> None:
    """Loss, top-1/top-5, per-class precision/recall/F1, the confusion matrix and its most-confused pairs, and the calibration (ECE) of a checkpoint."""
    from cnntrain.evaluation import evaluate_checkpoint, format_report, report_csv

    check_choice("--format", fmt, EVAL_FORMATS)
    check_choice("--split", split, EVAL_SPLITS)
    if batch_size < 1:  # before the checkpoint and the data are read
        raise UsageError("--batch-size must be at least 1")
    report = evaluate_checkpoint(_weights_or_latest(weights, project), data_path=data_path, dataset=dataset,
                                 labels=labels, split=split, batch_size=batch_size, workers=workers, device=device, plot=plot,
                                 tta=tta, errors=errors, top_losses=top_losses, reliability=reliability,
                                 calibration=calibration, explain=explain, log=lambda s: err.print(escape(s)))
    if fmt == "json":
        print(json.dumps(report, indent=2))
    elif fmt == "csv":
        print(report_csv(report), end="")
    else:
        format_report(report, out)


# --------------------------------------------------------------------------- export


@command()
def export(
    weights: Annotated[Path | None, Opt(help="Checkpoint to export (default: best.pt of runs/latest).")] = None,
    fmt: Annotated[str, Opt("--format", help=f"{one_of(EXPORT_FORMATS)}.")] = "onnx",
    output: Annotated[Path | None, Opt("--output", "-o", help="Exported file (default: beside the checkpoint, best.onnx / best.torchscript.pt); the sidecar is this name + .json.")] = None,
    dynamic_batch: Annotated[bool, Opt("--dynamic-batch", help="Accept any batch size (default: exactly 1 image per call).")] = False,
    opset: Annotated[int | None, Opt(help="ONNX opset version (default: 17).")] = None,
    int8: Annotated[bool, Opt("--int8", help="Statically quantized int8 ONNX for the CPU (default file best.int8.onnx), calibrated on training images; kept only if its top-1 agrees with fp32 on the validation images (99% unless --accept-drop); the agreement and the measured speed-up go in the sidecar.")] = False,
    calib_images: Annotated[int | None, Opt(help="With --int8: training images to calibrate on (default: 200).")] = None,
    accept_drop: Annotated[float | None, Opt(help="With --int8: the fraction of images whose top-1 may change, e.g. 0.02 (default: 0.01).")] = None,
    data_path: Annotated[Path | None, Opt("--data-path", "--data", help="With --int8: ImageFolder root to calibrate (train split) and check (val split) on (default: the data the checkpoint was trained on).")] = None,
    project: Annotated[str, Opt(help="Where runs live (for the default weights).")] = "runs",
) -> None:
    """Export a checkpoint to ONNX or TorchScript (uint8 RGB in, logits out) plus a JSON sidecar; verified against PyTorch."""
    from cnntrain.export import export_checkpoint
    from cnntrain.int8 import check_int8_request, describe, export_int8

    check_choice("--format", fmt, EXPORT_FORMATS)
    check_int8_request(fmt, calib_images, accept_drop, int8)
    if data_path is not None and not int8:
        raise UsageError("--data-path goes with --int8 (the images to calibrate and check on)")
    path = _weights_or_latest(weights, project)
    if int8:
        result = export_int8(path, output, calib_images=calib_images, accept_drop=accept_drop, data_path=data_path,
                             dynamic_batch=dynamic_batch, opset=opset, log=lambda s: err.print(escape(s)))
    else:
        result = export_checkpoint(path, fmt, output, dynamic_batch=dynamic_batch, opset=opset)
    size_mb = result.path.stat().st_size / 1e6
    out.print(f"exported {result.path} ({size_mb:.1f} MB, {result.seconds:.1f}s), sidecar {result.sidecar}")
    out.print(f"verified against PyTorch on batch sizes {', '.join(map(str, result.batch_sizes))}: "
              f"max |logit difference| {result.max_abs_diff:.2e} (allowed {result.allowed:.1e})"
              + (" (the fp32 graph, before quantization)" if int8 else ""))
    for line in describe(result.int8) if int8 else ():
        out.print(line)
