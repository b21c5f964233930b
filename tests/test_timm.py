"""timm architectures by name (`--arch timm/<name>`): built, sized, frozen, loaded and listed by timm.

Nothing is downloaded: the Hugging Face cache of every test is an empty temporary folder with
HF_HUB_OFFLINE set, and the one test that loads pretrained weights puts a file into that cache
itself, laid out as the hub leaves it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import invoke, one_line_error

from cnntrain import checkpoint
from cnntrain.errors import MissingDependencyError, UsageError, WeightsError
from cnntrain.models import build_model, get_spec, normalisation
from cnntrain.models.heads import freeze_backbone, is_head
from cnntrain.train.features import head_reproduces_model
from cnntrain.train.run_model import build_run_model

timm = pytest.importorskip("timm")  # the `timm` extra; the `test` extra installs it

COMMON = ["--no-pretrained", "--img-size", "32", "--batch-size", "8", "--workers", "0", "--device", "cpu",
          "--val-split", "0.25", "--epochs", "1", "--quiet"]


@pytest.fixture(autouse=True)
def offline_hub(tmp_path_factory, monkeypatch) -> Path:
    """An empty Hugging Face cache that may not be refilled from the network, for this process
    (huggingface_hub reads both settings when imported) and for any it starts."""
    from huggingface_hub import constants

    hub = tmp_path_factory.mktemp("hf") / "hub"
    monkeypatch.setenv("HF_HOME", str(hub.parent))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub




# ------------------------------------------------------------------------------- families

# One per family, each at the smallest size it takes: timm's own head name, a step on 3 classes
# (two images for BatchNorm's statistics; ViT's LayerNorms train on one at its 224 px).
FAMILIES = {
    "timm/resnet10t": ("fc", 32, 2),
    "timm/convnext_atto": ("head.fc", 32, 2),  # norm and pooling sit in `head`, before the classifier
    "timm/efficientnet_b0": ("classifier", 32, 2),
    "timm/mobilenetv3_small_050": ("classifier", 32, 2),
    "timm/vit_tiny_patch16_224": ("head", 224, 1),  # a fixed input size, from its pretrained config
}


@pytest.mark.parametrize("arch", FAMILIES)
def test_each_family_builds_with_its_own_head_and_a_frozen_step_trains_only_that_head(arch):
    head_name, size, batch = FAMILIES[arch]
    torch.manual_seed(0)
    run = build_run_model(arch, 3, pretrained=False, weights=None, resumed=None)
    model, head = run.model, run.head
    assert head == head_name == get_spec(arch).head
    assert model.get_submodule(head).out_features == 3  # timm sized it through num_classes
    assert get_spec(arch).min_size == size
    freeze_backbone(model, head)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(is_head(n, head) for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    logits = model(torch.randn(batch, 3, size, size))
    assert logits.shape == (batch, 3)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2][:batch])).backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    # the feature cache can train this head on the backbone's output
    assert head_reproduces_model(model, head, torch.randn(1, 3, size, size))


def test_normalisation_and_min_size_come_from_the_pretrained_config():
    for name in ("vit_tiny_patch16_224", "inception_v3", "convnext_atto", "swin_tiny_patch4_window7_224"):
        cfg = timm.models.get_pretrained_cfg(name)
        assert normalisation(f"timm/{name}") == (list(cfg.mean), list(cfg.std))
        assert get_spec(f"timm/{name}").min_size == (cfg.input_size[-1] if cfg.fixed_input_size else 32)
    assert normalisation("timm/vit_tiny_patch16_224") == ([0.5] * 3, [0.5] * 3)  # not ImageNet's
    assert get_spec("timm/swin_tiny_patch4_window7_224").min_size == 224
    spec = get_spec("timm/ConvNeXt_Atto.d2_in1k")  # any case, with a weights tag
    assert spec.name == "timm/convnext_atto.d2_in1k" and spec.source == "timm" and spec.family == "convnext"
    assert spec.weights_label == "timm/convnext_atto.d2_in1k"


@pytest.mark.parametrize("arch", ["timm/seresnext26d_32x4d", "timm/resnet50d", "timm/convnext_base"])
def test_larger_models_build_with_a_new_head_and_freeze_on_the_meta_device(arch):
    """Sizes, heads and freezing without the memory or the time, built as train builds them."""
    with torch.device("meta"):
        run = build_run_model(arch, 5, pretrained=False, weights=None, resumed=None)
    assert run.model.get_submodule(run.head).out_features == 5
    assert sum(p.numel() for p in run.model.parameters()) > 10e6
    freeze_backbone(run.model, run.head)
    assert {n for n, p in run.model.named_parameters() if p.requires_grad} == {f"{run.head}.weight",
                                                                                f"{run.head}.bias"}
    with torch.no_grad():
        assert run.model(torch.zeros(1, 3, 64, 64, device="meta")).shape == (1, 5)


# ------------------------------------------------------------------------------- names and errors


def test_unknown_names_and_tags_are_usage_errors_with_close_matches():
    with pytest.raises(UsageError, match=r"did you mean: timm/convnext_nano"):
        get_spec("timm/convnxt_nano")
    with pytest.raises(UsageError, match=r"no weights timm/convnext_nano\.bogus; its weights: .*in12k_ft_in1k"):
        get_spec("timm/convnext_nano.bogus")
    with pytest.raises(WeightsError, match="no pretrained weights; train it from scratch with --no-pretrained"):
        build_model("timm/convnext_atto_rms", 3, pretrained=True)  # an architecture timm has no weights for


def test_without_the_extra_a_timm_name_is_one_line_naming_the_pip_command(monkeypatch):
    from cnntrain.models.timm_models import timm_spec

    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` raise ImportError
    timm_spec.cache_clear()
    try:
        text = one_line_error(invoke("models", "--source", "timm", code=1))
        assert "needs timm, which is not installed: pip install 'cnntrain[timm]'" in text
        with pytest.raises(MissingDependencyError, match=r"pip install 'cnntrain\[timm\]'"):
            get_spec("timm/resnet10t")
    finally:
        timm_spec.cache_clear()  # names resolved while timm was "missing" must not stay failed


def test_importing_cnntrain_and_its_help_leave_timm_unimported():
    """In a fresh process: this one has imported timm long ago."""
    code = ("import sys, cnntrain, cnntrain.cli\n"
            "try:\n    cnntrain.cli.app(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('timm', 'huggingface_hub', 'torch') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


# ------------------------------------------------------------------------------- pretrained weights


def test_offline_pretrained_weights_are_one_line_naming_the_ways_out(image_folder, tmp_path):
    args = ["--arch", "timm/resnet10t", *COMMON[1:], "--project", str(tmp_path)]  # pretrained: the default
    text = one_line_error(invoke("train", "--data-path", str(image_folder), *args, code=1))
    assert "timm/resnet10t.c3_in1k" in text and "HF_HUB_OFFLINE" in text
    assert "--weights FILE" in text and "--no-pretrained" in text


def test_download_weights_of_a_timm_name_says_timm_fetches_them():
    text = one_line_error(invoke("download-weights", "timm/resnet10t", code=2))
    assert "through timm, into the Hugging Face cache" in text and "cnntrain train --arch timm/resnet10t" in text


def _into_hub_cache(hub: Path, repo: str, state: dict[str, torch.Tensor]) -> None:
    """``state`` as ``model.safetensors`` of ``repo``, in the layout the hub's downloads leave."""
    from safetensors.torch import save_file

    folder = hub / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "snapshots" / commit / "model.safetensors")


