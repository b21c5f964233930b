"""One epoch of training and one pass of evaluation: plain loops, no globals.

Batches arrive as uint8 NCHW tensors; they are copied to the device as uint8 (4x fewer
bytes than float32) and converted, normalised and made channels_last there, so train,
eval and predict share one preprocessing definition (see ``Batcher``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from cnntrain.data.transforms import Normalize
from cnntrain.errors import CnnTrainError
from cnntrain.metrics import ConfusionMatrix, topk_correct
from cnntrain.tta import average_log_probs, average_probs, view_logits

StepCallback = Callable[[dict[str, float]], None]
#: Device-side training batch -> batch (e.g. mixup); targets may become soft (N x classes).
BatchTransform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class NonFiniteLossError(CnnTrainError):
    """The loss became NaN or infinite: training diverged."""


@dataclass
class Batcher:
    """Moves a uint8 batch to the device and turns it into the model's float input
    (``normalize=None``: inputs that are already features, moved as they are)."""

    device: torch.device
    normalize: Normalize | None
    channels_last: bool = False
    amp_dtype: torch.dtype | None = None

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        decode_on = getattr(images, "decode_on", None)
        if decode_on is not None:  # --gpu-decode: JPEG bytes, decoded and augmented on the device first
            images, targets = decode_on(self.device, targets)  # (cnntrain.data.gpu_decode.EncodedBatch)
        non_blocking = self.device.type == "cuda"
        images = images.to(self.device, non_blocking=non_blocking)
        if self.normalize is not None:
            images = self.normalize(images)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, targets.to(self.device, non_blocking=non_blocking)

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


@dataclass
class EpochTotals:
    """Running sums of one training epoch; saved in last.pt when a run stops mid-epoch."""

    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    steps: int = 0  # optimiser steps taken
    batches: int = 0  # batches drawn from the loader (a batch of only unreadable images takes no step)
    seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)  # unreadable images met on the way
    interrupted: bool = False

    def summary(self) -> dict[str, float]:
        return {
            "loss": self.loss_sum / self.seen if self.seen else math.nan,
            "acc": self.correct / self.seen if self.seen else math.nan,
            "images": self.seen,
            "seconds": self.seconds,
            "images_per_s": self.seen / self.seconds if self.seconds > 0 else 0.0,
        }

    def state(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "interrupted"}


def unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Loader batches are ``(images, targets)`` or ``(images, targets, skipped_paths)``."""
    images, targets, *rest = batch
    return images, targets, list(rest[0]) if rest else []


