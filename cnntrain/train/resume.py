"""The resume plan: which last.pt to continue, what it overrides, and where the run picks up.

``--resume`` is read once, here: the checkpoint's saved config becomes the base layer of the
run's configuration (flags given now still win), its classes are checked against the data, and
its position (epochs done, or the step inside a stopped epoch) tells the loop where to start.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnntrain import checkpoint
from cnntrain.config import TrainConfig, build_config, load_yaml
from cnntrain.errors import CheckpointError, UsageError


def resolve_resume(value: str, project: str) -> Path:
    """``auto`` -> the latest run's last.pt; a run folder -> its last.pt; else the file."""
    if value == "auto":
        run = checkpoint.latest_run(project)
        if run is None:
            raise UsageError(f"--resume auto: no runs in {project}/ to resume; start one with `cnntrain train`")
        path = run / "last.pt"
    else:
        path = Path(value)
        if path.is_dir():
            path = path / "last.pt"
    if not path.is_file():
        raise UsageError(f"--resume {value}: {path} does not exist")
    return path


@dataclass
class ResumePlan:
    """A loaded last.pt and what follows from it."""

    path: Path
    saved: dict[str, Any]  # the checkpoint as loaded: weights, training state, config

    @property
    def run_dir(self) -> Path:
        return self.path.parent

    @property
    def epochs_done(self) -> int:
        return int(self.saved["epoch"])

    def check_classes(self, classes: list[str]) -> None:
        if self.saved["classes"] != classes:
            raise UsageError(f"{self.path} was trained on classes {self.saved['classes']}, the data has {classes}")

    def partial_epoch(self, world_size: int, is_main: bool, log: Callable[[str], None]) -> dict[str, Any] | None:
        """The running sums of the epoch the run stopped in, or None to start the next one whole.

        Each rank's place inside an epoch depends on the world size, so with another number of
        processes the stopped epoch is replayed from its start. Rank 0 alone carries the sums."""
        partial = self.saved.get("partial_epoch")
        if not partial:
            return None
        saved_world = self.saved.get("world_size", 1)
        if saved_world != world_size:
            log(f"{self.path} stopped mid-epoch with {saved_world} process(es); "
                f"restarting epoch {self.epochs_done + 1} from its start with {world_size}")
            return None
        if not is_main:
            return {**partial, "loss_sum": 0.0, "correct": 0, "seen": 0, "skipped": []}
        return dict(partial)

    def describe(self, partial: dict[str, Any] | None, epochs: int) -> str:
        where = (f"epoch {self.epochs_done + 1}, step {partial['steps']}" if partial
                 else f"the end of epoch {self.epochs_done}")
        return f"resuming {self.path} from {where} of {epochs}"


def load_plan(value: str, project: str) -> ResumePlan:
    """Resolve ``--resume VALUE`` and load it; a file without training state cannot be resumed."""
    path = resolve_resume(value, project)
    saved = checkpoint.load(path)
    if "optimizer" not in saved:
        raise CheckpointError(f"{path} holds no training state; resume from a run's last.pt")
    return ResumePlan(path, saved)


def train_config(overrides: dict[str, Any], config_file: str | Path | None = None
                 ) -> tuple[TrainConfig, ResumePlan | None]:
    """The run's configuration from the command line: defaults < recipe or resumed run < flags.

    A resumed run keeps its own configuration (flags given now, e.g. ``--epochs``, still win),
    so the plan is made here and handed to ``fit``, which then reads last.pt no second time."""
    overrides = dict(overrides)
    if overrides.get("resume") is not None:
        plan = load_plan(overrides["resume"], overrides.get("project", "runs"))
        file_values = dict(plan.saved.get("config") or {})
        file_values.pop("resume", None)
        overrides["resume"] = str(plan.path)
        return build_config(file_values, overrides, source=str(plan.path)), plan
    if config_file is not None:
        return build_config(load_yaml(config_file), overrides, source=str(config_file)), None
    return build_config({}, overrides), None
