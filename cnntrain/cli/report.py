"""``cnntrain report``: (re)write a run folder's report.html."""

# ruff: noqa: E501

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cnntrain.cli.app import Opt, command


@command()
def report(
    run: Annotated[Path | None, typer.Argument(metavar="RUN", help="Run folder, e.g. runs/exp (default: runs/latest).")] = None,
    project: Annotated[str, Opt(help="Where runs live (for the default run).")] = "runs",
) -> None:
    """Write RUN/report.html: one self-contained page (configuration, data, learning curves, confusion matrix, per-class table, errors, calibration) that opens in any browser offline; also for runs made before the page existed."""
    from cnntrain.report import write_report

    path = write_report(run if run is not None else Path(project) / "latest")
    print(f"wrote {path}")
