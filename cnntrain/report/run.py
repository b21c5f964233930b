"""What a run folder holds, read once for the report: a typed record, whatever the run's age.

Every file is optional. An interrupted run has no summary.json; a run made before a feature
existed lacks its picture or its keys. The page shows what there is and says what is missing,
so reading never fails on an old or partial run, only on a folder that is not a run at all.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cnntrain.errors import UsageError

#: The pictures a run folder may hold, in the order the page shows them, with their captions.
KNOWN_PICTURES: dict[str, str] = {
    "learning_curves.png": "learning curves",
    "confusion_matrix.png": "confusion matrix of the best weights on the validation split",
    "top_losses.png": "the validation images with the highest loss",
    "reliability.png": "reliability diagram: confidence against accuracy",
    "class_counts.png": "images per class",
    "train_batch.jpg": "the first training batch, as the model sees it",
}
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: The files that make a folder a run folder (any one of them).
RUN_MARKERS = ("config.yaml", "metrics.csv", "summary.json", "last.pt", "best.pt")


@dataclass
class RunRecord:
    """The parts of one run folder the page is made of (None / empty where the file is absent)."""

    path: Path
    summary: dict[str, Any] | None
    config: dict[str, Any] | None
    metrics: list[dict[str, str]]
    pictures: dict[str, Path] = field(default_factory=dict)  # file name -> path, page order

    @property
    def finished(self) -> bool:
        return self.summary is not None


def read_run(run_dir: str | Path) -> RunRecord:
    """Read ``run_dir``; a path that is not a run folder is a usage error naming what was expected."""
    path = Path(run_dir)
    if not path.is_dir():
        raise UsageError(f"{path} is not a folder; give a run folder, e.g. runs/exp (or runs/latest)")
    if not any((path / name).exists() for name in RUN_MARKERS):
        raise UsageError(f"{path} is not a run folder (no config.yaml, metrics.csv or summary.json in it); "
                         "give one that `cnntrain train` wrote, e.g. runs/exp")
    return RunRecord(path=path, summary=_json(path / "summary.json"), config=_yaml(path / "config.yaml"),
                     metrics=_csv(path / "metrics.csv"), pictures=_pictures(path))


def _json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _yaml(path: Path) -> dict[str, Any] | None:
    try:
        value = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return value if isinstance(value, dict) else None


def _csv(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except (OSError, csv.Error):
        return []


def _pictures(path: Path) -> dict[str, Path]:
    """The known pictures first, in their order, then any other picture the folder holds."""
    found = {name: path / name for name in KNOWN_PICTURES if (path / name).is_file()}
    others = sorted(p for p in path.iterdir()
                    if p.suffix.lower() in PICTURE_SUFFIXES and p.is_file() and p.name not in found)
    found.update({p.name: p for p in others})
    return found
