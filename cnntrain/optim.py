"""Optimisers and learning-rate schedules.

The schedule is one pure function of the epoch (``lr_factor``) wrapped in a LambdaLR, so it
is unit-testable against torch's own schedulers and resumes exactly from ``last_epoch``.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Iterable

import torch
import torch.nn as nn

from cnntrain.config import TrainConfig


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


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-epoch schedule: call ``scheduler.step()`` once at the end of each epoch."""
    fn = partial(lr_factor, sched=cfg.sched, epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
                 step_size=cfg.step_size, gamma=cfg.gamma, milestones=tuple(cfg.milestones), lrf=cfg.lrf)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and normalisation parameters (1-d tensors), as in
    torchvision's reference recipes. Frozen parameters are included too: they get no
    gradient, so optimisers skip them, and unfreezing later needs no new optimiser."""
    decay, no_decay = [], []
    for param in model.parameters():
        (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(model, cfg.weight_decay)
    if cfg.opt == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.opt == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.Adam(groups, lr=cfg.lr)
