"""ShuffleNet V1 (Zhang et al., "ShuffleNet: An Extremely Efficient CNN for Mobile Devices", 2017).

torchvision only ships V2. V1 makes 1x1 convolutions cheap by grouping them, and shuffles
channels between the two grouped convs so information still crosses groups. No ImageNet
weights exist in torchvision, so these models train from scratch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from cnntrain.models.registry import register_model
from cnntrain.models.shuffle import channel_shuffle

__all__ = ["ShuffleNetV1", "ShuffleUnit", "channel_shuffle"]

# Output channels of stages 2-4 at 1.0x, per group count (paper, Table 1): wider for more
# groups, which keeps the complexity near 140 MFLOPs at every g.
STAGE_CHANNELS: dict[int, tuple[int, int, int]] = {
    1: (144, 288, 576),
    2: (200, 400, 800),
    3: (240, 480, 960),
    4: (272, 544, 1088),
    8: (384, 768, 1536),
}
STAGE_REPEATS = (4, 8, 4)
STEM_CHANNELS = 24


def _round_channels(value: float, divisor: int) -> int:
    """Nearest multiple of ``divisor`` (never below it, never 10% under ``value``)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def _conv_bn(cin: int, cout: int, kernel_size: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel_size, stride, padding=kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]


class ShuffleUnit(nn.Module):
    """Grouped 1x1 -> shuffle -> depthwise 3x3 -> grouped 1x1, plus a shortcut.

    Stride 1 adds the input (residual); stride 2 concatenates a 3x3 average-pooled input,
    which widens the output cheaply, so the branch only produces ``out - in`` channels.
    ``group_first=False`` keeps the first 1x1 dense: stage 2's input has too few channels
    to split.
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int, stride: int, group_first: bool = True) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, not {stride}")
        if stride == 1 and in_channels != out_channels:
            raise ValueError("a stride-1 unit adds its input, so in_channels must equal out_channels")
        branch_out = out_channels - in_channels if stride == 2 else out_channels
        mid = out_channels // 4  # the paper's bottleneck: a quarter of the unit's output
        first_groups = groups if group_first else 1
        self.stride = stride
        # Shuffling after a dense conv would only permute channels, so skip it there.
        self.shuffle_groups = first_groups
        self.compress = nn.Sequential(*_conv_bn(in_channels, mid, 1, groups=first_groups), nn.ReLU(inplace=True))
        # No ReLU after the depthwise conv: the paper found it hurts in these thin layers.
        self.depthwise = nn.Sequential(*_conv_bn(mid, mid, 3, stride=stride, groups=mid))
        self.expand = nn.Sequential(*_conv_bn(mid, branch_out, 1, groups=groups))
        self.pool = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else None
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.compress(x)
        if self.shuffle_groups > 1:
            out = channel_shuffle(out, self.shuffle_groups)
        out = self.expand(self.depthwise(out))
        if self.pool is not None:
            out = torch.cat([self.pool(x), out], dim=1)
        else:
            out = out + x
        return self.relu(out)


class ShuffleNetV1(nn.Module):
    """Stem (3x3/2 conv, 3x3/2 max-pool), three stages of shuffle units, global pool, ``fc``.

    ``width_mult`` scales every layer (the paper's "ShuffleNet s x"); channels are rounded
    to multiples of ``4 * groups`` so that the bottleneck (a quarter of them) still splits
    evenly into groups.
    """

    def __init__(self, groups: int = 3, width_mult: float = 1.0, num_classes: int = 1000) -> None:
        super().__init__()
        if groups not in STAGE_CHANNELS:
            raise ValueError(f"groups must be one of {sorted(STAGE_CHANNELS)}, not {groups}")
        if width_mult <= 0:
            raise ValueError(f"width_mult must be positive, not {width_mult}")
        self.groups = groups
        self.width_mult = width_mult

        # A multiple of groups, so that each stride-2 branch (out - in channels) splits evenly.
        stem = _round_channels(STEM_CHANNELS * width_mult, groups)
        self.conv1 = nn.Sequential(*_conv_bn(3, stem, 3, stride=2), nn.ReLU(inplace=True))
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)

        in_channels = stem
        stages: list[nn.Sequential] = []
        for index, (base, repeats) in enumerate(zip(STAGE_CHANNELS[groups], STAGE_REPEATS)):
            out_channels = _round_channels(base * width_mult, 4 * groups)
            units = [ShuffleUnit(in_channels, out_channels, groups, stride=2, group_first=index > 0)]
            units += [ShuffleUnit(out_channels, out_channels, groups, stride=1) for _ in range(repeats - 1)]
            stages.append(nn.Sequential(*units))
            in_channels = out_channels
        self.stage2, self.stage3, self.stage4 = stages

        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.stage4(self.stage3(self.stage2(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _shufflenet_v1(groups: int, num_classes: int, width_mult: float, **kwargs: Any) -> ShuffleNetV1:
    return ShuffleNetV1(groups=groups, width_mult=width_mult, num_classes=num_classes, **kwargs)


@register_model("shufflenet_v1_g1", family="shufflenet_v1")
def shufflenet_v1_g1(*, num_classes: int = 1000, width_mult: float = 1.0, **kwargs: Any) -> nn.Module:
    """ShuffleNet V1 with 1 group (dense 1x1 convolutions, the paper's baseline)."""
    return _shufflenet_v1(1, num_classes, width_mult, **kwargs)


@register_model("shufflenet_v1_g2", family="shufflenet_v1")
def shufflenet_v1_g2(*, num_classes: int = 1000, width_mult: float = 1.0, **kwargs: Any) -> nn.Module:
    """ShuffleNet V1 with 2 groups in its 1x1 convolutions."""
    return _shufflenet_v1(2, num_classes, width_mult, **kwargs)


@register_model("shufflenet_v1_g3", family="shufflenet_v1")
def shufflenet_v1_g3(*, num_classes: int = 1000, width_mult: float = 1.0, **kwargs: Any) -> nn.Module:
    """ShuffleNet V1 with 3 groups in its 1x1 convolutions (the paper's usual choice)."""
    return _shufflenet_v1(3, num_classes, width_mult, **kwargs)


@register_model("shufflenet_v1_g4", family="shufflenet_v1")
def shufflenet_v1_g4(*, num_classes: int = 1000, width_mult: float = 1.0, **kwargs: Any) -> nn.Module:
    """ShuffleNet V1 with 4 groups in its 1x1 convolutions."""
    return _shufflenet_v1(4, num_classes, width_mult, **kwargs)


@register_model("shufflenet_v1_g8", family="shufflenet_v1")
def shufflenet_v1_g8(*, num_classes: int = 1000, width_mult: float = 1.0, **kwargs: Any) -> nn.Module:
    """ShuffleNet V1 with 8 groups in its 1x1 convolutions (widest at equal cost)."""
    return _shufflenet_v1(8, num_classes, width_mult, **kwargs)
