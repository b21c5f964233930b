"""CBAM-ResNet (Woo et al., "CBAM: Convolutional Block Attention Module", 2018).

Like SE-ResNet, the block subclasses torchvision's ``Bottleneck`` and adds one ``cbam``
submodule, and the network is torchvision's ``ResNet``: the plain ResNet-50 weights load
non-strictly and only the ``cbam.*`` tensors start fresh.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torchvision
from torch import Tensor
from torchvision.models.resnet import Bottleneck, ResNet

from cnntrain.models.registry import register_model
from cnntrain.models.se_resnet import bottleneck_branch, shortcut

__all__ = ["CBAM", "CBAMBottleneck", "ChannelAttention", "SpatialAttention"]


class ChannelAttention(nn.Module):
    """Which channels matter: avg- and max-pooled descriptors share one MLP, summed, sigmoid.

    Max pooling adds the most salient response per channel, which plain SE's average misses.
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1)

    def _mlp(self, x: Tensor) -> Tensor:
        return self.fc2(self.relu(self.fc1(x)))

    def forward(self, x: Tensor) -> Tensor:
        avg = x.mean(dim=(2, 3), keepdim=True)
        peak = x.amax(dim=(2, 3), keepdim=True)
        return x * torch.sigmoid(self._mlp(avg) + self._mlp(peak))


class SpatialAttention(nn.Module):
    """Where to look: channel-wise mean and max, concatenated, through a 7x7 conv, sigmoid."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(pooled))


class CBAM(nn.Module):
    """Channel attention, then spatial attention (the order the paper found best)."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7) -> None:
        super().__init__()
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = SpatialAttention(kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.spatial(self.channel(x))


class CBAMBottleneck(Bottleneck):
    """``Bottleneck`` whose residual branch is refined by CBAM before the addition."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cbam = CBAM(self.bn3.num_features)

    def forward(self, x: Tensor) -> Tensor:
        out = self.cbam(bottleneck_branch(self, x))
        out += shortcut(self, x)
        return self.relu(out)


@register_model("cbam_resnet50", family="cbam_resnet", weights=torchvision.models.ResNet50_Weights.DEFAULT)
def cbam_resnet50(*, num_classes: int = 1000, **kwargs: Any) -> nn.Module:
    """CBAM-ResNet-50: ResNet-50 with channel and spatial attention in every block."""
    return ResNet(CBAMBottleneck, [3, 4, 6, 3], num_classes=num_classes, **kwargs)