def backward_and_step(model: nn.Module, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                      scaler: torch.amp.GradScaler | None = None, clip_grad: float | None = None) -> None:
    """One optimiser update from ``loss``: gradients (scaled for fp16), clipping, step."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        if clip_grad:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        scaler.step(optimizer)
        scaler.update()
        return
    loss.backward()
    if clip_grad:
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    optimizer.step()


def _diverged(value: float, epoch: int, step: int) -> NonFiniteLossError:
    return NonFiniteLossError(f"loss became {value} at epoch {epoch}, step {step}: training diverged; "
                              "try a lower --lr (or --clip-grad)")


class _UnreadSums:
    """Per-step loss and hit counts still on the device, read with one sync for many steps."""

    def __init__(self, totals: EpochTotals, epoch: int, on_step: StepCallback | None, lr: Callable[[], float]) -> None:
        self.totals, self.epoch, self.on_step, self.lr = totals, epoch, on_step, lr
        self.start, self.before = time.perf_counter(), totals.seconds
        self.pending: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []  # (step, n, loss, correct)

    def __len__(self) -> int:
        return len(self.pending)

    def add(self, step: int, n: int, loss: torch.Tensor, correct: torch.Tensor) -> None:
        self.pending.append((step, n, loss, correct))

    def read(self) -> None:
        """Check each loss, add the steps to the totals, report progress."""
        totals = self.totals
        if self.pending:
            losses = torch.stack([loss for _, _, loss, _ in self.pending]).float().tolist()
            correct = torch.stack([c for _, _, _, c in self.pending]).tolist()
            for (step, n, _, _), value, hits in zip(self.pending, losses, correct):
                if not math.isfinite(value):
                    raise _diverged(value, self.epoch, step)
                totals.loss_sum += value * n
                totals.correct += int(hits)
                totals.seen += n
        totals.seconds = self.before + time.perf_counter() - self.start
        if self.on_step is not None and self.pending:
            self.on_step({"loss": totals.loss_sum / totals.seen, "acc": totals.correct / totals.seen,
                          "n": sum(n for _, n, _, _ in self.pending),
                          "images_per_s": totals.seen / max(totals.seconds, 1e-9), "lr": self.lr()})
        self.pending.clear()


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    batcher: Batcher,
    *,
    epoch: int = 0,
    scaler: torch.amp.GradScaler | None = None,
    clip_grad: float | None = None,
    prepare_model: Callable[[nn.Module], None] | None = None,
    on_step: StepCallback | None = None,
    totals: EpochTotals | None = None,
    should_stop: Callable[[], bool] | None = None,
    sync_every: int = 1,
    batch_transform: BatchTransform | None = None,
    after_step: Callable[[nn.Module], None] | None = None,
) -> EpochTotals:
    """Train for one pass over ``loader`` (continuing ``totals`` when resuming mid-epoch).

    Stops cleanly after the current step when ``should_stop()`` turns true (Ctrl-C), with
    ``interrupted`` set, so the caller can save a checkpoint that resumes exactly here.

    Loss and accuracy stay on the device and are read (which waits for the GPU) every
    ``sync_every`` steps and at the end: the loss check, progress and ``should_stop`` run
    there. A non-finite loss raises at that point, before anything can be saved.

    Seams for training features: ``batch_transform`` rewrites each device-side batch before the
    forward pass (mixup, cutmix; accuracy is then counted against the targets' argmax), and
    ``after_step(model)`` runs after every optimiser step (an average of the weights).
    """
    model.train()
    if prepare_model is not None:
        prepare_model(model)  # e.g. keep frozen BatchNorm in eval mode
    totals = totals or EpochTotals()
    unread = _UnreadSums(totals, epoch, on_step, lambda: optimizer.param_groups[0]["lr"])
    for batch in loader:
        images, targets, skipped = unpack(batch)
        totals.skipped.extend(skipped)
        totals.batches += 1
        if targets.numel() == 0:
            continue
        totals.steps += 1
        images, targets = batcher(images, targets)
        if batch_transform is not None:
            images, targets = batch_transform(images, targets)
        with batcher.autocast():
            logits = model(images)
            loss = criterion(logits, targets)
        if sync_every <= 1 and not torch.isfinite(loss):  # cheap on the CPU: never step on a bad loss
            raise _diverged(loss.item(), epoch, totals.steps)
        backward_and_step(model, loss, optimizer, scaler, clip_grad)
        if after_step is not None:
            after_step(model)
        hard = targets.argmax(1) if targets.dim() > 1 else targets
        unread.add(totals.steps, targets.size(0), loss.detach(), (logits.argmax(1) == hard).sum())
        if len(unread) >= sync_every:
            unread.read()
            if should_stop is not None and should_stop():
                totals.interrupted = True
                break
    unread.read()
    return totals


@dataclass
class EvalResult:
    """One pass of evaluation over a whole set (summed over ranks in a distributed run)."""

    loss: float
    acc: float
    top5: float | None  # None with 5 classes or fewer, where every answer is in the top 5
    images: int
    seconds: float
    confusion: ConfusionMatrix


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    criterion: nn.Module,
    batcher: Batcher,
    num_classes: int,
    *,
    on_step: StepCallback | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> EvalResult:
    """Loss, top-1, top-5 and the confusion matrix over ``loader`` (every sample counted once).

    ``reduce`` sums count tensors over the processes of a distributed run, each of which saw
    its own shard; the result is then over the whole set.
    """
    return _evaluate(model, loader, criterion, batcher, num_classes, False, on_step, reduce)[0]


@torch.no_grad()
def evaluate_with_tta(
    model: nn.Module,
    loader: Iterable,
    criterion: nn.Module,
    batcher: Batcher,
    num_classes: int,
    *,
    on_step: StepCallback | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[EvalResult, EvalResult]:
    """:func:`evaluate` plainly and with test-time augmentation (:mod:`cnntrain.tta`), in one pass.

    Both come from the same batches, so the loader decodes each image once and the plain result
    is exactly what :func:`evaluate` gives. The TTA loss is the NLL of the averaged probabilities
    (``criterion`` scores only the plain logits: a smoothed loss has no meaning for a mixture).
    """
    plain, tta = _evaluate(model, loader, criterion, batcher, num_classes, True, on_step, reduce)
    assert tta is not None
    return plain, tta


class _Scores:
    """Running sums of one way of scoring a set: loss, top-1/top-5 hits, confusion matrix."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.matrix = ConfusionMatrix(num_classes)
        self.loss_sum, self.top1, self.top5, self.seen = 0.0, 0, 0, 0

    def add(self, scores: torch.Tensor, loss: torch.Tensor, targets: torch.Tensor) -> None:
        """One batch: ``scores`` rank the classes (logits or probabilities), ``loss`` is its mean."""
        n = targets.size(0)
        self.loss_sum += float(loss) * n
        hits = topk_correct(scores.float(), targets, ks=(1, 5))
        self.top1, self.top5, self.seen = self.top1 + hits[1], self.top5 + hits[5], self.seen + n
        self.matrix.update(scores.argmax(1).cpu(), targets.cpu())

    def result(self, seconds: float, reduce: Callable[[torch.Tensor], torch.Tensor] | None) -> EvalResult:
        loss_sum, top1, top5, seen = self.loss_sum, self.top1, self.top5, self.seen
        if reduce is not None:
            sums = reduce(torch.tensor([loss_sum, top1, top5, seen], dtype=torch.float64))
            loss_sum, top1, top5, seen = float(sums[0]), int(sums[1]), int(sums[2]), int(sums[3])
            self.matrix.matrix = reduce(self.matrix.matrix)
        return EvalResult(
            loss=loss_sum / seen if seen else math.nan,
            acc=top1 / seen if seen else math.nan,
            top5=(top5 / seen if seen else math.nan) if self.num_classes > 5 else None,
            images=seen,
            seconds=seconds,
            confusion=self.matrix,
        )


def _evaluate(model: nn.Module, loader: Iterable, criterion: nn.Module, batcher: Batcher, num_classes: int,
              tta: bool, on_step: StepCallback | None,
              reduce: Callable[[torch.Tensor], torch.Tensor] | None) -> tuple[EvalResult, EvalResult | None]:
    """The loop behind :func:`evaluate` and :func:`evaluate_with_tta`: plain scores, and with
    ``tta`` also those of the averaged views of each device-side batch."""
    model.eval()
    plain, augmented = _Scores(num_classes), (_Scores(num_classes) if tta else None)
    start = time.perf_counter()
    for batch in loader:
        images, targets, _ = unpack(batch)
        if targets.numel() == 0:
            continue
        images, targets = batcher(images, targets)
        with batcher.autocast():
            views = view_logits(model, images) if tta else [model(images)]
            loss = criterion(views[0], targets)
        plain.add(views[0], loss, targets)
        if augmented is not None:  # the flip of the normalised batch = the normalised flip of the images
            nll = nn.functional.nll_loss(average_log_probs(views), targets)
            augmented.add(average_probs(views), nll, targets)
        if on_step is not None:
            elapsed = time.perf_counter() - start
            on_step({"loss": plain.loss_sum / plain.seen, "acc": plain.top1 / plain.seen, "n": targets.size(0),
                     "images_per_s": plain.seen / max(elapsed, 1e-9)})
    seconds = time.perf_counter() - start
    return plain.result(seconds, reduce), (augmented.result(seconds, reduce) if augmented is not None else None)
