"""The training loss, built from the run's configuration.

One function, so a loss-side feature (class weights, soft targets from mixup) changes this
module only, and a test can swap the loss without patching torch.
"""

from __future__ import annotations

import torch.nn as nn


def build_loss(label_smoothing: float = 0.0) -> nn.Module:
    """Cross-entropy on the logits; the same module scores training and validation."""
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)
