"""Everything a run must carry across a restart besides the weights, in one object.

``TrainingState`` holds the optimiser, schedule, gradient scaler, best metric, history and
early-stopping rule. ``state_dict()`` is what last.pt stores beside the weights and
``load_state_dict()`` puts it back, so resuming is one call and a new piece of state (an
average of the weights, say) is one more field saved and loaded here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from cnntrain.runtime import grad_scaler, rng_state, set_rng_state
from cnntrain.train.ema import WeightAverage
from cnntrain.train.optim import OptimizerSettings, ScheduleSettings, build_optimizer, build_scheduler


@dataclass
class TrainResult:
    run_dir: Path
    best_epoch: int
    best_metric: float
    monitor: str
    epochs_run: int
    seconds: float
    stopped_early: bool
    history: list[dict[str, Any]] = field(default_factory=list)
    best_scores: dict[str, float] | None = None  # the best weights' acc, balanced_acc, macro_f1 on val
    best_is_ema: bool = False  # best.pt holds the average of the weights (--ema)
    # (train, val) paths of validation images that are exact copies of training images (checked by rank 0)
    leaks: list[tuple[str, str]] | None = None


@dataclass
class TrainingState:
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    monitor: str  # the history column that decides the best epoch: val_acc, or train_acc without val
    patience: int | None = None
    best_metric: float = -math.inf
    best_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    ema: WeightAverage | None = None  # --ema: the average of the weights, validated beside them
    best_is_ema: bool = False  # whether best.pt holds the average (it scored higher that epoch)
    device: torch.device | None = None  # whose CUDA generator the RNG state carries

    @classmethod
    def create(cls, model: nn.Module, optim: OptimizerSettings, schedule: ScheduleSettings, *,
               amp_dtype: torch.dtype | None, monitor: str, patience: int | None, head: str | None = None,
               ema_decay: float | None = None, device: torch.device | None = None) -> TrainingState:
        """Fresh state for ``model``; fp16 autocast (``amp_dtype``) gets a GradScaler.
        ``head`` names the head for a backbone learning-rate multiplier; ``ema_decay`` turns on EMA."""
        optimizer = build_optimizer(model, optim, head=head)
        ema = WeightAverage(model, ema_decay) if ema_decay is not None else None
        return cls(optimizer, build_scheduler(optimizer, schedule), grad_scaler(amp_dtype), monitor, patience, ema=ema,
                   device=device)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def end_epoch(self, row: dict[str, Any]) -> bool:
        """Step the schedule and record the epoch's row; True when it is the best so far."""
        self.scheduler.step()
        self.history.append(row)
        metric = row[self.monitor]
        averaged = row.get(f"{self.monitor}_ema")  # validated only when there is a validation split
        ema_wins = averaged is not None and averaged > metric
        if ema_wins:
            metric = averaged
        if metric > self.best_metric:
            self.best_metric, self.best_epoch, self.best_is_ema = metric, row["epoch"], ema_wins
            return True
        return False

    def best_weights(self, model: nn.Module) -> nn.Module:
        """What best.pt stores for the epoch that just improved: the average, or ``model``."""
        return self.ema.module if self.best_is_ema and self.ema is not None else model

    def should_stop_early(self, epoch: int, epochs: int) -> bool:
        """``patience`` epochs without a new best (never on the last epoch: it ends anyway)."""
        return self.patience is not None and epoch - self.best_epoch >= self.patience and epoch < epochs

    def state_dict(self) -> dict[str, Any]:
        return dict(optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                    scaler=self.scaler.state_dict() if self.scaler is not None else None,
                    best_metric=self.best_metric, best_epoch=self.best_epoch, history=self.history,
                    rng=rng_state(self.device),
                    ema=self.ema.state_dict() if self.ema is not None else None, best_is_ema=self.best_is_ema)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._follow_schedule()
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.best_metric, self.best_epoch = state["best_metric"], state["best_epoch"]
        self.history = list(state["history"])
        self.best_is_ema = bool(state.get("best_is_ema", False))
        if self.ema is not None and state.get("ema"):
            self.ema.load_state_dict(state["ema"])  # (a run resumed with --ema for the first time starts it now)
        set_rng_state(state["rng"], self.device)

    def _follow_schedule(self) -> None:
        """The learning rate this state's schedule gives the epoch it stands at.

        The loaded optimiser holds the rate the saved schedule set at its last step; the schedule
        built now (another ``--epochs``, say) decides it from here. With an unchanged schedule
        this is the same number, computed the same way as ``LambdaLR`` does."""
        sched = self.scheduler
        lrs = [base * factor(sched.last_epoch) for base, factor in zip(sched.base_lrs, sched.lr_lambdas, strict=True)]
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        sched._last_lr = list(lrs)
