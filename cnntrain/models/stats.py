"""Parameter and multiply-add counts, measured with torch's own FLOP counter.

Models are built on the meta device where the builder allows it, so even the largest
networks are counted in well under a second without allocating their weights.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from cnntrain.models.registry import get_spec


def count_macs(model: nn.Module, img_size: int = 224, device: torch.device | str | None = None) -> int:
    """Multiply-adds of one forward pass at batch 1 (torch counts a MAC as 2 FLOPs)."""
    device = device or next(model.parameters()).device
    x = torch.zeros(1, 3, img_size, img_size, device=device)
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    model.train(was_training)
    return counter.get_total_flops() // 2


def _build_for_counting(name: str) -> nn.Module:
    spec = get_spec(name)
    try:
        with torch.device("meta"):
            return spec.builder(num_classes=1000, **spec.build_kwargs)
    except (NotImplementedError, RuntimeError):
        # A few builders (RegNet) compute their widths with tensors, which meta cannot hold.
        return spec.builder(num_classes=1000, **spec.build_kwargs).to("meta")


def model_stats(name: str, img_size: int = 224) -> dict[str, float]:
    """Parameters (millions) and GMACs at ``img_size`` for the 1000-class ImageNet model."""
    model = _build_for_counting(name)
    size = max(img_size, get_spec(name).min_size)
    return {
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "gmacs": count_macs(model, size, device="meta") / 1e9,
        "img_size": size,
    }
