"""Optimisers and learning-rate schedules.

The schedule is one pure function of the epoch (``lr_factor``) wrapped in a LambdaLR, so it
is unit-testable against torch's own schedulers and resumes exactly from ``last_epoch``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn


@dataclass(frozen=True)
class OptimizerSettings:
    """What ``build_optimizer`` reads from the run's configuration (``TrainConfig.pick``)."""

    opt: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    backbone_lr_mult: float = 1.0  # the backbone's lr as a fraction of the head's (``lr``)


@dataclass(frozen=True)
class ScheduleSettings:
    """What ``build_scheduler`` reads from the run's configuration (``TrainConfig.pick``)."""

    sched: str = "cosine"
    epochs: int = 10
    warmup_epochs: int = 0
    step_size: int = 10
    gamma: float = 0.1
    milestones: tuple[int, ...] = ()
    lrf: float = 0.01


def lr_factor(epoch: int, *, sched: str, epochs: int, warmup_epochs: int = 0, step_size: int = 10,
              gamma: float = 0.1, milestones: Iterable[int] = (), lrf: float = 0.01) -> float:
    """Multiplier of the base learning rate during ``epoch`` (0-based).

    Warm-up ramps linearly over the first ``warmup_epochs``; the schedule proper then runs
    over the remaining epochs, so ``cosine`` reaches ``lrf`` exactly at the last epoch.
    """
    if epoch < warmup_epochs:
        return (epoch + 1) / (warmup_epochs + 1)
    t = epoch - warmup_epochs
    if sched == "step":
        return gamma ** (t // step_size)
    if sched == "multistep":
        return gamma ** sum(1 for m in milestones if t >= m - warmup_epochs)
    if sched == "cosine":
        span = max(epochs - warmup_epochs, 1)
        return lrf + (1 - lrf) * (1 + math.cos(math.pi * t / span)) / 2
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, settings: ScheduleSettings) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-epoch schedule: call ``scheduler.step()`` once at the end of each epoch."""
    s = settings
    fn = partial(lr_factor, sched=s.sched, epochs=s.epochs, warmup_epochs=s.warmup_epochs, step_size=s.step_size,
                 gamma=s.gamma, milestones=tuple(s.milestones), lrf=s.lrf)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def parameter_groups(model: nn.Module, weight_decay: float, *, lr: float, head: str | None = None,
                     backbone_lr_mult: float = 1.0) -> list[dict]:
    """No weight decay on biases and normalisation parameters (1-d tensors), as in
    torchvision's reference recipes. Frozen parameters are included too: they get no
    gradient, so optimisers skip them, and unfreezing later needs no new optimiser.

    With ``head`` and a ``backbone_lr_mult`` other than 1 (discriminative learning rates), the
    head's groups come first at ``lr`` and the backbone's follow at ``lr x backbone_lr_mult``:
    pretrained features move slowly while the new head learns. Each group is named."""
    head_params = ({id(p) for p in model.get_submodule(head).parameters()}
                   if head is not None and backbone_lr_mult != 1.0 else set())
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for param in model.parameters():
        part = "head" if id(param) in head_params else ("backbone" if head_params else "all")
        buckets.setdefault((part, param.ndim > 1), []).append(param)
    groups = []
    for part in ("head", "all", "backbone"):
        for decays in (True, False):
            params = buckets.get((part, decays))
            if params:
                groups.append({"params": params, "weight_decay": weight_decay if decays else 0.0, "name": part,
                               "lr": lr * (backbone_lr_mult if part == "backbone" else 1.0)})
    return groups


def describe_groups(optimizer: torch.optim.Optimizer) -> str | None:
    """``parameter groups: head lr 0.01 (3.1k parameters), backbone lr 0.001 (11.2M)``; None for one rate."""
    rates: dict[str, tuple[float, int]] = {}
    for group in optimizer.param_groups:
        name = group.get("name", "all")  # (a last.pt from before groups had names)
        lr, count = rates.get(name, (group["lr"], 0))
        rates[name] = (lr, count + sum(p.numel() for p in group["params"]))
    if len(rates) < 2:
        return None
    return "parameter groups: " + ", ".join(f"{name} lr {lr:.3g} ({_count(n)} parameters)"
                                            for name, (lr, n) in rates.items())


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def build_optimizer(model: nn.Module, settings: OptimizerSettings, head: str | None = None) -> torch.optim.Optimizer:
    groups = parameter_groups(model, settings.weight_decay, lr=settings.lr, head=head,
                              backbone_lr_mult=settings.backbone_lr_mult)
    if settings.opt == "sgd":
        return torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum,
                               nesterov=settings.nesterov and settings.momentum > 0)
    if settings.opt == "adamw":
        return torch.optim.AdamW(groups, lr=settings.lr)
    return torch.optim.Adam(groups, lr=settings.lr)