def test_pretrained_weights_load_through_timm_from_the_hugging_face_cache(offline_hub):
    torch.manual_seed(1)
    released = timm.create_model("resnet10t", num_classes=1000)
    _into_hub_cache(offline_hub, "timm/resnet10t.c3_in1k", released.state_dict())
    model, report = build_model("timm/resnet10t", 4, pretrained=True)
    assert report is not None and report.summary() == "loaded timm/resnet10t.c3_in1k; new head `fc`"
    assert model.fc.out_features == 4
    mine, theirs = model.state_dict(), released.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine if not is_head(k, "fc"))


# ------------------------------------------------------------------------------- the whole CLI


@pytest.fixture(scope="module")
def trained(tmp_path_factory, image_folder) -> tuple[Path, str]:
    """One run, started as an offline user would: ``--weights`` a plain state dict at timm's 1000
    classes (as the hub's pytorch_model.bin is), the backbone frozen, so the head trains on cached features."""
    folder = tmp_path_factory.mktemp("timm")
    torch.manual_seed(0)
    torch.save(timm.create_model("mobilenetv3_small_050").state_dict(), folder / "pytorch_model.bin")
    done = invoke("train", "--data-path", str(image_folder), "--arch", "timm/mobilenetv3_small_050",
                  "--weights", str(folder / "pytorch_model.bin"), "--freeze-layers", "--aug", "none", *COMMON[1:-1],
                  "--project", str(folder / "runs"))
    return folder / "runs" / "exp" / "best.pt", done.stdout


