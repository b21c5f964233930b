"""Test-time augmentation (``--tta``): the image and its mirror image, softmax probabilities averaged.

Nothing is trained: the mechanism is pinned on hand-written models whose flip behaviour is
known, and the commands on an untrained checkpoint, whose rankings are arbitrary but fixed.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from cnntrain import tta
from cnntrain.cli import app

CLASSES = [f"c{i}" for i in range(7)]  # above 5, so top-5 is a real figure


class ChannelMeans(nn.Module):
    """Logits from per-channel means only: blind to any rearrangement of pixels, flips included."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.head = nn.Linear(3, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # uint8 values summed in float32 are exact in any order, so a flip changes no bit
        return self.head(images.float().mean(dim=(2, 3)) / 255)


class HalfMeans(nn.Module):
    """Logits from the means of the left and the right half: a mirror image scores differently."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.head = nn.Linear(6, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        half = images.shape[-1] // 2
        x = images.float() / 255
        return self.head(torch.cat([x[..., :half].mean(dim=(2, 3)), x[..., half:].mean(dim=(2, 3))], dim=1)) * 4


def _images(n: int = 5, size: int = 8) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def _mirrored(images: torch.Tensor) -> torch.Tensor:
    """Left-right mirror by explicit column indices, independent of the code under test."""
    return images[..., torch.arange(images.shape[-1] - 1, -1, -1)]


@torch.no_grad()
def test_tta_of_a_flip_invariant_model_is_exactly_its_plain_softmax():
    torch.manual_seed(0)
    model = ChannelMeans().eval()
    images = _images()
    assert torch.equal(tta.tta_probs(model, images), model(images).softmax(dim=1))


@torch.no_grad()
def test_tta_averages_the_softmax_of_the_image_and_of_its_mirror_image():
    torch.manual_seed(0)
    model = HalfMeans().eval()
    images = _images()
    plain, mirrored = model(images), model(_mirrored(images))
    expected = (plain.softmax(dim=1) + mirrored.softmax(dim=1)) / 2

    got = tta.tta_probs(model, images)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(got.sum(dim=1), torch.ones(len(images)))
    # ...and not one of the near misses: no TTA, averaged logits, an upside-down flip
    assert not torch.allclose(got, plain.softmax(dim=1), atol=1e-4)
    assert not torch.allclose(got, ((plain + mirrored) / 2).softmax(dim=1), atol=1e-4)
    upside_down = (plain.softmax(dim=1) + model(images.flip(-2)).softmax(dim=1)) / 2
    assert not torch.allclose(got, upside_down, atol=1e-4)
    # the float, normalised batch flips alike (eval flips after the Batcher, predict before)
    as_float = images.float()
    torch.testing.assert_close(tta.tta_probs(model, as_float), expected, rtol=0, atol=1e-7)


def test_tta_log_probabilities_stay_finite_where_the_probabilities_underflow():
    confident = [torch.tensor([[0.0, 200.0]]), torch.tensor([[0.0, 150.0]])]  # class 0 is all but impossible
    assert tta.average_probs(confident)[0, 0] == 0.0
    log_p = tta.average_log_probs(confident)
    assert log_p[0, 0].item() == pytest.approx(-150.0 - torch.log(torch.tensor(2.0)).item(), abs=1e-4)
    ordinary = [torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([[0.0, -1.0, 3.0]])]
    torch.testing.assert_close(tta.average_log_probs(ordinary).exp(), tta.average_probs(ordinary))


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    """A 7-class folder (3 images each) and an untrained resnet18 checkpoint at 32 px."""
    from conftest import make_image_folder

    from cnntrain import checkpoint
    from cnntrain.models import get_model

    root = tmp_path_factory.mktemp("tta")
    data = make_image_folder(root / "seven", per_class=3, size=24, classes=tuple(CLASSES), seed=1)
    torch.manual_seed(0)
    model = get_model("resnet18", num_classes=len(CLASSES))
    weights = checkpoint.save(root / "best.pt", checkpoint.make_checkpoint(
        model, arch="resnet18", classes=CLASSES, img_size=32, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225],
        config={}, epoch=1, metrics={}))
    return data, weights


def _invoke(runner, *args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def _eval(runner, untrained, *extra: str) -> str:
    data, weights = untrained
    return _invoke(runner, "eval", "--weights", str(weights), "--data-path", str(data), "--split", "all",
                   "--workers", "0", "--device", "cpu", *extra)


def _predict(runner, weights, data, *extra: str) -> list[dict]:
    return json.loads(_invoke(runner, "predict", str(data), "--weights", str(weights), "--format", "json",
                              "--topk", str(len(CLASSES)), "--device", "cpu", *extra))


@pytest.fixture(scope="module")
def answers(untrained):
    """eval --format json with and without --tta, and predict --tta's rows: read by several tests."""
    from typer.testing import CliRunner

    data, weights = untrained
    runner = CliRunner()
    return {"plain": json.loads(_eval(runner, untrained, "--format", "json")),
            "tta": json.loads(_eval(runner, untrained, "--format", "json", "--tta")),
            "predict_tta": _predict(runner, weights, data, "--tta")}


