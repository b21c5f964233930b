"""``cnntrain explain``: Grad-CAM heatmaps of why a trained checkpoint said what it said."""

# One option per line: the signatures read as tables of options.
# ruff: noqa: E501

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from cnntrain.choices import EXPLAIN_FORMATS
from cnntrain.cli.app import Opt, check_choice, command, err, one_of
from cnntrain.cli.results import _weights_or_latest


@command()
def explain(
    inputs: Annotated[list[str], typer.Argument(metavar="IMAGE", help="Images, folders or globs (quote globs: 'imgs/*.jpg').")],
    weights: Annotated[Path | None, Opt(help="Checkpoint (default: best.pt of runs/latest).")] = None,
    class_name: Annotated[str | None, Opt("--class", help="Explain this class (a class name of the checkpoint) instead of each image's prediction.")] = None,
    output: Annotated[Path, Opt("--output", "-o", help="Folder for the pictures, one <image stem>_gradcam.png per image.")] = Path("explain"),
    fmt: Annotated[str, Opt("--format", help=f"{one_of(EXPLAIN_FORMATS)}; json is one object per image (path, output, explained, prob, predicted, predicted_prob, error).")] = "text",
    device: Annotated[str, Opt(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    project: Annotated[str, Opt(help="Where runs live (for the default weights).")] = "runs",
) -> None:
    """Grad-CAM heatmaps over images: where a CNN found the evidence for its prediction (or for --class); exit code 1 if any image could not be read. Needs pip install 'cnntrain\\[explain]'."""
    from cnntrain.explain.images import explain_files

    check_choice("--format", fmt, EXPLAIN_FORMATS)
    rows = explain_files(inputs, _weights_or_latest(weights, project), class_name=class_name, output=output,
                         device=device, log=lambda s: err.print(escape(s)))
    if fmt == "json":
        print(json.dumps([row.to_dict() for row in rows], indent=2))
    else:
        for row in rows:
            print(row.line())
    if any(row.error for row in rows):
        raise typer.Exit(1)
