"""The channel shuffle keeps channels_last (issue 14): same values as the textbook shuffle, and a
channels_last ShuffleNet stays channels_last from block to block with torchvision's outputs."""

from __future__ import annotations

import pytest
import torch
import torchvision

from cnntrain.models import get_model
from cnntrain.models.shuffle import channel_shuffle


def textbook(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


@pytest.mark.parametrize("groups", [2, 3, 4])
def test_shuffle_is_the_textbook_permutation_in_either_layout(groups):
    x = torch.randn(2, 12, 3, 5)
    nhwc = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(channel_shuffle(x, groups), textbook(x, groups))
    kept = channel_shuffle(nhwc, groups)
    assert torch.equal(kept, textbook(x, groups))
    assert kept.is_contiguous(memory_format=torch.channels_last) and not kept.is_contiguous()
    assert channel_shuffle(x, groups).is_contiguous()  # NCHW stays NCHW


def test_shufflenet_v2_stays_channels_last_and_matches_torchvision():
    ours = get_model("shufflenet_v2_x0_5", num_classes=3).eval()
    theirs = torchvision.models.shufflenet_v2_x0_5(num_classes=3).eval()
    theirs.load_state_dict(ours.state_dict())  # the same modules: the state dict fits as it is
    x = torch.randn(2, 3, 64, 64)
    layouts = []
    ours.stage2.register_forward_hook(lambda m, args, out: layouts.append(out.is_contiguous(
        memory_format=torch.channels_last)))
    with torch.no_grad():
        expected = theirs(x)
        assert torch.allclose(ours(x), expected, atol=1e-6)
        ours.to(memory_format=torch.channels_last)
        assert torch.allclose(ours(x.contiguous(memory_format=torch.channels_last)), expected, atol=1e-5)
    assert layouts == [False, True]  # NCHW in, NCHW out; channels_last in, channels_last out
