"""Frozen-backbone feature cache: same result as training through the full model, much less work."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from cnntrain.cli import app
from cnntrain.weights import safe_load

pytestmark = pytest.mark.integration  # whole CLI trainings

TINY = ["--arch", "resnet18", "--no-pretrained", "--img-size", "32", "--batch-size", "8", "--workers", "0",
        "--device", "cpu", "--val-split", "0.25", "--freeze-layers", "--aug", "none", "--seed", "4"]


def train(runner, *args):
    result = runner.invoke(app, ["train", *args])
    assert result.exit_code == 0, result.output
    return result


def test_cached_head_equals_full_model_training(runner, image_folder, tmp_path):
    cached = train(runner, "--data-path", str(image_folder), *TINY, "--epochs", "3", "--project", str(tmp_path / "c"))
    assert "feature cache: backbone ran once" in cached.output
    full = train(runner, "--data-path", str(image_folder), *TINY, "--epochs", "3", "--no-feature-cache",
                 "--project", str(tmp_path / "f"))
    assert "feature cache" not in full.output
    a = safe_load(tmp_path / "c" / "exp" / "last.pt")["model"]
    b = safe_load(tmp_path / "f" / "exp" / "last.pt")["model"]
    for key in a:  # resnet18 has no dropout before its head: the two paths compute the same thing
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def test_checkpoint_accuracy_through_full_model_equals_cached_metrics(runner, image_folder, tmp_path):
    train(runner, "--data-path", str(image_folder), *TINY, "--epochs", "2", "--project", str(tmp_path))
    run = tmp_path / "exp"
    last_row = list(csv.DictReader((run / "metrics.csv").open()))[-1]
    result = runner.invoke(app, ["eval", "--weights", str(run / "last.pt"), "--data-path", str(image_folder),
                                 "--format", "json", "--workers", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["top1"] == float(last_row["val_acc"])
    assert abs(report["loss"] - float(last_row["val_loss"])) < 1e-4


def test_unfreeze_hands_over_to_full_training(runner, image_folder, tmp_path):
    result = train(runner, "--data-path", str(image_folder), *TINY, "--epochs", "2", "--unfreeze-epoch", "2",
                   "--project", str(tmp_path))
    assert "feature cache: backbone ran once" in result.output and "unfreezing all layers" in result.output
    torch.manual_seed(4)
    from cnntrain.models import get_model

    initial = get_model("resnet18", num_classes=3).state_dict()
    final = safe_load(tmp_path / "exp" / "last.pt")["model"]
    assert not torch.equal(initial["layer1.0.conv1.weight"], final["layer1.0.conv1.weight"])


def test_models_with_layers_after_the_head_fall_back(runner, image_folder, tmp_path):
    args = [a if a != "resnet18" else "squeezenet1_1" for a in TINY]
    result = train(runner, "--data-path", str(image_folder), *args, "--epochs", "1", "--project", str(tmp_path))
    assert "has layers after its head" in result.output
