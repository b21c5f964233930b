"""Self-describing checkpoints and run folders.

A checkpoint carries everything `predict` and `eval` need (architecture, class names, image
size, normalisation, the resolved config) so a trained model is one file. It holds only plain
types and tensors, so it always loads with ``weights_only=True``; writes are atomic so a
crash never leaves a half-written file under a final name.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from cnntrain import fileio
from cnntrain.config import LATEST, run_name_problem
from cnntrain.errors import CheckpointError, UsageError, first_line
from cnntrain.weights import safe_load

if TYPE_CHECKING:  # imported where used: loading a checkpoint needs neither the engine nor the data
    from cnntrain.engine import Batcher

FORMAT = "cnntrain-checkpoint"
FORMAT_VERSION = 1
# Wrappers that prefix parameter names: DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip DDP / torch.compile prefixes so every checkpoint loads into a bare model."""
    cleaned = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        cleaned[key] = value
    return cleaned


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


@contextmanager
def write_errors_reported(path: str | Path) -> Iterator[None]:
    """A failed write of a run's file (disk full, I/O error) becomes a one-line error, not a
    traceback; the writes are atomic, so the previous file is still there, unchanged."""
    try:
        yield
    except OSError as exc:
        raise CheckpointError(f"could not write {path}: {exc.strerror or exc}; the previous file is "
                              "unchanged") from None