@pytest.mark.integration
def test_a_timm_run_from_a_weights_file_trains_its_head_on_cached_features_then_predicts_and_exports(trained,
                                                                                                      image_folder,
                                                                                                      tmp_path):
    best, printed = trained
    assert "the head trains on cached features" in printed and "head classifier.weight, classifier.bias has " \
        "another class count" in printed
    ckpt = checkpoint.load(best)
    cfg = timm.models.get_pretrained_cfg("mobilenetv3_small_050")
    assert ckpt["arch"] == "timm/mobilenetv3_small_050"  # predict, eval and export rebuild it by this name
    assert (ckpt["mean"], ckpt["std"]) == (pytest.approx(list(cfg.mean)), pytest.approx(list(cfg.std)))
    predicted = json.loads(invoke("predict", str(image_folder / "red"), "--weights", str(best),
                                  "--format", "json").stdout)
    assert len(predicted) == 12 and {p["answer"] for p in predicted} <= {"blue", "green", "red"}
    out = tmp_path / "model.onnx"
    exported = invoke("export", "--weights", str(best), "--format", "onnx", "--output", str(out)).stdout
    assert out.is_file() and "verified against PyTorch" in exported
    assert json.loads(out.with_name("model.onnx.json").read_text())["arch"] == "timm/mobilenetv3_small_050"


def test_models_lists_timm_names_with_counts_when_the_pattern_is_narrow():
    rows = json.loads(invoke("models", "--source", "timm", "convnext_atto*", "--format", "json").stdout)
    assert [r["name"] for r in rows] == ["timm/convnext_atto", "timm/convnext_atto_ols", "timm/convnext_atto_rms"]
    assert all(r["source"] == "timm" and r["family"] == "convnext" and r["gmacs"] > 0 for r in rows)
    assert rows[0]["params_m"] == pytest.approx(3.7, abs=0.05)  # timm's card: 3.7M
    assert [r["pretrained"] for r in rows] == [True, True, False]
    table = invoke("models", "--source", "timm", "convnext_atto*").stdout
    assert "3 timm architectures" in table and "d2_in1k" in table


def test_models_lists_a_wide_timm_pattern_without_counting_it():
    result = invoke("models", "--source", "timm", "resnet*", "--format", "json")
    rows = json.loads(result.stdout)
    assert len(rows) > 30 and "timm/resnet50d" in {r["name"] for r in rows}
    assert all(r["params_m"] is None and r["gmacs"] is None for r in rows)
    assert "narrow PATTERN" in result.stderr


def test_models_source_filters_the_built_in_zoo():
    rows = json.loads(invoke("models", "--source", "cnntrain", "resnet18", "--format", "json").stdout)
    assert [r["name"] for r in rows] == ["se_resnet18"]  # not torchvision's resnet18
    assert "--source must be one of" in one_line_error(invoke("models", "--source", "keras", code=2))


def test_a_failed_download_is_a_weights_error_not_a_hub_traceback(monkeypatch):
    """Online but unreachable (no DNS, a dead proxy): the hub's OSError becomes the same one line,
    which also says how to skip the hub's retries. (The private name is where timm's loader calls
    the hub; a rename makes this test fail, not pass.)"""
    from huggingface_hub import constants

    def unreachable(*args, **kwargs):
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_hf", unreachable)
    with pytest.raises(WeightsError, match="Name or service not known; set HF_HUB_OFFLINE=1") as caught:
        build_model("timm/resnet10t", 3, pretrained=True)
    assert "--weights FILE" in str(caught.value) and "\n" not in str(caught.value)
