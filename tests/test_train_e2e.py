"""End to end through the CLI: train on a tiny folder, then predict and eval what it saved."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import torch

from cnntrain.cli import app
from cnntrain.weights import safe_load

pytestmark = pytest.mark.integration  # whole CLI trainings

TINY = ["--arch", "resnet18", "--no-pretrained", "--img-size", "32", "--batch-size", "8", "--workers", "0",
        "--device", "cpu", "--val-split", "0.25"]
RUN_FILES = {"config.yaml", "class_indices.json", "metrics.csv", "best.pt", "last.pt", "learning_curves.png",
             "confusion_matrix.png", "summary.json", "report.html"}


def train(runner, *args: str) -> object:
    result = runner.invoke(app, ["train", *args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory, image_folder):
    """One 2-epoch run shared by the read-only tests below."""
    from typer.testing import CliRunner

    project = tmp_path_factory.mktemp("runs")
    result = train(CliRunner(), "--data-path", str(image_folder), *TINY, "--epochs", "2", "--project", str(project))
    return project, project / "exp", result


def test_run_folder_has_every_file(trained):
    project, run, result = trained
    assert RUN_FILES <= {p.name for p in run.iterdir()}
    assert (project / "latest").resolve() == run.resolve()
    assert json.loads((run / "class_indices.json").read_text()) == {"0": "blue", "1": "green", "2": "red"}
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert set(rows[0]) >= {"train_loss", "train_acc", "val_loss", "val_acc", "val_top5", "lr", "seconds",
                            "images_per_s"}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs_run"] == 2 and summary["classes"] == ["blue", "green", "red"]
    assert "epoch[2/2]" in result.output  # plain per-epoch lines off a terminal
    assert "training transform: crop 0.08-1 of the area (ratio 0.75-1.33), hflip 0.5" in result.output


def test_checkpoint_is_self_describing_and_safe(trained):
    _, run, _ = trained
    best = safe_load(run / "best.pt")  # weights_only=True
    assert best["arch"] == "resnet18" and best["classes"] == ["blue", "green", "red"]
    assert best["img_size"] == 32 and len(best["mean"]) == 3 and best["config"]["epochs"] == 2
    assert "optimizer" not in best
    last = safe_load(run / "last.pt")
    assert {"optimizer", "scheduler", "rng", "history", "best_metric"} <= set(last)


def test_predict_every_image_in_json(trained, runner, image_folder):
    project, run, _ = trained
    files = sorted(image_folder.rglob("*.png"))
    # 36 images with batch 5: the tail batch must not be dropped
    result = runner.invoke(app, ["predict", str(image_folder), "--weights", str(run / "best.pt"), "--format", "json",
                                 "--batch-size", "5", "--topk", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert len(rows) == len(files)
    assert all(len(r["predictions"]) == 2 and r["error"] is None for r in rows)
    # top-2 of 3 classes: the first two of the full softmax (best first), not renormalised to sum to 1
    result = runner.invoke(app, ["predict", str(image_folder), "--weights", str(run / "best.pt"), "--format", "json",
                                 "--topk", "3", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    full = {r["path"]: r["predictions"] for r in json.loads(result.stdout)}
    for row in rows:
        top2, top3 = row["predictions"], full[row["path"]]
        probs = [p["prob"] for p in top3]
        assert sorted(probs, reverse=True) == probs and all(0.0 <= p <= 1.0 for p in probs)
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert [p["class"] for p in top2] == [p["class"] for p in top3[:2]]
        assert [p["prob"] for p in top2] == pytest.approx(probs[:2], abs=2e-6)
        assert sum(p["prob"] for p in top2) == pytest.approx(1.0 - probs[2], abs=1e-5)


def test_predict_defaults_to_latest_run(trained, runner, image_folder, monkeypatch):
    project, _, _ = trained
    monkeypatch.chdir(project.parent)
    one = next(image_folder.rglob("*.png"))
    result = runner.invoke(app, ["predict", str(one), "--project", project.name, "--format", "csv"])
    assert result.exit_code == 0, result.output
    assert "latest run" in result.stderr
    assert result.stdout.splitlines()[0] == "path,rank,class,prob,error,answer"


def test_predict_bad_image_gets_error_row_and_exit_1(trained, runner, image_folder, tmp_path):
    _, run, _ = trained
    bad = tmp_path / "broken.jpg"
    bad.write_text("not an image")
    good = next(image_folder.rglob("*.png"))
    result = runner.invoke(app, ["predict", str(bad), str(good), "--weights", str(run / "best.pt"), "--format", "json"])
    assert result.exit_code == 1
    rows = json.loads(result.stdout)
    assert rows[0]["error"] and not rows[0]["predictions"]
    assert rows[1]["error"] is None and rows[1]["predictions"]


def test_predict_without_runs_is_a_clear_error(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["predict", "x.jpg"])
    assert result.exit_code == 2
    assert "no --weights given" in result.stderr


def test_eval_json_and_plot(trained, runner, image_folder, tmp_path):
    _, run, _ = trained
    plot = tmp_path / "cm.png"
    result = runner.invoke(app, ["eval", "--weights", str(run / "best.pt"), "--data-path", str(image_folder),
                                 "--format", "json", "--plot", str(plot), "--workers", "0", "--split", "all"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    # top-1 counted by hand from predict's answers for the same 36 images; no top-5 for 3 classes
    result = runner.invoke(app, ["predict", str(image_folder), "--weights", str(run / "best.pt"), "--format", "json",
                                 "--topk", "1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    hits = sum(Path(r["path"]).parent.name == r["predictions"][0]["class"] for r in rows)
    assert report["images"] == len(rows) == 36
    assert report["top1"] == pytest.approx(hits / 36) and report["top5"] is None
    assert [r["class"] for r in report["per_class"]] == ["blue", "green", "red"]
    assert sum(r["support"] for r in report["per_class"]) == 36
    assert report["balanced_acc"] == pytest.approx(sum(r["recall"] for r in report["per_class"]) / 3)
    assert plot.stat().st_size > 0
    as_csv = runner.invoke(app, ["eval", "--weights", str(run / "best.pt"), "--data-path", str(image_folder),
                                 "--format", "csv", "--workers", "0", "--split", "all"])
    assert as_csv.exit_code == 0, as_csv.output
    lines = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    overall = {r["metric"]: float(r["value"]) for r in lines if not r["class"]}
    assert overall["top1"] == pytest.approx(report["top1"]) and overall["images"] == 36
    assert overall["macro_f1"] == pytest.approx(report["macro_f1"])
    recall = {r["class"]: float(r["value"]) for r in lines if r["metric"] == "recall"}
    assert recall == pytest.approx({r["class"]: r["recall"] for r in report["per_class"]})


def test_eval_top1_and_top5_match_predict_with_seven_classes(runner, tmp_path):
    """With more classes than 5, top-5 can miss: both numbers must agree with predict's rankings."""
    from conftest import make_image_folder

    from cnntrain import checkpoint
    from cnntrain.models import get_model

    classes = [f"c{i}" for i in range(7)]
    data = make_image_folder(tmp_path / "seven", per_class=3, classes=tuple(classes), seed=1)
    torch.manual_seed(0)
    model = get_model("resnet18", num_classes=7)  # untrained: its rankings are arbitrary, hits are not all or none
    weights = checkpoint.save(tmp_path / "best.pt", checkpoint.make_checkpoint(
        model, arch="resnet18", classes=classes, img_size=32, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225],
        config={}, epoch=1, metrics={}))
    result = runner.invoke(app, ["eval", "--weights", str(weights), "--data-path", str(data), "--format", "json",
                                 "--workers", "0", "--split", "all", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    result = runner.invoke(app, ["predict", str(data), "--weights", str(weights), "--format", "json", "--topk", "5",
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    truth = [Path(r["path"]).parent.name for r in rows]
    top1 = sum(t == r["predictions"][0]["class"] for t, r in zip(truth, rows, strict=True)) / len(rows)
    top5 = sum(t in {p["class"] for p in r["predictions"]} for t, r in zip(truth, rows, strict=True)) / len(rows)
    assert report["images"] == len(rows) == 21
    assert report["top1"] == pytest.approx(top1) and report["top5"] == pytest.approx(top5)
    assert top5 < 1.0  # so the comparison above means something


def test_eval_rejects_other_classes(trained, runner, tmp_path):
    from conftest import make_image_folder

    _, run, _ = trained
    other = make_image_folder(tmp_path / "other", per_class=3, classes=("blue", "green", "yellow"))
    result = runner.invoke(app, ["eval", "--weights", str(run / "best.pt"), "--data-path", str(other),
                                 "--workers", "0"])
    assert result.exit_code == 1
    assert "yellow" in result.stderr and "red" in result.stderr


def test_learns_well_above_chance(runner, tmp_path):
    """Colour-coded classes: a working pipeline gets near 100 %, chance is 33 %."""
    from conftest import make_image_folder

    data = make_image_folder(tmp_path / "data", per_class=30)
    train(runner, "--data-path", str(data), *TINY, "--epochs", "8", "--opt", "adamw", "--lr", "0.003",
          "--project", str(tmp_path / "runs"))
    summary = json.loads((tmp_path / "runs" / "exp" / "summary.json").read_text())
    assert summary["best_val_acc"] >= 0.8, summary


def test_freeze_layers_trains_only_the_head(runner, image_folder, tmp_path):
    from cnntrain.models import get_model

    train(runner, "--data-path", str(image_folder), *TINY, "--epochs", "1", "--freeze-layers", "--seed", "3",
          "--project", str(tmp_path))
    torch.manual_seed(3)
    initial = get_model("resnet18", num_classes=3).state_dict()  # same seed, same init as the run
    final = safe_load(tmp_path / "exp" / "last.pt")["model"]
    changed = {k for k in initial if not torch.equal(initial[k], final[k])}
    assert changed == {"fc.weight", "fc.bias"}  # BN running stats and every backbone weight untouched


@pytest.mark.parametrize("extra", [[], ["--ema", "--sampler", "balanced", "--class-weights", "auto", "--mixup", "0.4",
                                    "--cutmix", "1.0", "--backbone-lr-mult", "0.5"]], ids=["plain", "better-models"])
def test_resume_equals_uninterrupted_run(runner, image_folder, tmp_path, extra):
    """The new pieces of state (the EMA, the balanced draw, the mixing RNG) resume exactly too."""
    common = ["--data-path", str(image_folder), *TINY, "--deterministic", "--sched", "step", "--step-size", "2",
              "--aug", "trivialaugment", *extra]
    train(runner, *common, "--epochs", "4", "--project", str(tmp_path / "a"))
    train(runner, *common, "--epochs", "2", "--project", str(tmp_path / "b"))
    train(runner, "--resume", str(tmp_path / "b" / "exp"), "--epochs", "4")
    a = safe_load(tmp_path / "a" / "exp" / "last.pt")
    b = safe_load(tmp_path / "b" / "exp" / "last.pt")
    assert a["epoch"] == b["epoch"] == 4
    for key, value in a["model"].items():
        torch.testing.assert_close(value, b["model"][key], rtol=0, atol=1e-6, msg=key)
    rows_a = (tmp_path / "a" / "exp" / "metrics.csv").read_text().splitlines()
    rows_b = (tmp_path / "b" / "exp" / "metrics.csv").read_text().splitlines()
    strip = lambda rows: [",".join(r.split(",")[:7] + r.split(",")[9:]) for r in rows]  # noqa: E731 - no timings
    assert strip(rows_a) == strip(rows_b)
    if extra:
        assert rows_a[0].endswith("val_loss_ema,val_acc_ema") and rows_a[1].split(",")[-1]  # the EMA was validated
        for key, value in a["ema"]["averaged"].items():
            torch.testing.assert_close(value, b["ema"]["averaged"][key], rtol=0, atol=1e-6, msg=key)


def test_run_names_auto_increment(runner, image_folder, tmp_path):
    for _ in range(2):
        train(runner, "--data-path", str(image_folder), *TINY, "--epochs", "1", "--project", str(tmp_path), "--quiet")
    assert (tmp_path / "exp").is_dir() and (tmp_path / "exp2").is_dir()
    assert (tmp_path / "latest").resolve() == (tmp_path / "exp2").resolve()


def test_weights_from_checkpoint_with_other_classes(trained, runner, tmp_path):
    """--weights from a 3-class run into a 2-class folder: the head is reported and starts fresh."""
    from conftest import make_image_folder

    _, run, _ = trained
    data = make_image_folder(tmp_path / "two", per_class=6, classes=("blue", "red"))
    result = train(runner, "--data-path", str(data), *TINY, "--epochs", "1", "--weights", str(run / "best.pt"),
                   "--project", str(tmp_path / "runs"))
    assert "head fc.weight, fc.bias has another class count" in result.output
    backbone = safe_load(run / "best.pt")["model"]["layer1.0.conv1.weight"]
    tuned = safe_load(tmp_path / "runs" / "exp" / "last.pt")["model"]["layer1.0.conv1.weight"]
    assert backbone.shape == tuned.shape and not torch.equal(backbone, tuned)  # loaded, then trained


def test_weights_of_another_architecture_lists_keys(trained, runner, image_folder, tmp_path):
    _, run, _ = trained
    result = runner.invoke(app, ["train", "--data-path", str(image_folder), *TINY[2:], "--arch", "resnet34",
                                 "--no-pretrained", "--epochs", "1", "--weights", str(run / "best.pt"),
                                 "--project", str(tmp_path)])
    assert result.exit_code == 1
    assert "does not fit this architecture" in result.stderr and "missing: layer1.2" in result.stderr


def test_unfreeze_epoch_trains_backbone_from_then_on(runner, image_folder, tmp_path):
    train(runner, "--data-path", str(image_folder), *TINY, "--epochs", "2", "--freeze-layers", "--unfreeze-epoch",
          "2", "--project", str(tmp_path), "--seed", "5")
    torch.manual_seed(5)
    from cnntrain.models import get_model

    initial = get_model("resnet18", num_classes=3).state_dict()
    final = safe_load(tmp_path / "exp" / "last.pt")["model"]
    assert not torch.equal(initial["layer1.0.conv1.weight"], final["layer1.0.conv1.weight"])


def test_patience_stops_early(runner, image_folder, tmp_path):
    # with a learning rate this small only BatchNorm statistics move: accuracy soon stops improving
    result = train(runner, "--data-path", str(image_folder), *TINY, "--epochs", "8", "--lr", "1e-12",
                   "--patience", "2", "--project", str(tmp_path))
    summary = json.loads((tmp_path / "exp" / "summary.json").read_text())
    assert summary["stopped_early"] and summary["epochs_run"] == summary["best_epoch"] + 2 < 8
    assert "early stop" in result.output


def test_quiet_prints_only_the_summary(runner, image_folder, tmp_path):
    result = train(runner, "--data-path", str(image_folder), *TINY, "--epochs", "1", "--quiet",
                   "--project", str(tmp_path))
    assert "epoch[" not in result.output and "run folder" in result.output and "best epoch" in result.output
