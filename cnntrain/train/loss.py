"""The training objective, built from the run's configuration.

A loss-side feature changes this module only: label smoothing, per-class weights
(``--class-weights``) and the soft targets of mixup/cutmix all meet here. ``build_objective``
is what ``fit`` and ``lr-find`` both train with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from cnntrain.engine import BatchTransform
from cnntrain.train.imbalance import class_weights, describe_weights
from cnntrain.train.mixing import build_batch_mix, describe_mix

if TYPE_CHECKING:
    from cnntrain.config import TrainConfig


class TrainingLoss(nn.Module):
    """Cross-entropy on the logits, for hard (class index) or soft (N x classes) targets.

    With class weights the loss is the weighted mean ``sum_i w_i l_i / sum_i w_i``, ``w_i`` the
    weight of sample i's class (for a soft target, its targets' weights mixed by the target):
    torch's ``CrossEntropyLoss(weight=...)`` rule for hard targets, the same rule for soft ones,
    so a batch of one class has the same loss whatever that class's weight."""

    def __init__(self, label_smoothing: float = 0.0, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing
        self.weight = weight

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if weight is not None and weight.device != logits.device:
            weight = self.weight = weight.to(logits.device)
        if targets.dim() == 1:
            w = None if weight is None else weight.to(logits.dtype)
            return F.cross_entropy(logits, targets, weight=w, label_smoothing=self.label_smoothing)
        classes = logits.shape[1]
        soft = targets.to(logits.dtype) * (1 - self.label_smoothing) + self.label_smoothing / classes
        per_sample = -(soft * F.log_softmax(logits, dim=1)).sum(dim=1)
        if weight is None:
            return per_sample.mean()
        sample_weight = targets.to(logits.dtype) @ weight.to(logits.dtype)
        return (per_sample * sample_weight).sum() / sample_weight.sum().clamp_min(torch.finfo(logits.dtype).tiny)


def build_loss(label_smoothing: float = 0.0, weight: torch.Tensor | None = None) -> nn.Module:
    """The training loss; ``weight``: one per class (``cnntrain.train.imbalance.class_weights``)."""
    return TrainingLoss(label_smoothing, weight)


@dataclass
class Objective:
    """What training minimises, and on what: the loss, validation's loss, the batch mixing."""

    criterion: nn.Module
    val_criterion: nn.Module
    batch_transform: BatchTransform | None


def build_objective(cfg: TrainConfig, classes: Sequence[str], counts: Sequence[int],
                    log: Callable[[str], None] = lambda s: None) -> Objective:
    """The training loss (label smoothing, class weights) and mixup/cutmix. Validation's loss is
    unweighted, so val_loss stays comparable between runs with and without class weights."""
    weights = class_weights(cfg.class_weights, classes, counts)
    if weights is not None:
        log(describe_weights(weights, classes, cfg.class_weights))
    mix = build_batch_mix(cfg.mixup, cfg.cutmix, cfg.mix_switch_prob, len(classes))
    if mix is not None:
        log(describe_mix(cfg.mixup, cfg.cutmix, cfg.mix_switch_prob))
    criterion = build_loss(cfg.label_smoothing, weights)
    return Objective(criterion, build_loss(cfg.label_smoothing) if weights is not None else criterion, mix)
