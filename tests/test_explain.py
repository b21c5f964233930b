"""Grad-CAM (`cnntrain explain`), TensorBoard (`train --tensorboard`) and the run's train_batch.jpg.

The target layer is found for one small model of every family, on the meta device (shapes
only); the heatmaps are checked against a model built to look at one quadrant only; one tiny
training with --tensorboard and mixup (so that a stray random draw would show) is compared with
the same training without either the TensorBoard log or the preview.
"""

from __future__ import annotations

import csv
import importlib
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import make_image_folder
from PIL import Image
from test_models_zoo import REPRESENTATIVE, regnet_widths_on_the_cpu  # noqa: F401  (a fixture)
from typer.testing import CliRunner

from cnntrain.cli import app
from cnntrain.errors import UsageError
from cnntrain.explain.gradcam import gradcam_maps
from cnntrain.explain.targets import find_target_layer
from cnntrain.models import get_spec

TINY = ["--arch", "resnet18", "--no-pretrained", "--img-size", "32", "--batch-size", "8", "--workers", "0",
        "--device", "cpu", "--val-split", "0.25", "--epochs", "1", "--mixup", "0.4", "-q"]

# The layer a person would point Grad-CAM at, per family, at the architecture's own input size.
EXPECTED_LAYER = {
    "alexnet": "features", "cbam_resnet50": "layer4", "convnext_tiny": "features", "densenet121": "features",
    "efficientnet_b0": "features", "efficientnet_v2_s": "features", "googlenet": "inception5b",
    "inception_v3": "Mixed_7c", "mnasnet0_5": "layers", "mobilenet_v2": "features",
    "mobilenet_v3_small": "features", "regnet_x_400mf": "trunk_output", "resnet18": "layer4",
    "resnext50_32x4d": "layer4", "se_resnet18": "layer4", "shufflenet_v1_g1": "stage4",
    "shufflenet_v2_x0_5": "conv5", "squeezenet1_1": "classifier.2", "vgg11": "features",
    "wide_resnet50_2": "layer4", "swin_t": "permute", "maxvit_t": "blocks.3",
}
TRANSFORMERS_REFUSED = ["vit_b_32"]


def _on_meta(name: str) -> nn.Module:
    spec = get_spec(name)
    with torch.device("meta"):
        return spec.builder(num_classes=5, **spec.build_kwargs)


def test_every_family_has_an_expected_layer():
    """A new family in the zoo's list needs its layer here (swin_v2 is swin's code path)."""
    assert set(REPRESENTATIVE.values()) - {"swin_v2_t", *TRANSFORMERS_REFUSED} <= set(EXPECTED_LAYER)


@pytest.mark.usefixtures("regnet_widths_on_the_cpu")
@pytest.mark.parametrize("name", sorted(EXPECTED_LAYER))
def test_the_target_layer_is_the_last_feature_map_before_the_head(name):
    size = 299 if name == "inception_v3" else 224
    layer = find_target_layer(_on_meta(name), size, arch=name)
    assert layer.name == EXPECTED_LAYER[name]
    assert layer.shape[1] * layer.shape[2] > 1


@pytest.mark.parametrize("name", TRANSFORMERS_REFUSED)
def test_a_vision_transformer_gets_one_line_saying_grad_cam_is_for_cnns(name):
    with pytest.raises(UsageError, match="Grad-CAM is for CNNs: vit_b_32 turns the image into a sequence of tokens"):
        find_target_layer(_on_meta(name), 224, arch=name)


# ------------------------------------------------------------------------------- heatmaps


class Masked(nn.Module):
    """Keeps channel 0 in the top-right quarter of the map only, channel 1 in the bottom-left."""

    def __init__(self, size: int) -> None:
        super().__init__()
        mask = torch.zeros(1, 2, size, size)
        half = size // 2
        mask[:, 0, :half, half:] = 1
        mask[:, 1, half:, :half] = 1
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask


class Quadrants(nn.Module):
    """Class 0 is read from the top-right quarter of the image only, class 1 from the bottom-left:
    a model whose honest explanation is known. Its last map is the masked one, which Grad-CAM must
    take: the conv before it sees the whole image."""

    def __init__(self, size: int = 32) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        nn.init.constant_(self.conv.weight, 0.1)
        nn.init.constant_(self.conv.bias, 0.1)
        self.features = nn.Sequential(self.conv, nn.ReLU(), Masked(size))
        self.head = nn.Linear(2, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(2))
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def _quarter_means(heatmap: torch.Tensor) -> dict[str, float]:
    h = heatmap.shape[0] // 2
    return {"top-left": float(heatmap[:h, :h].mean()), "top-right": float(heatmap[:h, h:].mean()),
            "bottom-left": float(heatmap[h:, :h].mean()), "bottom-right": float(heatmap[h:, h:].mean())}


