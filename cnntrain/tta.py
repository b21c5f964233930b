"""Test-time augmentation (``--tta`` of predict and eval): each image as given and mirrored.

The model scores both views and their softmax probabilities are averaged. Probabilities,
not logits: averaging logits lets one view's confident scale drown the other's, while the
mean of two distributions is itself a distribution whose NLL and ranking are comparable
with the plain model's.

Only the horizontal flip, because it is the one view that is label-preserving for nearly
every photo dataset and costs exactly one more forward pass; crops and scales would need
the checkpoint's resize policy and change what eval's plain figures mean.

The flip is applied to the NCHW batch the caller's model takes, uint8 or float: flipping
commutes with the per-channel normalisation, so a PyTorch checkpoint (flipped before or
after :class:`cnntrain.engine.Batcher`) and an ONNX / TorchScript export (flipped uint8
input) give the same answer. ``torch.flip`` is the whole augmentation; no library is needed
for averaging two softmaxes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

Logits = Callable[[torch.Tensor], torch.Tensor]


def hflip(images: torch.Tensor) -> torch.Tensor:
    """The batch mirrored left-right (the last, width axis; memory format kept)."""
    return images.flip(-1)


def view_logits(logits_of: Logits, images: torch.Tensor) -> list[torch.Tensor]:
    """The logits of each view of ``images`` (the plain ones first, so a caller that also
    wants the un-augmented figures has them without a third forward pass)."""
    return [logits_of(images), logits_of(hflip(images))]


def average_probs(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean of the views' softmax probabilities (float32, whatever precision the model ran in)."""
    return torch.stack([v.float().softmax(dim=1) for v in logits]).mean(dim=0)


def average_log_probs(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """``log(average_probs(logits))`` computed in log space, so the NLL of a confident mistake
    stays finite where the probability itself would underflow to 0."""
    stacked = torch.stack([v.float().log_softmax(dim=1) for v in logits])
    return torch.logsumexp(stacked, dim=0) - math.log(len(logits))


def tta_probs(logits_of: Logits, images: torch.Tensor) -> torch.Tensor:
    """Class probabilities of ``images`` averaged over the image and its mirror image."""
    return average_probs(view_logits(logits_of, images))
