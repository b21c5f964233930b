"""Pretrained loading through `build_model`: partial loads into our models, head swaps, quirks.

The real ImageNet files cannot be downloaded here, so the weights module is pointed at state
dicts that the tests build (randomly initialised torchvision models of the same layout).
"""

from __future__ import annotations

import pytest
import torch
import torchvision

from cnntrain import weights
from cnntrain.models import build_model


@pytest.fixture
def fake_weights(monkeypatch):
    """Serve a freshly built torchvision model's state dict as the 'ImageNet' weights."""
    served: dict[str, dict[str, torch.Tensor]] = {}

    def state_for(w) -> dict[str, torch.Tensor]:
        name = next(n for n in torchvision.models.list_models(module=torchvision.models)
                    if torchvision.models.get_model_weights(n).DEFAULT == w)
        if name not in served:
            torch.manual_seed(123)
            served[name] = torchvision.models.get_model(name, weights=None).state_dict()
        return served[name]

    monkeypatch.setattr(weights, "ensure_cached", lambda w, **kw: weights.cache_dir() / weights.file_name(w))
    monkeypatch.setattr(weights, "load_state_dict", lambda w, **kw: state_for(w))
    return served


def test_se_resnet50_from_resnet50_weights(fake_weights):
    model, report = build_model("se_resnet50", num_classes=7, pretrained=True)
    source = fake_weights["resnet50"]
    own = model.state_dict()
    shared = [k for k in source if not k.startswith("fc.")]
    assert all(torch.equal(own[k], source[k]) for k in shared)
    assert report.fresh and all(".se." in k for k in report.fresh)
    assert not report.unexpected
    assert report.head == "fc" and model.fc.out_features == 7
    assert "start fresh" in report.summary() and "new head" in report.summary()


@pytest.mark.parametrize("name", ["shufflenet_v2_x0_5", "mobilenet_v3_small", "squeezenet1_1", "densenet121",
                                  "googlenet"])
def test_torchvision_weights_then_head_swap(fake_weights, name):
    model, report = build_model(name, num_classes=4, pretrained=True)
    source = fake_weights[name]
    own = model.state_dict()
    loaded = [k for k in own if k in source and own[k].shape == source[k].shape]
    assert len(loaded) >= len(own) - 2  # everything but the new head
    assert all(torch.equal(own[k], source[k]) for k in loaded)
    assert report.head is not None
    model.eval()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 4)


@pytest.mark.parametrize("pretrained", [True, False])
def test_shufflenet_v2_keeps_channels_last_pretrained_or_not(fake_weights, pretrained):
    model, _ = build_model("shufflenet_v2_x0_5", num_classes=3, pretrained=pretrained)  # torchvision builds it
    x = torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    model.eval().to(memory_format=torch.channels_last)
    with torch.no_grad():
        out = model.stage2(model.maxpool(model.conv1(x)))
    assert out.is_contiguous(memory_format=torch.channels_last)  # torchvision's own shuffle returns NCHW


def test_googlenet_aux_heads_dropped_after_pretrained_load(fake_weights):
    model, _ = build_model("googlenet", num_classes=3, pretrained=True)
    assert model.aux1 is None and model.aux2 is None
    model.train()
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)  # a tensor, not GoogLeNetOutputs


def test_no_weights_for_our_shufflenet_v1():
    from cnntrain.errors import WeightsError

    with pytest.raises(WeightsError, match="--no-pretrained"):
        build_model("shufflenet_v1_g3", num_classes=3, pretrained=True)
