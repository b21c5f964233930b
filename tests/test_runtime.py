"""Device-level choices that depend on measurements, pinned so a change is deliberate."""

from __future__ import annotations

import pytest
import torch

from cnntrain.runtime import use_channels_last


@pytest.mark.parametrize("device,size,expected", [
    ("cuda", 32, True), ("cuda", 224, True),
    ("cpu", 32, False), ("cpu", 64, False), ("cpu", 96, True), ("cpu", 224, True),
    ("mps", 224, False),
])
def test_channels_last_where_it_was_measured_faster(device, size, expected):
    assert use_channels_last(torch.device(device), size) is expected