def test_eval_tta_adds_tta_figures_and_keeps_the_plain_ones_identical(answers):
    from cnntrain.metrics import ConfusionMatrix, classification_report

    plain, both = answers["plain"], dict(answers["tta"])
    assert "tta" not in plain
    with_tta = both.pop("tta")
    assert both == plain  # every plain field, per-class rows and confusion matrix included

    # the TTA figures, recomputed from predict --tta's probabilities for the same 21 images
    rows = answers["predict_tta"]
    assert len(rows) == both["images"] == 21
    truth = [CLASSES.index(Path(r["path"]).parent.name) for r in rows]
    probs = [{CLASSES.index(p["class"]): p["prob"] for p in r["predictions"]} for r in rows]
    ranked = [[p["class"] for p in r["predictions"]] for r in rows]
    top1 = sum(CLASSES[t] == order[0] for t, order in zip(truth, ranked)) / 21
    top5 = sum(CLASSES[t] in order[:5] for t, order in zip(truth, ranked)) / 21
    nll = sum(-torch.log(torch.tensor(p[t])).item() for t, p in zip(truth, probs)) / 21
    matrix = ConfusionMatrix(len(CLASSES))
    matrix.update(torch.tensor([CLASSES.index(order[0]) for order in ranked]), torch.tensor(truth))
    f1 = [float(r["f1"]) for r in classification_report(matrix, CLASSES) if r["support"]]
    assert with_tta["top1"] == pytest.approx(top1) and with_tta["top5"] == pytest.approx(top5)
    assert with_tta["loss"] == pytest.approx(nll, rel=1e-4)
    assert with_tta["macro_f1"] == pytest.approx(sum(f1) / len(f1))
    assert with_tta["loss"] != pytest.approx(plain["loss"], rel=1e-6)  # a second, different scoring
    assert top5 < 1.0  # so the top-5 comparison means something


def test_eval_tta_in_csv_and_table(runner, untrained, answers):
    from rich.console import Console

    from cnntrain.evaluation import format_report

    report = answers["tta"]
    lines = list(csv.DictReader(io.StringIO(_eval(runner, untrained, "--format", "csv", "--tta"))))
    overall = {r["metric"]: float(r["value"]) for r in lines if not r["class"]}
    keys = ("loss", "top1", "top5", "balanced_acc", "macro_f1")
    assert {k: overall[f"tta_{k}"] for k in keys} == pytest.approx(report["tta"])
    assert overall["top1"] == pytest.approx(report["top1"])

    table = _eval(runner, untrained, "--tta")
    line = next(t for t in table.splitlines() if t.startswith("with --tta (flip): "))
    change = report["tta"]["top1"] - report["top1"]
    assert f"top-1 {report['tta']['top1']:.4f} ({change:+.4f})" in line and "macro-F1" in line
    console = Console(file=io.StringIO(), width=160)
    format_report(answers["plain"], console)
    assert "with --tta" not in console.file.getvalue()


def test_predict_tta_on_a_checkpoint_averages_the_image_and_its_mirror(runner, untrained, answers):
    from cnntrain.data import decode_image, eval_transform
    from cnntrain.predict import load_classifier

    data, weights = untrained
    plain, rows = _predict(runner, weights, data), answers["predict_tta"]
    assert [r["path"] for r in rows] == [r["path"] for r in plain] and not any(r["error"] for r in rows)

    model = load_classifier(weights, "cpu")
    first = rows[0]
    with torch.no_grad():
        image = eval_transform(32)(decode_image(first["path"]))[None]
        expected = (model.logits(image).softmax(1) + model.logits(_mirrored(image)).softmax(1))[0] / 2
    got = {p["class"]: p["prob"] for p in first["predictions"]}
    assert got == pytest.approx({c: float(expected[i]) for i, c in enumerate(CLASSES)}, abs=2e-6)
    by_class = [({p["class"]: p["prob"] for p in r["predictions"]}, {p["class"]: p["prob"] for p in s["predictions"]})
                for r, s in zip(plain, rows)]
    assert max(abs(a[c] - b[c]) for a, b in by_class for c in CLASSES) > 1e-4  # the flag reached the model


@pytest.mark.slow  # an export: tracing and verification
def test_predict_tta_on_a_torchscript_export_matches_the_checkpoint(runner, untrained, answers, tmp_path):
    from cnntrain.export import export_checkpoint

    data, weights = untrained
    exported = export_checkpoint(weights, "torchscript", tmp_path / "model.torchscript.pt", dynamic_batch=True)
    from_export = _predict(runner, exported.path, data, "--tta")
    for a, b in zip(answers["predict_tta"], from_export, strict=True):
        assert {p["class"]: p["prob"] for p in a["predictions"]} == pytest.approx(
            {p["class"]: p["prob"] for p in b["predictions"]}, abs=1e-5)
