"""SE-ResNet and SE-ResNeXt (Hu et al., "Squeeze-and-Excitation Networks", 2018).

The blocks subclass torchvision's ``BasicBlock`` / ``Bottleneck`` and only add an ``se``
submodule, and the networks are torchvision's own ``ResNet`` built with those blocks. So
every key the plain network has keeps its name (``layer1.0.conv1.weight``) and the plain
ResNet's ImageNet weights load non-strictly, leaving just the ``se.*`` tensors fresh.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn
import torchvision
from torch import Tensor
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops import SqueezeExcitation

from cnntrain.models.registry import register_model

__all__ = ["SEBasicBlock", "SEBottleneck", "basic_branch", "bottleneck_branch", "shortcut", "squeeze_excitation"]

# Hu et al. use reduction ratio 16 throughout; it costs ~10% more parameters than ResNet.
SE_REDUCTION = 16


def squeeze_excitation(channels: int, reduction: int = SE_REDUCTION) -> SqueezeExcitation:
    """Pool -> 1x1 conv C->C/r -> ReLU -> 1x1 conv C/r->C -> sigmoid -> rescale.

    torchvision's op is exactly the paper's block (keys ``fc1``/``fc2``), so we reuse it.
    """
    return SqueezeExcitation(channels, max(1, channels // reduction))


def shortcut(block: BasicBlock | Bottleneck, x: Tensor) -> Tensor:
    """The identity path of a torchvision residual block (projected where it downsamples)."""
    return x if block.downsample is None else block.downsample(x)


def basic_branch(block: BasicBlock, x: Tensor) -> Tensor:
    """The residual path of a ``BasicBlock`` up to, not including, the addition."""
    out = block.relu(block.bn1(block.conv1(x)))
    return block.bn2(block.conv2(out))


def bottleneck_branch(block: Bottleneck, x: Tensor) -> Tensor:
    """The residual path of a ``Bottleneck`` up to, not including, the addition."""
    out = block.relu(block.bn1(block.conv1(x)))
    out = block.relu(block.bn2(block.conv2(out)))
    return block.bn3(block.conv3(out))


class SEBasicBlock(BasicBlock):
    """``BasicBlock`` whose residual branch is recalibrated by SE before the addition."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.se = squeeze_excitation(self.bn2.num_features)

    def forward(self, x: Tensor) -> Tensor:
        out = self.se(basic_branch(self, x))
        out += shortcut(self, x)
        return self.relu(out)


class SEBottleneck(Bottleneck):
    """``Bottleneck`` whose residual branch is recalibrated by SE before the addition."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.se = squeeze_excitation(self.bn3.num_features)

    def forward(self, x: Tensor) -> Tensor:
        out = self.se(bottleneck_branch(self, x))
        out += shortcut(self, x)
        return self.relu(out)


def _se_resnet(block: type[BasicBlock | Bottleneck], layers: list[int], num_classes: int, **kwargs: Any) -> ResNet:
    # torchvision's ResNet takes the block class, so its stem, stages, downsampling and
    # init (zero_init_residual included: the SE blocks are Bottleneck/BasicBlock) are reused.
    return ResNet(block, layers, num_classes=num_classes, **kwargs)


@register_model("se_resnet18", family="se_resnet", weights=torchvision.models.ResNet18_Weights.DEFAULT)
def se_resnet18(*, num_classes: int = 1000, **kwargs: Any) -> nn.Module:
    """SE-ResNet-18: ResNet-18 with squeeze-and-excitation in every block."""
    return _se_resnet(SEBasicBlock, [2, 2, 2, 2], num_classes, **kwargs)


@register_model("se_resnet34", family="se_resnet", weights=torchvision.models.ResNet34_Weights.DEFAULT)
def se_resnet34(*, num_classes: int = 1000, **kwargs: Any) -> nn.Module:
    """SE-ResNet-34: ResNet-34 with squeeze-and-excitation in every block."""
    return _se_resnet(SEBasicBlock, [3, 4, 6, 3], num_classes, **kwargs)


@register_model("se_resnet50", family="se_resnet", weights=torchvision.models.ResNet50_Weights.DEFAULT)
def se_resnet50(*, num_classes: int = 1000, **kwargs: Any) -> nn.Module:
    """SE-ResNet-50: ResNet-50 with squeeze-and-excitation in every block (28.1M params)."""
    return _se_resnet(SEBottleneck, [3, 4, 6, 3], num_classes, **kwargs)


@register_model("se_resnet101", family="se_resnet", weights=torchvision.models.ResNet101_Weights.DEFAULT)
def se_resnet101(*, num_classes: int = 1000, **kwargs: Any) -> nn.Module:
    """SE-ResNet-101: ResNet-101 with squeeze-and-excitation in every block."""
    return _se_resnet(SEBottleneck, [3, 4, 23, 3], num_classes, **kwargs)


@register_model("se_resnet152", family="se_resnet", weights=torchvision.models.ResNet152_Weights.DEFAULT)
def se_resnet152(*, num_classes: int = 1000, **kwargs: Any) -> nn.Module:
    """SE-ResNet-152: ResNet-152 with squeeze-and-excitation in every block."""
    return _se_resnet(SEBottleneck, [3, 8, 36, 3], num_classes, **kwargs)


@register_model(
    "se_resnext50_32x4d", family="se_resnet", weights=torchvision.models.ResNeXt50_32X4D_Weights.DEFAULT
)
def se_resnext50_32x4d(*, num_classes: int = 1000, **kwargs: Any) -> nn.Module:
    """SE-ResNeXt-50 (32x4d): ResNeXt-50 with squeeze-and-excitation in every block."""
    kwargs = {"groups": 32, "width_per_group": 4, **kwargs}
    return _se_resnet(SEBottleneck, [3, 4, 6, 3], num_classes, **kwargs)
