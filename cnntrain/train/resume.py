"""The resume plan: which last.pt to continue, what it overrides, and where the run picks up.

``--resume`` is read once, here: the checkpoint's saved config becomes the base layer of the
run's configuration (flags given now still win), its classes are checked against the data, and
its position (epochs done, or the step inside a stopped epoch) tells the loop where to start.

``--resume auto`` takes the latest run (the one last started) when its last.pt holds training
state, else the most recently written last.pt in the project that does, and says which and why.
Another ``--epochs`` than the run's may extend or shorten it (the training state then follows
the schedule rebuilt for the new length), but not below the epochs it has done.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnntrain import checkpoint
from cnntrain.config import AUTO_KEYS, NOT_SAVED, TrainConfig, build_config, load_yaml
from cnntrain.errors import CheckpointError, UsageError


@dataclass
class ResumePlan:
    """A loaded last.pt and what follows from it."""

    path: Path
    saved: dict[str, Any]  # the checkpoint as loaded: weights, training state, config
    note: str | None = None  # how it was chosen (``--resume auto``), for the run's log

    @property
    def saved_epochs(self) -> int | None:
        """``--epochs`` of the run as saved; the plan's run may be given another."""
        epochs = (self.saved.get("config") or {}).get("epochs")
        return None if epochs is None else int(epochs)

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

    def check_epochs(self, epochs: int) -> None:
        """``--epochs`` may extend or shorten the run, not undo epochs it has done."""
        if epochs < self.epochs_done:
            raise UsageError(f"--epochs {epochs}: {self.run_dir} has done {self.epochs_done} epochs already; "
                             f"give --epochs {self.epochs_done} or more to resume it")

    def new_length(self, epochs: int, sched: str, lr: float) -> str | None:
        """What resuming with another ``--epochs`` does to the schedule (None: the same length);
        ``lr``: the rate the rebuilt schedule gives the epoch it continues at."""
        saved = self.saved_epochs
        if saved is None or saved == epochs:
            return None
        what = f"{'extending' if epochs > saved else 'shortening'} {self.run_dir} from {saved} to {epochs} epochs"
        if self.epochs_done >= epochs:
            return f"{what}: it has done {self.epochs_done}, so nothing is left to train"
        return (f"{what}: the {sched} schedule is rebuilt for {epochs} epochs and continues at epoch "
                f"{self.epochs_done + 1} with lr {lr:.3g}")

    def describe(self, partial: dict[str, Any] | None, epochs: int) -> str:
        where = (f"epoch {self.epochs_done + 1}, step {partial['steps']}" if partial
                 else f"the end of epoch {self.epochs_done}")
        return f"resuming {self.path} from {where} of {epochs}"


def resolve_resume(value: str) -> Path:
    """A run folder -> its last.pt; else the file (``auto`` is :func:`auto_plan`'s)."""
    path = Path(value)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise UsageError(f"--resume {value}: {path} does not exist")
    return path


def has_training_state(saved: dict[str, Any]) -> bool:
    return "optimizer" in saved


def where_it_stands(saved: dict[str, Any]) -> str:
    """``stopped during epoch 2 of 3``, ``stopped after epoch 2 of 3`` or ``finished all 2 epochs``."""
    done = int(saved["epoch"])
    total = (saved.get("config") or {}).get("epochs")
    of = f" of {total}" if total else ""
    if saved.get("partial_epoch"):
        return f"stopped during epoch {done + 1}{of}"
    if total is None or done < total:
        return f"stopped after epoch {done}{of}"
    return f"finished all {done} epochs; --epochs N trains more"


def auto_plan(project: str) -> ResumePlan:
    """``--resume auto``: latest's last.pt when it holds training state, else the most recently
    written last.pt in ``project`` that does; the plan's note says which and why."""
    latest = checkpoint.latest_run(project)
    if latest is not None and (latest / "last.pt").is_file():
        saved = checkpoint.load(latest / "last.pt")  # damaged: an error naming it, not another run
        if has_training_state(saved):
            return ResumePlan(latest / "last.pt", saved,
                              note=f"--resume auto: {latest} (the latest run, {where_it_stands(saved)})")
        passed_over = f"the latest run, {latest}, has a last.pt without training state"
    elif latest is not None:
        passed_over = f"the latest run, {latest}, has no last.pt yet"
    else:
        passed_over = f"{project}/latest names no run"
    seen = {(latest / "last.pt").resolve()} if latest is not None else set()
    for path in checkpoint.newest_first(project, "last.pt"):
        if path.resolve() in seen:
            continue
        try:
            saved = checkpoint.load(path)
        except CheckpointError:
            continue  # a damaged older file: the next one
        if has_training_state(saved):
            return ResumePlan(path, saved, note=f"--resume auto: {path.parent} (the most recently saved last.pt, "
                                                f"{where_it_stands(saved)}; {passed_over})")
    raise UsageError(f"--resume auto: no run in {project}/ has a last.pt with training state to resume; "
                     "start one with `cnntrain train`")


def load_plan(value: str, project: str) -> ResumePlan:
    """Resolve ``--resume VALUE`` and load it; a file without training state cannot be resumed."""
    if value == "auto":
        return auto_plan(project)
    path = resolve_resume(value)
    saved = checkpoint.load(path)
    if not has_training_state(saved):
        raise CheckpointError(f"{path} holds no training state; resume from a run's last.pt")
    return ResumePlan(path, saved)


def train_config(overrides: dict[str, Any], config_file: str | Path | None = None
                 ) -> tuple[TrainConfig, ResumePlan | None]:
    """The run's configuration from the command line: defaults < recipe or resumed run < flags.

    A resumed run keeps its own configuration (flags given now, e.g. ``--epochs``, still win),
    so the plan is made here and handed to ``fit``, which then reads last.pt no second time."""
    overrides = dict(overrides)
    if overrides.get("resume") is not None:
        auto = [key for key in AUTO_KEYS if str(overrides.get(key, "")).lower() == "auto"]
        if auto:
            option = "--" + auto[0].replace("_", "-")
            raise UsageError(f"{option} auto measures what a run starts with; a resumed run continues with its own "
                             f"(give a number to change it)")
        plan = load_plan(overrides["resume"], overrides.get("project", "runs"))
        # Not the run's settings: where the saved run was resumed from, and how much it printed.
        file_values = {k: v for k, v in (plan.saved.get("config") or {}).items() if k not in NOT_SAVED}
        overrides["resume"] = str(plan.path)
        cfg = build_config(file_values, overrides, source=str(plan.path))
        plan.check_epochs(cfg.epochs)
        return cfg, plan
    if config_file is not None:
        return build_config(load_yaml(config_file), overrides, source=str(config_file)), None
    return build_config({}, overrides), None
