"""Channel shuffle that keeps a channels_last tensor channels_last.

The textbook shuffle (``view(n, g, c/g, h, w).transpose(1, 2).contiguous()``) always returns an
NCHW tensor. In a channels_last model every shuffle then turns the activations back to NCHW and
the next convolution reorders them again, and BatchNorm and ReLU backward run on mixed layouts:
on a 2-core CPU that made a channels_last training step of shufflenet_v2_x1_0 (224 px, batch 32)
0.93x of the same step in NCHW. Shuffling along the last axis of the NHWC view instead keeps the
layout, and the same step ran 1.13x NCHW (30 alternated rounds). The values are the same
permutation of channels either way, so weights, exports and outputs do not change.

torchvision's ShuffleNet V2 blocks call its module-level shuffle, so :func:`keep_memory_format`
gives each of them a subclass whose forward calls this one instead.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.shufflenetv2 import InvertedResidual

__all__ = ["channel_shuffle", "keep_memory_format"]


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """Interleave the channels of ``groups`` groups, in ``x``'s own memory format."""
    n, c, h, w = x.shape
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        nhwc = x.permute(0, 2, 3, 1)  # a contiguous view: channels are the last axis
        shuffled = nhwc.reshape(n, h, w, groups, c // groups).transpose(3, 4).reshape(n, h, w, c)
        return shuffled.permute(0, 3, 1, 2)
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class _InvertedResidual(InvertedResidual):
    """torchvision's ShuffleNet V2 block with the layout-keeping shuffle (same modules, same state)."""

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


def keep_memory_format(model: nn.Module) -> nn.Module:
    """Make every ShuffleNet V2 block of ``model`` shuffle with :func:`channel_shuffle`."""
    for module in model.modules():
        if type(module) is InvertedResidual:
            module.__class__ = _InvertedResidual
    return model
