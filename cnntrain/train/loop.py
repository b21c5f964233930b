"""The epoch loop: train, validate, record, save, stop. One screen, and it stays that way.

Everything the loop calls is a part built elsewhere (see ``cnntrain.train``): the phase says
what trains on what input, the training state steps the schedule and keeps the best, the
checkpointer writes, epoch-end reporters publish the row. A training feature plugs into one of
those parts, or into ``batch_transform`` / ``after_step``, never into this loop body.
"""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn as nn

from cnntrain.engine import BatchTransform, EpochTotals, EvalResult, evaluate, train_one_epoch
from cnntrain.train.checkpointer import Checkpointer
from cnntrain.train.distributed import DistContext
from cnntrain.train.phase import Phase, Phases
from cnntrain.train.progress import Reporter, format_epoch
from cnntrain.train.signals import Interrupted, StopRequest
from cnntrain.train.state import TrainingState


class EpochReporter(Protocol):
    """Told each finished epoch's row (on rank 0), after the state recorded it: metrics.csv,
    TensorBoard, a report page... ``val`` is the epoch's validation (its confusion matrix
    included; None without a validation split), which the row only summarises."""

    def epoch_end(self, row: dict[str, Any], history: list[dict[str, Any]], val: EvalResult | None) -> None: ...


@dataclass
class EpochLoop:
    phases: Phases
    state: TrainingState
    criterion: nn.Module
    checkpointer: Checkpointer
    model: nn.Module  # the bare model, which checkpoints are written from
    reporter: Reporter
    stop: StopRequest
    ctx: DistContext
    epochs: int
    batch_size: int
    num_classes: int
    images: tuple[int, int]  # train and val images, for the progress bars
    clip_grad: float | None = None
    sync_every: int = 1
    reporters: list[EpochReporter] = field(default_factory=list)
    batch_transform: BatchTransform | None = None
    after_step: Callable[[nn.Module], None] | None = None  # after every optimiser step
    val_criterion: nn.Module | None = None  # validation's loss, when training's differs (class weights)
    best_val: EvalResult | None = None  # the validation of the best epoch this session, for the plots

    def run(self, start_epoch: int, partial: dict[str, Any] | None = None) -> bool:
        """Epochs ``start_epoch + 1`` to the last (``partial``: the sums of a stopped one); True
        when early stopping ended the run."""
        for epoch in range(start_epoch, self.epochs):
            shown = epoch + 1
            phase = self.phases.for_epoch(shown)
            totals = EpochTotals(**partial) if partial else EpochTotals()
            partial, lr = None, self.state.lr
            phase.sampler.set_epoch(epoch, skip=totals.batches * self.batch_size)
            totals = self.train(phase, shown, totals)
            if totals.interrupted:
                self.checkpointer.interrupted(self.model, epoch, self.state, totals.state())
                raise self.interrupted(f"stopped during epoch {shown} after step {totals.steps}")
            self.warn_skipped(shown, totals.skipped)
            val, val_ema = self.validate(phase, shown), self.validate_average(phase, shown)
            row = epoch_row(shown, totals, val, lr, val_ema)
            improved = self.state.end_epoch(row)
            self.best_val = val if improved else self.best_val
            if self.ctx.is_main:
                for reporter in self.reporters:
                    reporter.epoch_end(row, self.state.history, val)
            stopping, early = self.ctx.any(bool(self.stop)), self.state.should_stop_early(shown, self.epochs)
            self.checkpointer.end_of_epoch(self.model, shown, {k: v for k, v in row.items() if k != "epoch"},
                                           self.state, improved, ending=stopping or early or shown == self.epochs,
                                           quick=phase.head_only is not None)
            self.reporter.info(format_epoch(shown, self.epochs, row))
            if stopping:
                raise self.interrupted(f"stopped after epoch {shown}")
            if early:
                self.reporter.info(f"early stop: {self.state.monitor} has not improved for {self.state.patience} "
                                   f"epochs (best {self.state.best_metric:.4f} at epoch {self.state.best_epoch})")
                return True
        return False

    def train(self, phase: Phase, epoch: int, totals: EpochTotals) -> EpochTotals:
        with self.reporter.bar(f"train epoch[{epoch}/{self.epochs}]", self.images[0]) as on_step:
            totals = train_one_epoch(
                phase.net, phase.train, self.state.optimizer, self.criterion, phase.batcher, epoch=epoch,
                scaler=self.state.scaler, clip_grad=self.clip_grad, prepare_model=phase.prepare, on_step=on_step,
                totals=totals, should_stop=lambda: self.ctx.any(bool(self.stop)), sync_every=self.sync_every,
                batch_transform=self.batch_transform, after_step=self.after_step,
                agree=self.ctx.all if self.ctx.enabled else None)
        return reduce_totals(totals, self.ctx)

    def validate(self, phase: Phase, epoch: int, net: nn.Module | None = None, what: str = "valid"
                 ) -> EvalResult | None:
        if phase.val is None:
            return None
        with self.reporter.bar(f"{what} epoch[{epoch}/{self.epochs}]", self.images[1]) as on_step:
            criterion = self.val_criterion if self.val_criterion is not None else self.criterion
            return evaluate(net if net is not None else phase.eval_net, phase.val, criterion, phase.batcher,
                            self.num_classes, on_step=on_step, reduce=self.ctx.sum)

    def validate_average(self, phase: Phase, epoch: int) -> EvalResult | None:
        """The average of the weights (--ema) on the same validation set."""
        ema = self.state.ema
        return None if ema is None else self.validate(phase, epoch, phase.eval_net_of(ema.module), "valid ema")

    def warn_skipped(self, epoch: int, skipped: list[str]) -> None:
        if skipped:
            self.reporter.always(f"warning: epoch {epoch} skipped {len(skipped)} unreadable image(s): "
                                 + ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))

    def interrupted(self, what: str) -> Interrupted:
        run_dir = self.checkpointer.run_dir
        return Interrupted(f"{what}; saved {self.checkpointer.last}. Resume with: cnntrain train --resume {run_dir}",
                           self.stop.signum or signal.SIGINT)


def epoch_row(epoch: int, totals: EpochTotals, val: EvalResult | None, lr: float,
              val_ema: EvalResult | None = None) -> dict[str, Any]:
    """One line of the history (and of metrics.csv)."""
    train = totals.summary()
    seconds = train["seconds"] + sum(v.seconds for v in (val, val_ema) if v is not None)
    return {
        "epoch": epoch, "train_loss": train["loss"], "train_acc": train["acc"],
        "val_loss": val.loss if val else None, "val_acc": val.acc if val else None,
        "val_top5": val.top5 if val else None,
        "val_loss_ema": val_ema.loss if val_ema else None, "val_acc_ema": val_ema.acc if val_ema else None,
        "lr": lr, "seconds": seconds, "images_per_s": train["images_per_s"],
    }


def reduce_totals(totals: EpochTotals, ctx: DistContext) -> EpochTotals:
    """An epoch's sums over all ranks (steps and batches are the same on every rank)."""
    if not ctx.enabled:
        return totals
    sums = ctx.sum(torch.tensor([totals.loss_sum, totals.correct, totals.seen], dtype=torch.float64))
    return dataclasses.replace(totals, loss_sum=float(sums[0]), correct=int(sums[1]), seen=int(sums[2]))
