"""``cnntrain eval``'s per-image figures: calibration, coverage, most-confused pairs, errors, top losses.

:func:`answer_report` turns the answers of eval's one pass into the report's entries (the keys
are listed in its docstring and in README, "cnntrain eval") and writes the files asked for;
:func:`answer_csv_rows` and :func:`format_answer_report` are their csv and table forms.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from cnntrain import checkpoint, fileio
from cnntrain.analysis.answers import Answers
from cnntrain.analysis.calibration import ECE_BINS, coverage, expected_calibration_error, nll
from cnntrain.analysis.mistakes import errors_csv, misclassified, most_confused, top_losses
from cnntrain.errors import UsageError

#: ``(paths, class indices) -> a heatmap per image (None: unreadable)``, e.g. Grad-CAM's
#: (:func:`cnntrain.explain.grid.heatmaps_of`), laid over the top-loss grid.
Heatmaps = Callable[[Sequence[str], Sequence[int]], list[torch.Tensor | None]]


def check_output(path: str | Path | None, option: str, example: str) -> None:
    """A file eval is asked to write must be writable where it is named: checked before any work."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{option} {path} is a folder; give a file name, e.g. {path / example}")
    if not path.parent.is_dir():
        raise UsageError(f"{option} {path}: the folder {path.parent} does not exist")


def answer_report(answers: Answers, matrix: torch.Tensor, *, temperature: float | None, calibrated: bool,
                  img_size: int, what: str, errors: str | Path | None = None, top_losses_png: str | Path | None = None,
                  reliability_png: str | Path | None = None, heatmaps: Heatmaps | None = None) -> dict[str, Any]:
    """The report's per-image entries; probabilities are divided by ``temperature`` when ``calibrated``.

    - ``calibration``: ``temperature`` (the checkpoint's, 1.0 without one), ``from_checkpoint``,
      ``applied`` (False with --no-calibration), ``bins``, ``ece_raw``/``ece_calibrated`` and
      ``nll_raw``/``nll_calibrated`` (before and after the temperature; equal without one);
    - ``coverage``: ``[{min_confidence, answered, accuracy, wrong_kept}]``: at each threshold the
      share of images a ``predict --min-confidence`` would answer, and the accuracy of those answers;
    - ``most_confused``: ``[{true, predicted, count}]``, largest first (the 10 largest);
    - ``misclassified``: how many images the top answer got wrong;
    - ``errors``, ``top_losses``, ``reliability``: the files written, when asked for; ``heatmaps``
      (``eval --explain``, :func:`cnntrain.explain.grid.heatmaps_of`) lays Grad-CAM over the top losses."""
    t = temperature or 1.0
    used = t if calibrated else 1.0
    probs = answers.probs(used)
    report: dict[str, Any] = {
        "calibration": {
            "temperature": t, "from_checkpoint": temperature is not None, "applied": calibrated, "bins": ECE_BINS,
            "ece_raw": expected_calibration_error(answers.probs(), answers.targets),
            "ece_calibrated": expected_calibration_error(answers.probs(t), answers.targets),
            "nll_raw": nll(answers.logits, answers.targets), "nll_calibrated": nll(answers.logits, answers.targets, t),
        },
        "coverage": [{"min_confidence": c.threshold, "answered": c.answered, "accuracy": c.accuracy,
                      "wrong_kept": c.wrong_kept} for c in coverage(probs, answers.targets)],
        "most_confused": [pair.as_dict() for pair in most_confused(matrix, answers.classes)],
        "misclassified": int((probs.argmax(1) != answers.targets).sum()),
    }
    _write_files(report, answers, used, img_size, what, errors, top_losses_png, reliability_png, heatmaps)
    return report


