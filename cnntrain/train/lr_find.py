"""The learning-rate range test (Smith, "Cyclical Learning Rates", 2015; fastai's ``lr_find``).

Train for ``steps`` optimiser steps while the learning rate rises exponentially from ``start_lr``
to ``end_lr``, record the loss of every batch, smooth it, and suggest the rate where the smoothed
loss falls fastest. The test leaves no trace: weights, gradients, train/eval modes, optimiser
state, gradient scaler and every RNG (torch, CUDA, Python, NumPy) are put back afterwards, even
when it fails, and nothing is written to disk, so ``train --lr auto`` can run it and then train
from exactly the start it would have had without it.

Written here rather than taken from ``torch-lr-finder``: that package moves batches to the device
itself (our loaders yield uint8 batches, with skipped files, that only the ``Batcher`` turns into
the model's input), restores neither the RNG nor the scaler, smooths without bias correction,
and knows no fallback when the steepest-descent rule has nothing to work with. The step itself
is ``engine.backward_and_step``, the one training uses.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from cnntrain.config import TrainConfig
from cnntrain.data import DatasetSplits
from cnntrain.engine import Batcher, BatchTransform, NonFiniteLossError, backward_and_step, unpack
from cnntrain.errors import DataError, UsageError
from cnntrain.models import freeze_backbone, get_spec
from cnntrain.models.heads import keep_frozen_bn_eval
from cnntrain.runtime import (
    amp_dtype_for,
    grad_scaler,
    resolve_device,
    rng_state,
    seed_everything,
    set_rng_state,
    use_channels_last,
)
from cnntrain.train.imbalance import class_counts
from cnntrain.train.loss import build_objective
from cnntrain.train.optim import OptimizerSettings, build_optimizer
from cnntrain.train.pipeline import PipelineSettings, build_pipeline
from cnntrain.train.run_model import build_run_model, place
from cnntrain.train.splits import check_trainable, load_splits

Log = Callable[[str], None]

MIN_STEPS = 5
#: Below this many points between the warm-up and the minimum, the steepest slope is noise.
MIN_DESCENT_POINTS = 4
#: A smoothed loss that falls by less than this fraction of its start has no descent to speak of.
FLAT = 0.01
#: How each rule of ``suggest`` chose, for people.
METHODS = {
    "steepest": "where the smoothed loss falls fastest",
    "valley": "half way down the longest fall of the loss (too short or flat a curve for a slope)",
    "minimum": "a tenth of the rate at the lowest loss (the loss never fell)",
}


@dataclass
class LrFindResult:
    """One range test: what was tried and measured, and the rate it suggests.

    ``method``: ``steepest`` (fastest fall of the smoothed loss against log lr), ``valley``
    (fastai's longest-valley rule, when the curve before its minimum is too short or flat for a
    slope), or ``minimum`` (a tenth of the rate at the lowest loss, but not below the first rate
    tried, when the loss never fell)."""

    lrs: list[float]
    losses: list[float]  # loss of each batch, measured before the step at that rate
    smoothed: list[float]  # bias-corrected exponential moving average of ``losses``
    suggestion: float
    method: str
    diverged: bool  # stopped early: the smoothed loss passed ``diverge`` x its best, or was not finite

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """``suggested learning rate 3.16e-03: where the smoothed loss falls fastest; 100 steps ...``"""
        end = (f"stopped at {self.lrs[-1]:.2g}, where the loss diverged" if self.diverged
               else f"up to {self.lrs[-1]:.2g}")
        return (f"suggested learning rate {self.suggestion:.2e}: {METHODS[self.method]}; "
                f"{len(self.lrs)} steps from {self.lrs[0]:.2g}, {end}")


def check_range(start_lr: float, end_lr: float, steps: int, smooth: float = 0.98, diverge: float = 4.0) -> None:
    """Reject a test that cannot run, before any data is read or model built."""
    checks = [
        (not start_lr > 0, "--start-lr must be positive"),
        (not start_lr < end_lr, f"--start-lr ({start_lr:g}) must be below --end-lr ({end_lr:g})"),
        (steps < MIN_STEPS, f"--steps must be at least {MIN_STEPS}"),
        (not 0 <= smooth < 1, "smooth must be in [0, 1)"),
        (not diverge > 1, "diverge must be above 1"),
    ]
    for bad, message in checks:
        if bad:
            raise UsageError(message)


def lr_at(step: int, steps: int, start_lr: float, end_lr: float) -> float:
    """The rate of 0-based ``step``: ``start_lr`` at the first, ``end_lr`` at the last, geometric between."""
    return start_lr * (end_lr / start_lr) ** (step / (steps - 1))


def find_lr(model: nn.Module, loader: Iterable, criterion: nn.Module, batcher: Batcher,
            optimizer: torch.optim.Optimizer, *, start_lr: float = 1e-7, end_lr: float = 10.0, steps: int = 100,
            smooth: float = 0.98, diverge: float = 4.0, scaler: torch.amp.GradScaler | None = None,
            clip_grad: float | None = None, prepare_model: Callable[[nn.Module], None] | None = None,
            batch_transform: BatchTransform | None = None) -> LrFindResult:
    """Run the range test on ``model`` and put everything it touched back (module docstring).

    ``loader`` is cycled when it has fewer than ``steps`` batches (the same order again). The
    rates are the first parameter group's (``--lr``: the head's with discriminative rates); the
    other groups keep their ratio to it. It stops early when the smoothed loss exceeds
    ``diverge`` x the best smoothed loss so far, or when a loss is not finite (that batch is not
    recorded). ``prepare_model`` and ``batch_transform`` act as in ``train_one_epoch``."""
    check_range(start_lr, end_lr, steps, smooth, diverge)
    lrs: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    diverged = False
    first = optimizer.param_groups[0]["lr"]
    ratios = [group["lr"] / first if first else 1.0 for group in optimizer.param_groups]
    with _leaves_no_trace(model, optimizer, scaler), closing(_cycle(loader)) as batches:
        model.train()
        if prepare_model is not None:
            prepare_model(model)
        average, best = 0.0, math.inf
        for step in range(steps):
            lr = lr_at(step, steps, start_lr, end_lr)
            for group, ratio in zip(optimizer.param_groups, ratios, strict=True):
                group["lr"] = lr * ratio
            images, targets = batcher(*next(batches))
            if batch_transform is not None:
                images, targets = batch_transform(images, targets)
            with batcher.autocast():
                loss = criterion(model(images), targets)
            value = float(loss.detach())
            if not math.isfinite(value):
                diverged = True
                break
            average = smooth * average + (1 - smooth) * value
            lrs.append(lr)
            losses.append(value)
            smoothed.append(average / (1 - smooth ** (step + 1)))
            best = min(best, smoothed[-1])
            if smoothed[-1] > diverge * best:
                diverged = True
                break
            backward_and_step(model, loss, optimizer, scaler, clip_grad)
    if not lrs:
        raise NonFiniteLossError(f"the loss is not finite even at --start-lr {start_lr:g}: the model or data is "
                                 "broken, or the rate is far too high")
    suggestion, method = suggest(lrs, smoothed)
    return LrFindResult(lrs, losses, smoothed, suggestion, method, diverged)


def suggest(lrs: list[float], smoothed: list[float]) -> tuple[float, str]:
    """The suggested rate and the rule that chose it (``LrFindResult.method``)."""
    index = _steepest(lrs, smoothed)
    if index is not None:
        return lrs[index], "steepest"
    index = _valley(smoothed)
    if index is not None:
        return lrs[index], "valley"
    return max(lrs[int(np.argmin(smoothed))] / 10, lrs[0]), "minimum"


def _steepest(lrs: list[float], smoothed: list[float]) -> int | None:
    """Where the smoothed loss falls fastest per decade, between the EMA's warm-up (the first
    tenth) and the minimum; None when that stretch is too short, never falls, or is flat.

    The slope is taken across ``2w`` steps (``w`` = a twentieth of the test), not between
    neighbours: a loader cycling a few batches of unequal loss makes the smoothed curve ripple,
    and a neighbour-to-neighbour slope finds the steepest ripple at a rate far too small."""
    start, end, w = len(smoothed) // 10, int(np.argmin(smoothed)), max(1, len(smoothed) // 20)
    if end - start + 1 < max(MIN_DESCENT_POINTS, 2 * w + 1):
        return None
    loss = np.asarray(smoothed[start:end + 1], dtype=np.float64)
    log_lr = np.log(np.asarray(lrs[start:end + 1], dtype=np.float64))
    slope = (loss[2 * w:] - loss[:-2 * w]) / (log_lr[2 * w:] - log_lr[:-2 * w])  # centred on loss[w:-w]
    if loss[0] - loss[-1] <= FLAT * abs(loss[0]) or slope.min() >= 0:
        return None
    return start + w + int(np.argmin(slope))


def _valley(smoothed: list[float]) -> int | None:
    """fastai's ``valley``: the longest strictly falling subsequence of the loss, and the point
    half way along it (a sure descent, short of the bottom); None when nothing falls."""
    n = len(smoothed)
    run = [1] * n  # length of the longest falling subsequence ending at each point
    for i in range(1, n):
        run[i] = 1 + max((run[j] for j in range(i) if smoothed[j] > smoothed[i]), default=0)
    end = int(np.argmax(run))
    if run[end] < 2:
        return None
    start = end - run[end] + 1
    third = (end - start) / 3
    return start + int(third) + int(third / 2)


@contextmanager
def _leaves_no_trace(model: nn.Module, optimizer: torch.optim.Optimizer,
                     scaler: torch.amp.GradScaler | None) -> Iterator[None]:
    """Copies of everything the test changes, put back on the way out (an error included).
    ``load_state_dict`` copies into the same parameter tensors, so the optimiser keeps its
    references and a caller's model is exactly as it was, bit for bit."""
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grads = [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    scaler_state = copy.deepcopy(scaler.state_dict()) if scaler is not None else None
    rng = rng_state()
    try:
        yield
    finally:
        model.load_state_dict(weights)
        for param, grad in zip(model.parameters(), grads, strict=True):
            param.grad = grad
        for module, mode in zip(model.modules(), modes, strict=True):
            module.training = mode
        optimizer.load_state_dict(optimizer_state)
        if scaler is not None and scaler_state is not None:
            scaler.load_state_dict(scaler_state)
        set_rng_state(rng)


def _cycle(loader: Iterable) -> Generator[tuple[torch.Tensor, torch.Tensor], None, None]:
    """``(images, targets)`` for ever, passing over the loader again when it ends; batches whose
    images were all unreadable are skipped, as training skips them."""
    while True:
        drawn = 0
        for batch in loader:
            images, targets, _ = unpack(batch)
            if targets.numel():
                drawn += 1
                yield images, targets
        if not drawn:
            raise DataError("the training loader yielded no usable batch for the learning-rate range test")


def lr_find_for_config(cfg: TrainConfig, *, start_lr: float = 1e-7, end_lr: float = 10.0, steps: int = 100,
                       smooth: float = 0.98, diverge: float = 4.0, splits: DatasetSplits | None = None,
                       log: Log = lambda s: None, warn: Log = lambda s: None) -> LrFindResult:
    """The range test of the run ``cfg`` describes: its data, model, starting weights, frozen
    layers, input pipeline, optimiser and loss, built by the parts ``fit`` builds them with.

    Seeded with ``cfg.seed`` (so the model starts where a run of ``cfg`` starts) and every RNG
    put back afterwards. No decoded-image or feature cache is built. ``splits``: the data when
    already loaded (``fit``), else read here. One process; ``--compile`` is not applied."""
    check_range(start_lr, end_lr, steps, smooth, diverge)
    rng = rng_state()
    try:
        seed_everything(cfg.seed, cfg.deterministic)
        arch = get_spec(cfg.arch).name
        if splits is None:
            splits = load_splits(cfg.data_path, cfg.dataset, val_split=cfg.val_split, seed=cfg.seed,
                                 strict=cfg.strict, labels=cfg.labels, info=log, warn=warn)
        check_trainable(splits)
        run = build_run_model(arch, splits.num_classes, pretrained=cfg.pretrained, weights=cfg.weights, resumed=None,
                              freeze_layers=cfg.freeze_layers, log=log, warn=warn)
        frozen = cfg.freeze_layers and (cfg.unfreeze_epoch is None or cfg.unfreeze_epoch > 1)  # epoch 1's phase
        if frozen:
            freeze_backbone(run.model, run.head)
        device = resolve_device(cfg.device)
        amp_dtype, channels_last = amp_dtype_for(device, cfg.amp), use_channels_last(device, cfg.img_size)
        model = place(run.model, device, channels_last=channels_last, sync_bn=False)
        pipeline = build_pipeline(splits, cfg.pick(PipelineSettings), device=device, mean=run.mean, std=run.std,
                                  channels_last=channels_last, amp_dtype=amp_dtype, image_cache=False, log=log)
        optimizer = build_optimizer(model, cfg.pick(OptimizerSettings, lr=start_lr), head=run.head)
        scaler = grad_scaler(amp_dtype)
        log(f"learning-rate range test: {arch}, {cfg.opt}, {steps} steps from {start_lr:g} to {end_lr:g}, "
            f"batch {cfg.batch_size}, {len(splits.train):,} training images")
        counts = class_counts([label for _, label in splits.train], splits.num_classes)
        objective = build_objective(cfg, splits.classes, counts)  # class weights and mixing, as training has them
        return find_lr(model, pipeline.train, objective.criterion, pipeline.batcher, optimizer,
                       start_lr=start_lr, end_lr=end_lr, steps=steps, smooth=smooth, diverge=diverge, scaler=scaler,
                       clip_grad=cfg.clip_grad, batch_transform=objective.batch_transform,
                       prepare_model=(lambda m: keep_frozen_bn_eval(model, run.head)) if frozen else None)
    finally:
        set_rng_state(rng)
