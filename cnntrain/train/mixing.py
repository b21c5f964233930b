"""Mixup and CutMix (``--mixup ALPHA``, ``--cutmix ALPHA``): pairs of training images blended.

Applied to the device-side batch, after the Batcher, through torchvision's ``v2.MixUp`` /
``v2.CutMix`` (with ``v2.RandomChoice`` between them when both are on). Targets become soft
(N x classes, rows summing to 1), which ``loss.TrainingLoss`` takes; train accuracy is then
counted against each mixed target's dominant class. The draws use torch's global generator,
which last.pt saves and restores, so a resumed run mixes as an uninterrupted one would.
"""

from __future__ import annotations

import torch

from cnntrain.engine import BatchTransform


def build_batch_mix(mixup: float, cutmix: float, switch_prob: float, num_classes: int) -> BatchTransform | None:
    """The batch transform for these alphas (0 = off); None when both are off."""
    if mixup <= 0 and cutmix <= 0:
        return None
    from torchvision.transforms import v2  # here: torchvision's v2 import is not free

    mixers = []
    if mixup > 0:
        mixers.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
    if cutmix > 0:
        mixers.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
    chosen = mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers, p=[1 - switch_prob, switch_prob])

    def mix(images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.shape[0] < 2:  # nothing to pair with
            return images, targets
        return chosen(images, targets)

    return mix


def describe_mix(mixup: float, cutmix: float, switch_prob: float) -> str:
    parts = ([f"mixup alpha {mixup:g}"] if mixup > 0 else []) + ([f"cutmix alpha {cutmix:g}"] if cutmix > 0 else [])
    how = f" (cutmix on {switch_prob:.0%} of batches)" if len(parts) == 2 else ""
    return f"batch mixing: {' and '.join(parts)}{how}; train accuracy counts each mixed image's dominant class"