def save(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write a checkpoint atomically (temp file, fsync, rename)."""
    path = Path(path)
    with write_errors_reported(path), fileio.atomic_open(path, "wb") as fh:
        torch.save(payload, fh)
    return path


def make_checkpoint(model: nn.Module, *, arch: str, classes: list[str], img_size: int,
                    mean: list[float], std: list[float], config: dict[str, Any], epoch: int,
                    metrics: dict[str, Any], **training_state: Any) -> dict[str, Any]:
    """The checkpoint dict; ``training_state`` (optimizer, scheduler, rng...) only in last.pt."""
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "arch": arch,
        "classes": list(classes),
        "img_size": int(img_size),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "config": config,
        "epoch": int(epoch),
        "metrics": metrics,
        "model": clean_state_dict(unwrap(model).state_dict()),
        **training_state,
    }


def load(path: str | Path) -> dict[str, Any]:
    """Load a cnntrain checkpoint, or wrap a plain state dict as ``{"model": state}``."""
    path = Path(path)
    # The user's own file: say what was expected, never to delete it (as for a damaged download).
    data = safe_load(path, what="a PyTorch checkpoint",
                     advice="expected a .pt/.pth file saved by torch.save, e.g. a run's best.pt")
    if isinstance(data, dict) and data.get("format") == FORMAT:
        data["model"] = clean_state_dict(data["model"])
        return data
    if isinstance(data, dict):
        # Common shapes of hand-made files: a bare state dict, or one under a usual key.
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(data.get(key), dict):
                data = data[key]
                break
        if data and all(isinstance(v, torch.Tensor) for v in data.values()):
            return {"model": clean_state_dict(data)}
    raise CheckpointError(f"{path} is neither a cnntrain checkpoint nor a state dict of tensors")


def require_full(ckpt: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """predict/eval need the self-describing fields; a bare state dict cannot say its classes."""
    if ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is a plain state dict without architecture or class names; "
            "use a checkpoint written by `cnntrain train` (best.pt / last.pt)"
        )
    return ckpt


@dataclass
class WeightsReport:
    loaded: int
    head_skipped: list[str] = field(default_factory=list)

    def summary(self, path: str | Path) -> str:
        text = f"loaded {self.loaded} tensors from {path}"
        if self.head_skipped:
            text += f"; head {', '.join(self.head_skipped)} has another class count and starts fresh"
        return text


def load_weights_into(model: nn.Module, state: dict[str, torch.Tensor], head: str,
                      path: str | Path) -> WeightsReport:
    """Load ``state`` for ``--weights``: only the head may differ (other class count);
    any other missing, unexpected or mis-shaped key is an error that lists the keys."""
    from cnntrain.models.heads import is_head

    own = model.state_dict()
    head_skipped = [k for k, v in state.items() if is_head(k, head) and k in own and own[k].shape != v.shape]
    usable = {k: v for k, v in state.items() if k not in head_skipped}
    mismatched = [k for k, v in usable.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in usable and k not in head_skipped]
    unexpected = [k for k in usable if k not in own]
    problems = []
    for label, keys in (("shape mismatch", mismatched), ("missing", missing), ("unexpected", unexpected)):
        if keys:
            more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
            problems.append(f"{label}: {', '.join(keys[:5])}{more}")
    if problems:
        raise CheckpointError(
            f"{path} does not fit this architecture ({'; '.join(problems)}); "
            "check --arch, or start from ImageNet weights with --pretrained"
        )
    model.load_state_dict(usable, strict=False)
    return WeightsReport(loaded=len(usable), head_skipped=head_skipped)


# ---------------------------------------------------------------------------- run folders


def check_project(project: str | Path) -> Path:
    """Fail early, before data or models are touched, if runs cannot be written to ``project``."""
    project = Path(project)
    if project.exists() and not project.is_dir():
        raise UsageError(f"--project {project} is a file; give a folder for runs")
    target = project if project.exists() else project.parent
    if not target.is_dir():
        raise UsageError(f"--project {project}: the parent folder {target} does not exist; "
                         "create it first or choose another --project")
    try:
        fd, probe = tempfile.mkstemp(prefix=".cnntrain-write-test-", dir=target)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"--project {project}: cannot write in {target} ({exc.strerror or exc}); "
                         "choose a writable folder with --project") from None
    return project


def new_run_dir(project: str | Path, name: str, exist_ok: bool = False) -> Path:
    """Claim ``project/name``, or ``name2``, ``name3``... when taken; ``exist_ok`` shares ``name`` instead.

    Claimed, not guessed: each candidate is created by a ``mkdir`` that fails when the folder is
    already there, and a failure moves on to the next number. So N runs started at the same
    moment with one ``--name`` (a CI matrix) get N folders; checking first and creating after
    would let two of them pick the same folder and overwrite each other's checkpoints.
    """
    problem = run_name_problem(name)
    if problem is not None:
        raise UsageError(f"--name {name!r}: {problem}")
    project = check_project(project)
    try:
        project.mkdir(exist_ok=True)
        if exist_ok:
            run = project / name
            if run.exists() and not run.is_dir():
                raise UsageError(f"--exist-ok: {run} is a file, not a run folder; choose another --name")
            run.mkdir(exist_ok=True)
            return run
        index = 1
        while True:
            run = project / (name if index == 1 else f"{name}{index}")
            try:
                run.mkdir()
                return run
            except FileExistsError:  # a run (or a file, or a dangling link) has it: the next number
                index += 1
    except OSError as exc:
        raise UsageError(f"cannot create a run folder in {project}: {exc.strerror or exc}") from None


def point_latest(run: Path) -> None:
    """Make ``project/latest`` point at ``run`` (a relative symlink, swapped atomically).

    Training calls this when it claims (or resumes) a run folder, so ``latest`` is the run last
    started, finished or not: the one ``--resume auto``, predict, eval and export mean by default.
    The new link is made under a random temporary name and renamed over ``latest``, so runs that
    start together each swap in a whole link: ``latest`` always names one of their folders,
    never a half-made link or none."""
    link = run.parent / LATEST
    if run.name == LATEST or (link.is_symlink() and link.resolve() == run.resolve()):
        return  # already there (``--resume runs/latest`` must not make latest point at itself)
    if link.is_dir() and not link.is_symlink():
        return  # a real folder someone named latest: theirs, never replaced
    tmp = run.parent / fileio.temp_name(link)
    try:
        tmp.symlink_to(run.name, target_is_directory=True)
        os.replace(tmp, link)
    except OSError:
        # Filesystems without symlinks: a one-line text file naming the run.
        tmp.unlink(missing_ok=True)
        fileio.atomic_write_text(link, run.name + "\n")


def newest_first(project: str | Path, name: str) -> list[Path]:
    """Every run's ``name`` (best.pt, last.pt) in ``project``, most recently written first."""
    found = [p for p in Path(project).glob(f"*/{name}") if p.parent.name != "latest"]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def latest_run(project: str | Path = "runs") -> Path | None:
    """The run ``project/latest`` names, as ``project/NAME`` (so messages show the path a user knows)."""
    link = Path(project) / "latest"
    if link.is_symlink():
        target = link.parent / os.readlink(link)  # relative as point_latest writes it; an absolute one stays
        return target if target.is_dir() else None
    if link.is_dir():
        return link
    if link.is_file():
        target = link.parent / link.read_text(encoding="utf-8").strip()
        return target if target.is_dir() else None
    return None


def restore_model(ckpt: dict[str, Any]) -> nn.Module:
    """Rebuild the trained network from a self-describing checkpoint (eval mode, on CPU)."""
    from cnntrain.models import get_model

    model = get_model(ckpt["arch"], num_classes=len(ckpt["classes"]))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint weights do not fit {ckpt['arch']}: {first_line(exc)}") from None
    return model.eval()


def resolve_weights(weights: str | Path | None, project: str | Path = "runs") -> tuple[Path, bool]:
    """``--weights`` or, when omitted, best.pt of the latest run; returns (path, was_default)."""
    if weights is not None:
        path = Path(weights)
        if not path.exists():
            raise UsageError(f"--weights {path} does not exist")
        return (path / "best.pt" if path.is_dir() else path), False
    run = latest_run(project)
    if run is None:
        raise UsageError(f"no --weights given and no trained run in {project}/; train one with `cnntrain train` "
                         "or pass --weights CKPT")
    if not (run / "best.pt").is_file():
        others = newest_first(project, "best.pt")
        example = others[0] if others else Path(project) / "NAME" / "best.pt"
        raise UsageError(f"no --weights given and the latest run, {run}, has no best.pt yet (it stopped before "
                         f"its first epoch ended, or is still in it); resume it with `cnntrain train --resume "
                         f"{run}`, or pass --weights, e.g. --weights {example}")
    return run / "best.pt", True


def on_device(ckpt: dict[str, Any], dev: torch.device) -> tuple[nn.Module, Batcher]:
    """A checkpoint's model on ``dev``, with the Batcher that feeds it (its normalisation, the
    device's memory format and mixed precision): what predict and eval share, next to
    :func:`restore_model` so neither command borrows it from the other."""
    from cnntrain.data.transforms import Normalize
    from cnntrain.engine import Batcher
    from cnntrain.runtime import amp_dtype_for, use_channels_last

    model = restore_model(ckpt).to(dev)
    batcher = Batcher(dev, Normalize(ckpt["mean"], ckpt["std"]).to(dev), use_channels_last(dev, ckpt["img_size"]),
                      amp_dtype_for(dev, None))
    if batcher.channels_last:
        model.to(memory_format=torch.channels_last)
    return model, batcher
