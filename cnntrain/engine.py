"""One epoch of training and one pass of evaluation: plain loops, no globals.

Batches arrive as uint8 NCHW tensors; they are copied to the device as uint8 (4x fewer
bytes than float32) and converted, normalised and made channels_last there, so train,
eval and predict share one preprocessing definition (see ``Batcher``).
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn as nn

from cnntrain.data.transforms import Normalize
from cnntrain.errors import CnnTrainError
from cnntrain.metrics import ConfusionMatrix, topk_correct

StepCallback = Callable[[dict[str, float]], None]


class NonFiniteLossError(CnnTrainError):
    """The loss became NaN or infinite: training diverged."""


@dataclass
class Batcher:
    """Moves a uint8 batch to the device and turns it into the model's float input."""

    device: torch.device
    normalize: Normalize
    channels_last: bool = False
    amp_dtype: torch.dtype | None = None

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        non_blocking = self.device.type == "cuda"
        images = self.normalize(images.to(self.device, non_blocking=non_blocking))
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, targets.to(self.device, non_blocking=non_blocking)

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


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
) -> dict[str, float]:
    """Train for one pass over ``loader``; returns loss, acc, images/s and seconds."""
    model.train()
    if prepare_model is not None:
        prepare_model(model)  # e.g. keep frozen BatchNorm in eval mode
    loss_sum, correct, seen, start = 0.0, 0, 0, time.perf_counter()
    for step, (images, targets) in enumerate(loader, start=1):
        images, targets = batcher(images, targets)
        with batcher.autocast():
            logits = model(images)
            loss = criterion(logits, targets)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"loss became {loss.item()} at epoch {epoch}, step {step}: training diverged; "
                "try a lower --lr (or --clip-grad)"
            )
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if clip_grad:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if clip_grad:
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            optimizer.step()
        n = targets.size(0)
        loss_sum += loss.item() * n
        correct += int((logits.argmax(1) == targets).sum())
        seen += n
        if on_step is not None:
            elapsed = time.perf_counter() - start
            on_step({"loss": loss_sum / seen, "acc": correct / seen, "n": n,
                     "images_per_s": seen / max(elapsed, 1e-9), "lr": optimizer.param_groups[0]["lr"]})
    seconds = time.perf_counter() - start
    return {
        "loss": loss_sum / seen if seen else math.nan,
        "acc": correct / seen if seen else math.nan,
        "images": seen,
        "seconds": seconds,
        "images_per_s": seen / seconds if seconds > 0 else 0.0,
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    criterion: nn.Module,
    batcher: Batcher,
    num_classes: int,
    *,
    on_step: StepCallback | None = None,
) -> dict[str, object]:
    """Loss, top-1, top-5 and the confusion matrix over ``loader`` (every sample counted once)."""
    model.eval()
    matrix = ConfusionMatrix(num_classes)
    loss_sum, top1, top5, seen, start = 0.0, 0, 0, 0, time.perf_counter()
    for images, targets in loader:
        images, targets = batcher(images, targets)
        with batcher.autocast():
            logits = model(images)
            loss = criterion(logits, targets)
        n = targets.size(0)
        loss_sum += float(loss) * n
        hits = topk_correct(logits.float(), targets, ks=(1, 5))
        top1, top5, seen = top1 + hits[1], top5 + hits[5], seen + n
        matrix.update(logits.argmax(1).cpu(), targets.cpu())
        if on_step is not None:
            elapsed = time.perf_counter() - start
            on_step({"loss": loss_sum / seen, "acc": top1 / seen, "n": n,
                     "images_per_s": seen / max(elapsed, 1e-9)})
    return {
        "loss": loss_sum / seen if seen else math.nan,
        "acc": top1 / seen if seen else math.nan,
        "top5": top5 / seen if seen else math.nan,
        "images": seen,
        "seconds": time.perf_counter() - start,
        "confusion": matrix,
    }
