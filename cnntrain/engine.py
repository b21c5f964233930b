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
from cnntrain.metrics import ConfusionMatrix, topk_hits
from cnntrain.tta import average_log_probs, average_probs, view_logits

# On a GPU, reading a value back (the loss, a count) waits for every queued kernel and stalls the
# queue; the loops read every so many steps there, and every step on the CPU, where it is free.
GPU_SYNC_EVERY = 20


def sync_every_for(device: torch.device) -> int:
    """How many steps the loops let pass between reads of the device's values."""
    return 1 if device.type == "cpu" else GPU_SYNC_EVERY


StepCallback = Callable[[dict[str, float]], None]
#: Device-side training batch -> batch (e.g. mixup); targets may become soft (N x classes).
BatchTransform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
#: What an evaluation pass hands a caller that keeps every image's output (``keep=``, e.g.
#: ``cnntrain.analysis.AnswerCollector``), once per loader batch: the plain logits on the device
#: (None for a batch left with no readable image), the targets, and the paths the loader skipped.
BatchSink = Callable[[torch.Tensor | None, torch.Tensor, list[str]], None]


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
    agree: Callable[[bool], bool] | None = None,
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

    ``agree(has_batch)``: under DDP, whether every rank has a batch this step (``DistContext.all``).
    A batch of only unreadable images is skipped, and a rank that skipped alone would leave the
    others waiting in the gradient all-reduce, so then every rank skips that step.
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
        if targets.numel():
            images, targets = batcher(images, targets)  # (--gpu-decode may find none decodable)
        has_batch = targets.numel() > 0
        if not (agree(has_batch) if agree is not None else has_batch):
            continue
        totals.steps += 1
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
    keep: BatchSink | None = None,
) -> EvalResult:
    """Loss, top-1, top-5 and the confusion matrix over ``loader`` (every sample counted once).

    ``reduce`` sums count tensors over the processes of a distributed run, each of which saw
    its own shard; the result is then over the whole set. ``keep`` is given every batch's
    logits as well (:data:`BatchSink`), for per-image figures from this same pass.
    """
    return _evaluate(model, loader, criterion, batcher, num_classes, False, on_step, reduce, keep)[0]


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
    keep: BatchSink | None = None,
) -> tuple[EvalResult, EvalResult]:
    """:func:`evaluate` plainly and with test-time augmentation (:mod:`cnntrain.tta`), in one pass.

    Both come from the same batches, so the loader decodes each image once and the plain result
    is exactly what :func:`evaluate` gives. The TTA loss is the NLL of the averaged probabilities
    (``criterion`` scores only the plain logits: a smoothed loss has no meaning for a mixture).
    ``keep`` is given the plain logits.
    """
    plain, tta = _evaluate(model, loader, criterion, batcher, num_classes, True, on_step, reduce, keep)
    assert tta is not None
    return plain, tta


class _Scores:
    """Running sums of one way of scoring a set: loss, top-1/top-5 hits, confusion matrix.

    The sums stay on the scores' device and are read back once, by :meth:`result`: on a GPU a
    read per batch would wait for every queued kernel, four or five times a batch."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.sums: torch.Tensor | None = None  # loss sum, top-1 hits, top-5 hits, images
        self.matrix: torch.Tensor | None = None  # int64 (true, predicted) counts

    def add(self, scores: torch.Tensor, loss: torch.Tensor, targets: torch.Tensor) -> None:
        """One batch: ``scores`` rank the classes (logits or probabilities), ``loss`` is its mean."""
        if self.sums is None or self.matrix is None:
            dtype = torch.float32 if scores.device.type == "mps" else torch.float64  # (MPS has no float64)
            self.sums = torch.zeros(4, dtype=dtype, device=scores.device)
            self.matrix = torch.zeros(self.num_classes ** 2, dtype=torch.int64, device=scores.device)
        n = targets.size(0)
        hits = topk_hits(scores.float(), targets, ks=(1, 5)).to(self.sums.dtype)
        batch = torch.cat([(loss.detach().to(self.sums.dtype) * n).reshape(1), hits,
                           torch.full((1,), n, dtype=self.sums.dtype, device=scores.device)])
        self.sums += batch
        cells = targets.to(torch.int64) * self.num_classes + scores.argmax(1)
        self.matrix.index_add_(0, cells, torch.ones_like(cells))

    def running(self) -> tuple[float, float, int]:
        """Loss and top-1 so far, and the images (one read of the device, for a progress bar)."""
        if self.sums is None:
            return math.nan, math.nan, 0
        loss_sum, top1, _, seen = self.sums.tolist()
        return loss_sum / max(seen, 1), top1 / max(seen, 1), int(seen)

    def result(self, seconds: float, reduce: Callable[[torch.Tensor], torch.Tensor] | None) -> EvalResult:
        sums = self.sums if self.sums is not None else torch.zeros(4, dtype=torch.float64)
        counts = self.matrix if self.matrix is not None else torch.zeros(self.num_classes ** 2, dtype=torch.int64)
        if reduce is not None:  # every rank calls this, also one whose shard was empty
            sums, counts = reduce(sums), reduce(counts)
        loss_sum, top1, top5, seen = sums.tolist()
        matrix = ConfusionMatrix(self.num_classes)
        matrix.matrix += counts.cpu().reshape(self.num_classes, self.num_classes)
        return EvalResult(
            loss=loss_sum / seen if seen else math.nan,
            acc=top1 / seen if seen else math.nan,
            top5=(top5 / seen if seen else math.nan) if self.num_classes > 5 else None,
            images=int(seen),
            seconds=seconds,
            confusion=matrix,
        )


def _evaluate(model: nn.Module, loader: Iterable, criterion: nn.Module, batcher: Batcher, num_classes: int,
              tta: bool, on_step: StepCallback | None, reduce: Callable[[torch.Tensor], torch.Tensor] | None,
              keep: BatchSink | None = None) -> tuple[EvalResult, EvalResult | None]:
    """The loop behind :func:`evaluate` and :func:`evaluate_with_tta`: plain scores, and with
    ``tta`` also those of the averaged views of each device-side batch. The progress callback
    reads the running figures every :func:`sync_every_for` batches."""
    model.eval()
    plain, augmented = _Scores(num_classes), (_Scores(num_classes) if tta else None)
    every, unreported = sync_every_for(batcher.device), 0
    start = time.perf_counter()
    for index, batch in enumerate(loader):
        images, targets, skipped = unpack(batch)
        if targets.numel():
            images, targets = batcher(images, targets)
        if targets.numel() == 0:
            if keep is not None:
                keep(None, targets, skipped)
            continue
        with batcher.autocast():
            views = view_logits(model, images) if tta else [model(images)]
            loss = criterion(views[0], targets)
        plain.add(views[0], loss, targets)
        if keep is not None:  # (the logits stay on the device: no read here)
            keep(views[0], targets, skipped)
        if augmented is not None:  # the flip of the normalised batch = the normalised flip of the images
            nll = nn.functional.nll_loss(average_log_probs(views), targets)
            augmented.add(average_probs(views), nll, targets)
        unreported += targets.size(0)
        if on_step is not None and (index + 1) % every == 0:
            loss_so_far, acc, seen = plain.running()
            on_step({"loss": loss_so_far, "acc": acc, "n": unreported,
                     "images_per_s": seen / max(time.perf_counter() - start, 1e-9)})
            unreported = 0
    seconds = time.perf_counter() - start
    return plain.result(seconds, reduce), (augmented.result(seconds, reduce) if augmented is not None else None)
