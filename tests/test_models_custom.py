"""cnntrain's own architectures: sizes match the papers, every one trains, SE keys line up
with torchvision's ResNet so its ImageNet weights load with only the SE layers fresh."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from cnntrain.models import find_head, get_model, get_spec, list_models
from cnntrain.models.shufflenet_v1 import channel_shuffle

CUSTOM = [name for name in list_models() if get_spec(name).source == "cnntrain"]


def _macs(name: str, size: int = 224, **kwargs: float) -> float:
    """Multiply-adds for one image, the unit papers call FLOPs; counted on the meta device
    (shapes only), so even large widths cost nothing."""
    with torch.device("meta"):
        model = get_model(name, **kwargs).eval()
        image = torch.zeros(1, 3, size, size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(image)
    return counter.get_total_flops() / 2


def test_registry_has_all_custom_models() -> None:
    expected = {
        "se_resnet18", "se_resnet34", "se_resnet50", "se_resnet101", "se_resnet152", "se_resnext50_32x4d",
        "cbam_resnet50",
        "shufflenet_v1_g1", "shufflenet_v1_g2", "shufflenet_v1_g3", "shufflenet_v1_g4", "shufflenet_v1_g8",
    }  # fmt: skip
    assert set(CUSTOM) == expected
    assert {get_spec(n).family for n in CUSTOM} == {"se_resnet", "cbam_resnet", "shufflenet_v1"}
    assert all(get_spec(n).weights is None for n in CUSTOM if n.startswith("shufflenet_v1"))


def test_se_resnet50_params_match_paper() -> None:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = get_model("se_resnet50")
    params = sum(p.numel() for p in model.parameters())
    assert params == pytest.approx(28.1e6, rel=0.02)


def test_shufflenet_v1_g3_macs_match_paper() -> None:
    # Zhang et al., Table 2: ShuffleNet 1x (g=3) costs 140 MFLOPs (multiply-adds) at 224 px.
    assert _macs("shufflenet_v1_g3") == pytest.approx(140e6, rel=0.05)


@pytest.mark.parametrize("name", CUSTOM)
def test_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    model = get_model(name, num_classes=7)
    model.train()
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.logsumexp(dim=1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"


@pytest.mark.parametrize("name", CUSTOM)
def test_head_is_fc(name: str) -> None:
    # get_model(pretrained=True) replaces the head found at the weights' class count.
    with torch.device("meta"):
        model = get_model(name, num_classes=1000)
    assert find_head(model, 1000) == "fc"


@pytest.mark.parametrize("width_mult", [0.5, 1.5, 2.0])
def test_shufflenet_v1_width_multipliers(width_mult: float) -> None:
    model = get_model("shufflenet_v1_g3", num_classes=5, width_mult=width_mult)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 5)
    assert torch.isfinite(out).all()


def test_shufflenet_v1_width_scales_cost() -> None:
    # Zhang et al., Table 3: ShuffleNet 2x (g=3) costs 524 MFLOPs; 0.5x about 38.
    assert _macs("shufflenet_v1_g3", width_mult=2.0) == pytest.approx(524e6, rel=0.05)
    assert _macs("shufflenet_v1_g3", width_mult=0.5) == pytest.approx(38e6, rel=0.05)


def test_shufflenet_v1_rejects_unknown_groups() -> None:
    from cnntrain.models.shufflenet_v1 import ShuffleNetV1

    with pytest.raises(ValueError, match="groups"):
        ShuffleNetV1(groups=5)


def test_channel_shuffle_interleaves_groups() -> None:
    x = torch.arange(6.0).view(1, 6, 1, 1)
    assert channel_shuffle(x, 3).flatten().tolist() == [0.0, 2.0, 4.0, 1.0, 3.0, 5.0]


@pytest.mark.parametrize(
    ("name", "plain", "marker"),
    [
        ("se_resnet50", "resnet50", ".se."),
        ("se_resnet18", "resnet18", ".se."),
        ("se_resnext50_32x4d", "resnext50_32x4d", ".se."),
        ("cbam_resnet50", "resnet50", ".cbam."),
    ],
)
def test_plain_resnet_weights_load_partially(name: str, plain: str, marker: str, tmp_path: Path) -> None:
    # The registered weights are those of the plain network the model extends ...
    assert get_spec(name).weights == torchvision.models.get_model_weights(plain).DEFAULT
    # ... and a plain state dict (random here: nothing is downloaded) fills every shared key.
    torch.manual_seed(0)
    path = tmp_path / f"{plain}.pth"
    torch.save(torchvision.models.get_model(plain, weights=None).state_dict(), path)
    state = torch.load(path, weights_only=True)

    model = get_model(name)
    result = model.load_state_dict(state, strict=False)

    added = {k for k in model.state_dict() if marker in k}
    assert added, f"{name} has no {marker} keys"
    assert set(result.missing_keys) == added
    assert result.unexpected_keys == []
    loaded = model.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def test_zero_init_residual_passes_through() -> None:
    model = get_model("se_resnet18", num_classes=3, zero_init_residual=True)
    assert all(block.bn2.weight.abs().sum() == 0 for layer in (model.layer1, model.layer4) for block in layer)