def _write_files(report: dict[str, Any], answers: Answers, used: float, img_size: int, what: str,
                 errors: str | Path | None, top_losses_png: str | Path | None,
                 reliability_png: str | Path | None, heatmaps: Heatmaps | None) -> None:
    if errors is not None:
        with checkpoint.write_errors_reported(errors):
            fileio.atomic_write_text(Path(errors), errors_csv(misclassified(answers, used)))
        report["errors"] = str(errors)
    if top_losses_png is None and reliability_png is None:
        return
    from cnntrain.analysis.calibration import reliability
    from cnntrain.analysis.pictures import plot_reliability, plot_top_losses

    if top_losses_png is not None:
        worst = top_losses(answers, temperature=used)
        maps = None
        if heatmaps is not None:  # of the predicted class: what the model took for evidence
            index = {name: i for i, name in enumerate(answers.classes)}
            maps = heatmaps([m.path for m in worst], [index[m.predicted] for m in worst])
        with checkpoint.write_errors_reported(top_losses_png):
            report["top_losses"] = str(plot_top_losses(worst, img_size, top_losses_png, scored=len(answers),
                                                       temperature=used, heatmaps=maps))
    if reliability_png is not None:
        curves = [("raw softmax", reliability(answers.probs(), answers.targets))]
        if report["calibration"]["from_checkpoint"]:
            t = report["calibration"]["temperature"]
            curves.append((f"temperature {t:.3g}", reliability(answers.probs(t), answers.targets)))
        with checkpoint.write_errors_reported(reliability_png):
            report["reliability"] = str(plot_reliability(curves, reliability_png, what=what))


def answer_csv_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """``metric,class,value`` lines: the calibration figures, ``misclassified``, a ``confused`` line per
    pair (class ``TRUE -> PREDICTED``), and ``answered@P`` / ``accuracy@P`` per threshold."""
    c = report["calibration"]
    rows = [{"metric": key, "class": "", "value": c[key]}
            for key in ("temperature", "ece_raw", "ece_calibrated", "nll_raw", "nll_calibrated")]
    rows.append({"metric": "misclassified", "class": "", "value": report["misclassified"]})
    rows += [{"metric": "confused", "class": f"{p['true']} -> {p['predicted']}", "value": p["count"]}
             for p in report["most_confused"]]
    for row in report["coverage"]:
        rows += [{"metric": f"answered@{row['min_confidence']:g}", "class": "", "value": row["answered"]},
                 {"metric": f"accuracy@{row['min_confidence']:g}", "class": "", "value": row["accuracy"]}]
    return rows


def format_answer_report(report: dict[str, Any], console: Console) -> None:
    """The calibration line, the most-confused pairs and the coverage table, then the files written."""
    c = report["calibration"]
    if c["from_checkpoint"]:
        state = "applied" if c["applied"] else "not applied (--no-calibration)"
        console.print(f"calibration: temperature {c['temperature']:.3g} from the checkpoint, {state}; "
                      f"ECE {c['ece_raw']:.4f} raw -> {c['ece_calibrated']:.4f} with it ({c['bins']} bins), "
                      f"NLL {c['nll_raw']:.4f} -> {c['nll_calibrated']:.4f}")
    else:
        console.print(f"calibration: ECE {c['ece_raw']:.4f} ({c['bins']} bins); the checkpoint has no temperature "
                      "(trained before calibration, or without a validation split): raw softmax")
    if report["most_confused"]:
        confused = Table(title="most confused (true -> predicted)")
        for col in ("true", "predicted", "images"):
            confused.add_column(col, justify="right" if col == "images" else "left")
        for pair in report["most_confused"]:
            confused.add_row(pair["true"], pair["predicted"], str(pair["count"]))
        console.print(confused)
    table = Table(title="predict --min-confidence P: answers kept, and how many of them are right")
    for col in ("P", "answered", "accuracy of those", "wrong kept"):
        table.add_column(col, justify="right")
    for row in report["coverage"]:
        accuracy = "-" if math.isnan(row["accuracy"]) else f"{row['accuracy']:.3f}"
        table.add_row(f"{row['min_confidence']:g}", f"{row['answered']:.1%}", accuracy, str(row["wrong_kept"]))
    console.print(table)
    for key, what in (("errors", f"{report['misclassified']} misclassified files"), ("top_losses", "top losses"),
                      ("reliability", "reliability diagram")):
        if report.get(key):
            console.print(f"{what} written to {report[key]}")