def test_the_heatmap_lies_where_the_model_looks():
    torch.manual_seed(0)
    model = Quadrants().train()
    images = torch.rand(3, 3, 32, 32)
    maps = gradcam_maps(model, images, [0, 1, 0])
    assert maps.shape == (3, 32, 32) and maps.min() >= 0 and maps.max() == 1
    for heatmap, where in zip(maps, ["top-right", "bottom-left", "top-right"]):
        means = _quarter_means(heatmap)
        assert max(means, key=means.__getitem__) == where, means
        assert all(v == 0 for k, v in means.items() if k != where), means  # not a pixel of evidence elsewhere
    assert model.training and all(p.grad is None for p in model.parameters())  # left as it was


def test_without_targets_the_prediction_is_explained():
    model = Quadrants()
    images = torch.rand(2, 3, 32, 32)
    images[0, :, 16:, :16] = 0  # nothing in class 1's quarter: class 0 wins
    images[1, :, :16, 16:] = 0
    predicted = model(images).argmax(1).tolist()
    assert predicted == [0, 1]
    assert torch.equal(gradcam_maps(model, images), gradcam_maps(model, images, predicted))


# ------------------------------------------------------------------------------- one tiny training


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 1-epoch run twice: with --tensorboard and train_batch.jpg, and with neither."""
    fit_module = importlib.import_module("cnntrain.train.fit")  # the module: cnntrain.train.fit is also the function

    root = tmp_path_factory.mktemp("explain")
    data = make_image_folder(root / "data", per_class=8)
    project = root / "runs"
    runner = CliRunner()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(root / "torch"))
        mp.setenv("CNNTRAIN_HOME", str(root / "cnntrain"))
        with_all = runner.invoke(app, ["train", "--data-path", str(data), *TINY, "--project", str(project),
                                       "--name", "with", "--tensorboard"])
        assert with_all.exit_code == 0, with_all.output
        mp.setattr(fit_module, "write_train_batch", lambda *args, **kwargs: None)
        without = runner.invoke(app, ["train", "--data-path", str(data), *TINY, "--project", str(project),
                                      "--name", "without"])
        assert without.exit_code == 0, without.output
    return {"with": project / "with", "without": project / "without", "data": data}


def _metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as fh:
        return [{k: v for k, v in row.items() if k not in ("seconds", "images_per_s")} for row in csv.DictReader(fh)]


@pytest.mark.integration
def test_neither_tensorboard_nor_the_preview_changes_the_run(runs):
    assert (runs["with"] / "train_batch.jpg").is_file() and (runs["with"] / "tensorboard").is_dir()
    assert not (runs["without"] / "train_batch.jpg").exists() and not (runs["without"] / "tensorboard").exists()
    assert _metrics(runs["with"]) == _metrics(runs["without"])
    with_weights = torch.load(runs["with"] / "last.pt", weights_only=True)["model"]
    without_weights = torch.load(runs["without"] / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(with_weights[k], without_weights[k]) for k in with_weights)


@pytest.mark.integration
def test_tensorboard_has_each_epochs_scalars_and_confusion_matrix(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(runs["with"] / "tensorboard"))
    events.Reload()
    row = _metrics(runs["with"])[0]
    for tag, column in [("loss/train", "train_loss"), ("loss/val", "val_loss"), ("accuracy/train", "train_acc"),
                        ("accuracy/val", "val_acc"), ("lr", "lr")]:
        (scalar,) = events.Scalars(tag)
        assert scalar.step == 1 and scalar.value == pytest.approx(float(row[column]), rel=1e-6), tag
    (image,) = events.Images("confusion_matrix")
    assert image.step == 1 and image.width > 100 and image.height > 100


@pytest.mark.integration
def test_train_batch_shows_the_whole_first_batch(runs):
    from cnntrain.train.preview import LABEL_HEIGHT, PAD, TILE_MIN

    with Image.open(runs["with"] / "train_batch.jpg") as picture:
        assert picture.format == "JPEG"
        width, height = picture.size
    cell = TILE_MIN + PAD  # 32 px inputs are enlarged to the smallest tile; batch 8 makes a 3 x 3 grid
    assert width == PAD + 3 * cell and height > 3 * (cell + LABEL_HEIGHT)


def test_the_preview_is_the_first_batch_and_draws_nothing_from_the_training_rng(image_folder):
    """The batch the first step trains on (mixup included), made again without moving any generator."""
    from cnntrain.data import load_folder
    from cnntrain.engine import unpack
    from cnntrain.train.mixing import build_batch_mix
    from cnntrain.train.pipeline import PipelineSettings, build_pipeline
    from cnntrain.train.preview import first_batch

    splits = load_folder(str(image_folder), val_split=0.25, seed=0)
    settings = PipelineSettings(img_size=32, batch_size=8, workers=0)
    pipeline = build_pipeline(splits, settings, device=torch.device("cpu"), mean=[0.5] * 3, std=[0.25] * 3,
                              channels_last=False, amp_dtype=None, image_cache=False)
    mix = build_batch_mix(0.4, 0.0, 0.5, 3)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    preview = first_batch(pipeline, 0, mix)
    assert preview is not None and torch.equal(torch.get_rng_state(), before)
    pipeline.sampler.set_epoch(0)  # as the loop does, then its first step
    images, targets, _ = unpack(next(iter(pipeline.train)))
    images, targets = mix(*pipeline.batcher(images, targets))
    assert torch.equal(preview[0], images) and torch.equal(preview[1], targets)


# ------------------------------------------------------------------------------- cnntrain explain


def _explain(*args: str):
    return CliRunner().invoke(app, ["explain", *args])


def _one_line(result) -> str:
    text = result.stderr.strip()
    assert text.startswith("error:") and "\n" not in text, text
    return text


@pytest.mark.integration
def test_explain_writes_a_picture_per_image(runs, tmp_path):
    images = [str(runs["data"] / "red" / "000.png"), str(runs["data"] / "blue" / "001.png")]
    result = _explain(*images, "--weights", str(runs["with"] / "best.pt"), "--output", str(tmp_path / "cams"))
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    for image, line in zip(images, lines):
        picture = tmp_path / "cams" / f"{Path(image).stem}_gradcam.png"
        assert line.startswith(f"{image}: ") and line.endswith(f"-> {picture}") and "(predicted)" in line
        assert picture.stat().st_size > 0
        with Image.open(picture) as png:
            assert png.format == "PNG"


@pytest.mark.integration
def test_explain_a_named_class(runs, tmp_path):
    image = str(runs["data"] / "red" / "002.png")
    result = _explain(image, "--weights", str(runs["with"] / "best.pt"), "--class", "green", "--format", "json",
                      "--output", str(tmp_path))
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert row["explained"] == "green" and 0 <= row["prob"] <= 1 and row["error"] is None
    assert Path(row["output"]).stat().st_size > 0
    predicted = CliRunner().invoke(app, ["predict", image, "--weights", str(runs["with"] / "best.pt"), "--format",
                                         "json"])
    (top, *rest) = json.loads(predicted.stdout)[0]["predictions"]  # the image read as predict reads it
    assert row["predicted"] == top["class"] and row["predicted_prob"] == pytest.approx(top["prob"], abs=2e-6)
    assert row["prob"] == pytest.approx(next(p["prob"] for p in rest + [top] if p["class"] == "green"), abs=2e-6)


@pytest.mark.integration
def test_explain_bad_input_is_one_line(runs, tmp_path):
    weights = str(runs["with"] / "best.pt")
    image = str(runs["data"] / "red" / "000.png")
    unknown = _explain(image, "--weights", weights, "--class", "gren", "--output", str(tmp_path))
    assert unknown.exit_code == 2
    assert "did you mean 'green'" in _one_line(unknown) and "blue, green, red" in _one_line(unknown)
    missing = _explain(image, "--weights", str(tmp_path / "none.pt"))
    assert missing.exit_code == 2 and "does not exist" in _one_line(missing)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    broken = _explain(str(tmp_path / "broken.jpg"), image, "--weights", weights, "--output", str(tmp_path))
    assert broken.exit_code == 1  # the readable image is still explained
    assert "broken.jpg: error:" in broken.stdout and (tmp_path / "000_gradcam.png").is_file()


def test_a_missing_extra_is_one_line_naming_the_pip_command(monkeypatch, image_folder, tmp_path):
    for module in ("captum", "captum.attr"):  # importing them now fails, as when captum is not installed
        monkeypatch.setitem(sys.modules, module, None)
    (tmp_path / "x.pt").write_bytes(b"")
    no_captum = _explain(str(image_folder / "red" / "000.png"), "--weights", str(tmp_path / "x.pt"))
    assert no_captum.exit_code == 1 and "pip install 'cnntrain[explain]'" in _one_line(no_captum)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    no_tensorboard = CliRunner().invoke(app, ["train", "--data-path", str(image_folder), "--tensorboard",
                                              "--project", str(tmp_path / "runs")])
    assert no_tensorboard.exit_code == 1 and "pip install 'cnntrain[tensorboard]'" in _one_line(no_tensorboard)
    assert not (tmp_path / "runs").exists()  # refused before any work


@pytest.mark.integration
def test_eval_explain_lays_grad_cam_over_the_top_losses(runs, tmp_path):
    common = ["eval", "--weights", str(runs["with"] / "best.pt"), "--data-path", str(runs["data"]), "--workers", "0",
              "--device", "cpu", "--format", "json"]
    plain, cams = tmp_path / "plain.png", tmp_path / "cams.png"
    for extra in (["--top-losses", str(plain)], ["--top-losses", str(cams), "--explain"]):
        result = CliRunner().invoke(app, [*common, *extra])
        assert result.exit_code == 0, result.output
    with Image.open(plain) as a, Image.open(cams) as b:
        assert a.size == b.size and a.tobytes() != b.tobytes()  # the same grid, now with heatmaps over it
    alone = CliRunner().invoke(app, [*common, "--explain"])
    assert alone.exit_code == 2 and "give --top-losses FILE.png too" in _one_line(alone)
