"""Every registered architecture builds with a new class count and trains one step.

The registry is parametrised over, so a newly registered model is tested without touching
this file. One small member of each family runs in every tier; the other members (about 55, over a
minute on two idle cores, several when they are busy) are in the `slow` group, which CI runs. The
giants (up to 630M parameters: three minutes of CI for the code their small relatives already ran)
are built and stepped on the meta device: every shape, the head swap and the gradient reaching
each parameter are checked, with no memory and no arithmetic.
"""

from __future__ import annotations

import pytest
import torch
import torchvision

from cnntrain.models import find_head, get_model, get_spec, list_models, model_info
from cnntrain.models.stats import model_stats

# Models whose single training step takes several seconds on two CPU cores.
GIANT = {name for name in list_models() if name.startswith(("vit_h", "vit_l", "regnet_y_128gf", "regnet_y_32gf",
                                                              "regnet_x_32gf", "efficientnet_b7", "efficientnet_v2_l",
                                                              "convnext_large", "swin_v2_b", "swin_b", "maxvit"))}
# The smallest member of each family; a new family needs one here (see the test below) unless all its
# members are giants.
REPRESENTATIVE = {
    "alexnet": "alexnet", "cbam_resnet": "cbam_resnet50", "convnext": "convnext_tiny", "densenet": "densenet121",
    "efficientnet": "efficientnet_b0", "efficientnet_v2": "efficientnet_v2_s", "googlenet": "googlenet",
    "inception": "inception_v3", "mnasnet": "mnasnet0_5", "mobilenet_v2": "mobilenet_v2",
    "mobilenet_v3": "mobilenet_v3_small", "regnet": "regnet_x_400mf", "resnet": "resnet18",
    "resnext": "resnext50_32x4d", "se_resnet": "se_resnet18", "shufflenet_v1": "shufflenet_v1_g1",
    "shufflenetv2": "shufflenet_v2_x0_5", "squeezenet": "squeezenet1_1", "swin_transformer": "swin_t",
    "swin_v2": "swin_v2_t", "vgg": "vgg11", "vision_transformer": "vit_b_32", "wide_resnet": "wide_resnet50_2",
}


def _params(name: str):
    fast = set(REPRESENTATIVE.values()) - GIANT
    return [n if n in fast else pytest.param(n, marks=pytest.mark.slow) for n in list_models()
            if n.startswith(name) and n not in GIANT]


@pytest.fixture
def regnet_widths_on_the_cpu(monkeypatch):
    """torchvision computes a RegNet's widths with tensors and reads them back: not on meta."""
    from torchvision.models.regnet import BlockParams

    compute = BlockParams.from_init_params.__func__

    def on_cpu(cls, *args, **kwargs):
        with torch.device("cpu"):
            return compute(cls, *args, **kwargs)

    monkeypatch.setattr(BlockParams, "from_init_params", classmethod(on_cpu))


def test_every_family_has_a_small_representative():
    families = {get_spec(n).family for n in list_models() if n not in GIANT}
    assert families == set(REPRESENTATIVE)
    assert all(get_spec(n).family == family for family, n in REPRESENTATIVE.items())


def test_every_torchvision_classifier_is_registered():
    tv = set(torchvision.models.list_models(module=torchvision.models))
    assert tv <= set(list_models())
    own = {"se_resnet18", "se_resnet34", "se_resnet50", "se_resnet101", "se_resnet152", "se_resnext50_32x4d",
           "cbam_resnet50", "shufflenet_v1_g1", "shufflenet_v1_g2", "shufflenet_v1_g3", "shufflenet_v1_g4",
           "shufflenet_v1_g8"}
    assert own <= set(list_models())
    assert all(get_spec(n).source == "cnntrain" for n in own)


def _one_step(name: str, device: str) -> torch.Tensor:
    torch.manual_seed(0)
    with torch.device(device):
        model = get_model(name, num_classes=7)
    size = max(64, get_spec(name).min_size)
    model.train()
    out = model(torch.randn(2, 3, size, size, device=device))
    assert out.shape == (2, 7)
    out.float().logsumexp(1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]
    assert find_head(model, 7)
    return out


@pytest.mark.parametrize("name", _params(""))
def test_builds_and_trains_one_step(name):
    assert torch.isfinite(_one_step(name, "cpu")).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(GIANT))
def test_giants_build_and_step_on_the_meta_device(name, regnet_widths_on_the_cpu):
    assert _one_step(name, "meta").is_meta


def test_list_models_pattern():
    assert list_models("resnet5*") == ["resnet50"]
    assert "se_resnet50" in list_models("se_res")
    assert list_models("no-such-model") == []


def test_list_models_sorts_numbers_naturally():
    # issue 17: digit runs compare as numbers, so resnet101 no longer precedes resnet18
    assert list_models("resnet*") == ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
    assert list_models("efficientnet_b*") == [f"efficientnet_b{i}" for i in range(8)]
    assert list_models("vit_b_*") == ["vit_b_16", "vit_b_32"]
    everything = list_models()
    assert everything.index("vgg11") < everything.index("vgg16") and len(set(everything)) == len(everything)


def test_stats_cache_logs_once_before_counting():
    # issue 17: the first `cnntrain models` must say why it is slow; a cached call says nothing
    from cnntrain.models.stats import model_stats_cached

    lines: list[str] = []
    first = model_stats_cached(["squeezenet1_1"], 64, log=lines.append)
    assert len(lines) == 1 and "1 architecture" in lines[0] and "64 px" in lines[0] and "cached in" in lines[0]
    again: list[str] = []
    assert model_stats_cached(["squeezenet1_1"], 64, log=again.append) == first
    assert again == []


def test_model_info_reports_weights_and_accuracy():
    info = model_info("resnet50")
    assert info["pretrained"] and info["weights"].startswith("resnet50-") and info["top1"] > 75
    assert info["source"] == "torchvision"
    se = model_info("se_resnet50")
    assert se["source"] == "cnntrain" and se["weights"].startswith("resnet50-") and se["top1"] is None
    assert model_info("shufflenet_v1_g3")["pretrained"] is False


def test_stats_match_torchvision_metadata():
    """Our MAC counter against torchvision's published GFLOPS (which are MACs) and params."""
    for name in ("resnet50", "mobilenet_v3_large", "vit_b_16", "regnet_y_400mf"):
        meta = get_spec(name).weights.meta
        stats = model_stats(name, 224)
        assert stats["params_m"] * 1e6 == meta["num_params"]
        assert stats["gmacs"] == pytest.approx(meta["_ops"], rel=0.05), name
