"""Errors you can look at and confidence you can trust (issue 12, parts 2 and 4): temperature
scaling, ECE, the most-confused pairs, the per-image answers of one pass, and through the CLI the
run's top_losses.png and temperature, eval --errors, and predict --min-confidence."""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from cnntrain.analysis.answers import AnswerCollector
from cnntrain.analysis.calibration import (
    T_MIN,
    expected_calibration_error,
    fit_temperature,
    reliability,
)
from cnntrain.analysis.mistakes import most_confused
from cnntrain.cli import app
from cnntrain.weights import safe_load

CLASSES = ["blue", "green", "red", "rose"]


# --- calibration, on numbers ----------------------------------------------------------------------


def test_temperature_scaling_recovers_an_over_confident_models_temperature_and_lowers_ece():
    """Labels drawn from softmax(z); a model that says 2.5 z is over-confident by exactly T = 2.5."""
    torch.manual_seed(0)
    true = torch.randn(2000, 10) * 2
    targets = torch.distributions.Categorical(logits=true).sample()
    logits = true * 2.5
    fitted = fit_temperature(logits, targets)
    assert fitted == pytest.approx(2.5, rel=0.05)
    before = expected_calibration_error(logits.softmax(1), targets)
    after = expected_calibration_error((logits / fitted).softmax(1), targets)
    assert after < before / 3
    assert fit_temperature(true * 0.5, targets) == pytest.approx(0.5, rel=0.05)  # under-confident: T < 1


def test_temperature_is_one_for_constant_logits_and_the_lower_bound_without_a_mistake():
    assert fit_temperature(torch.zeros(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])) == 1.0
    assert fit_temperature(torch.eye(3) * 4, torch.arange(3)) == pytest.approx(T_MIN)
    assert fit_temperature(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)) == 1.0


def test_ece_of_a_hand_computed_example():
    """15 bins: 0.9 falls in (13/15, 14/15], 0.7 in (10/15, 11/15], 1.0 in the last bin.
    Bin 0.9: confidence 0.9, one of two right -> |0.5 - 0.9| x 2/5 = 0.16; bin 0.7: both right ->
    |1 - 0.7| x 2/5 = 0.12; bin 1.0: right -> 0. ECE = 0.28."""
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.7, 0.3], [0.3, 0.7], [1.0, 0.0]], dtype=torch.float64)
    targets = torch.tensor([0, 1, 0, 1, 0])
    bins = reliability(probs, targets)
    assert bins.counts[13] == 2 and bins.counts[10] == 2 and bins.counts[14] == 1 and sum(bins.counts) == 5
    assert bins.accuracy[13] == 0.5 and bins.confidence[10] == pytest.approx(0.7)
    assert expected_calibration_error(probs, targets) == pytest.approx(0.28)


def test_most_confused_lists_off_diagonal_cells_largest_first_ties_in_matrix_order():
    matrix = [[5, 1, 3],
              [3, 7, 0],
              [0, 4, 9]]
    pairs = [(p.true, p.predicted, p.count) for p in most_confused(matrix, ["a", "b", "c"])]
    assert pairs == [("c", "b", 4), ("a", "c", 3), ("b", "a", 3), ("a", "b", 1)]
    assert len(most_confused(matrix, ["a", "b", "c"], limit=2)) == 2


def test_answers_are_tied_to_files_less_the_skipped_ones_or_not_at_all():
    samples = [("a.png", 0), ("b.png", 1), ("c.png", 0), ("d.png", 1)]
    keep = AnswerCollector()
    keep(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]), [])
    keep(None, torch.zeros(0, dtype=torch.long), ["c.png"])  # a batch with nothing readable
    keep(torch.tensor([[0.5, 0.5]]), torch.tensor([1]), [])
    answers = keep.answers(samples, ["x", "y"])
    assert answers.paths == ["a.png", "b.png", "d.png"] and answers.targets.tolist() == [0, 1, 1]
    lost = AnswerCollector()  # an image dropped without a report: the labels no longer line up
    lost(torch.zeros(3, 2), torch.tensor([1, 0, 1]), [])
    assert lost.answers(samples, ["x", "y"]).paths is None


# --- through the CLI, on one tiny run ----------------------------------------------------------------


def _data(root: Path) -> Path:
    """blue, green, red and rose, where rose is red drawn again: the model must confuse those two."""
    from conftest import make_image_folder

    data = make_image_folder(root / "data", per_class=8, size=32, classes=("blue", "green", "red"), seed=0)
    make_image_folder(root / "more", per_class=8, size=32, classes=("red",), seed=1)
    shutil.move(str(root / "more" / "red"), str(data / "rose"))
    return data


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from typer.testing import CliRunner

    root = tmp_path_factory.mktemp("analysis")
    data = _data(root)
    result = CliRunner().invoke(app, ["train", "--data-path", str(data), "--arch", "squeezenet1_1", "--no-pretrained",
                                      "--img-size", "32", "--batch-size", "8", "--workers", "0", "--device", "cpu",
                                      "--epochs", "1", "--val-split", "0.25", "--project", str(root / "runs")])
    assert result.exit_code == 0, result.output
    return data, root / "runs" / "exp", result.output


def _ok(runner, *args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def _predict(runner, run, *extra: str) -> str:
    data, folder, _ = run
    return _ok(runner, "predict", str(data), "--weights", str(folder / "best.pt"), "--device", "cpu",
               "--topk", "4", "--batch-size", "64", *extra)  # (one batch: no loader worker to start)


@pytest.fixture(scope="module")
def predicted(run):
    """predict over all 32 images, as json and csv, at --min-confidence 0 and 1, and uncalibrated."""
    from typer.testing import CliRunner

    runner = CliRunner()
    found = {(fmt, p): _predict(runner, run, "--format", fmt, "--min-confidence", p)
             for fmt in ("json", "csv") for p in ("0", "1.0")}
    found["raw"] = _predict(runner, run, "--format", "json", "--no-calibration")
    return found


@pytest.mark.integration
def test_a_run_writes_top_losses_and_stores_a_fitted_temperature(run):
    _, folder, output = run
    assert (folder / "top_losses.png").stat().st_size > 0 and (folder / "reliability.png").stat().st_size > 0
    summary = json.loads((folder / "summary.json").read_text())
    best = safe_load(folder / "best.pt")
    assert best["temperature"] == summary["temperature"] == summary["calibration"]["temperature"]
    assert best["calibration"]["images"] == summary["val_images_scored"] == 8
    assert {"top_losses.png", "reliability.png"} <= set(summary["files"])
    assert len(summary["top_losses"]) == 8  # fewer images than the grid holds: all of them, worst first
    losses = [m["loss"] for m in summary["top_losses"]]
    assert losses == sorted(losses, reverse=True)
    assert sum(p["count"] for p in summary["most_confused"]) == 8 - round(summary["best_val_acc"] * 8)
    assert summary["calibration"]["nll_after"] <= summary["calibration"]["nll_before"]
    assert "calibration: temperature" in output and summary["analysis_seconds"] >= 0


@pytest.mark.integration
def test_eval_errors_csv_lists_exactly_the_misclassified_files(run, runner, predicted, tmp_path):
    data, folder, _ = run
    errors = tmp_path / "errors.csv"
    report = json.loads(_ok(runner, "eval", "--weights", str(folder / "best.pt"), "--split", "all", "--workers", "0",
                            "--device", "cpu", "--format", "json", "--errors", str(errors),
                            "--top-losses", str(tmp_path / "top.png"), "--reliability", str(tmp_path / "rel.png")))
    matrix = torch.tensor(report["confusion_matrix"])
    wrong = int(matrix.sum() - matrix.trace())
    rows = list(csv.DictReader(errors.open()))
    assert len(rows) == wrong == report["misclassified"] > 0  # rose and red cannot be told apart
    answers = {r["path"]: r["answer"] for r in json.loads(predicted["json", "0"])}
    assert {r["path"] for r in rows} == {p for p, answer in answers.items() if Path(p).parent.name != answer}
    assert all(r["true"] == Path(r["path"]).parent.name and r["predicted"] != r["true"] for r in rows)
    assert all(float(r["prob"]) >= float(r["true_prob"]) for r in rows)
    assert (tmp_path / "top.png").stat().st_size > 0 and (tmp_path / "rel.png").stat().st_size > 0
    c = report["calibration"]
    assert c["from_checkpoint"] and c["applied"] and c["temperature"] == safe_load(folder / "best.pt")["temperature"]
    assert report["most_confused"][0]["count"] == max(matrix[i, j] for i in range(4) for j in range(4) if i != j)
    kept = [row["answered"] for row in report["coverage"]]
    assert kept == sorted(kept, reverse=True)  # a higher --min-confidence answers fewer images


@pytest.mark.integration
def test_predict_min_confidence_answers_unknown_below_it_in_json_and_csv(run, runner, predicted):
    everyone = json.loads(predicted["json", "0"])
    assert all(r["answer"] == r["predictions"][0]["class"] for r in everyone) and len(everyone) == 32
    assert max(r["predictions"][0]["prob"] for r in everyone) < 1.0  # (so that 1.0 must answer none)
    nobody = json.loads(predicted["json", "1.0"])
    assert {r["answer"] for r in nobody} == {"unknown"} and len(nobody) == 32
    assert [r["predictions"] for r in nobody] == [r["predictions"] for r in everyone]  # the best guesses stay
    for p, expected in (("1.0", {"unknown"}), ("0", set(CLASSES))):
        lines = list(csv.DictReader(io.StringIO(predicted["csv", p])))
        assert len(lines) == 32 * 4 and {line["answer"] for line in lines} <= expected
        assert ("unknown" in {line["answer"] for line in lines}) == (p == "1.0")
    table = _predict(runner, run, "--min-confidence", "1.0")
    assert "unknown" in table and "best guesses" in table


@pytest.mark.integration
def test_no_calibration_shows_the_raw_softmax(run, predicted):
    """Dividing the logits by T divides the log-ratio of any two probabilities by T."""
    t = safe_load(run[1] / "best.pt")["temperature"]
    assert abs(t - 1) > 1e-3
    rows = [json.loads(predicted[key]) for key in (("json", "0"), "raw")]
    for calibrated, raw in zip(*rows, strict=True):
        cal = {p["class"]: p["prob"] for p in calibrated["predictions"]}
        unc = {p["class"]: p["prob"] for p in raw["predictions"]}
        a, b = "blue", "green"
        if min(cal[a], cal[b], unc[a], unc[b]) > 1e-4:  # (6 decimals: log-ratios of tiny ones are rounding)
            assert math.log(cal[a] / cal[b]) == pytest.approx(math.log(unc[a] / unc[b]) / t, rel=2e-3, abs=2e-3)


@pytest.mark.integration
@pytest.mark.parametrize("argv, says", [
    (["predict", "x.png", "--min-confidence", "1.5"], "--min-confidence must be a probability between 0 and 1"),
    (["predict", "x.png", "--min-confidence", "-0.1"], "--min-confidence must be a probability between 0 and 1"),
    (["eval", "--weights", "missing.pt"], "--weights missing.pt does not exist"),
    (["eval", "--errors", "nowhere/errors.csv"], "the folder nowhere does not exist"),
], ids=["confidence-above-1", "confidence-below-0", "missing-checkpoint", "errors-in-no-folder"])
def test_bad_input_is_one_line_and_exit_2(run, runner, argv, says, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    extra = ["--weights", str(run[1] / "best.pt")] if argv[0] == "eval" and "--weights" not in argv else []
    result = runner.invoke(app, [*argv, *extra])
    assert result.exit_code == 2, result.output
    assert says in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.integration
def test_eval_on_a_folder_with_no_images_is_one_line(run, runner, tmp_path):
    (tmp_path / "empty" / "blue").mkdir(parents=True)
    result = runner.invoke(app, ["eval", "--weights", str(run[1] / "best.pt"), "--data-path", str(tmp_path / "empty"),
                                 "--split", "all", "--errors", str(tmp_path / "e.csv")])
    assert result.exit_code != 0 and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "e.csv").exists()


@pytest.mark.integration
def test_a_torchscript_export_carries_the_temperature_and_predicts_alike(run, runner, tmp_path):
    data, folder, _ = run
    out = tmp_path / "m.torchscript.pt"
    _ok(runner, "export", "--weights", str(folder / "best.pt"), "--format", "torchscript", "-o", str(out),
        "--dynamic-batch")
    sidecar = json.loads(Path(str(out) + ".json").read_text())
    assert sidecar["temperature"] == safe_load(folder / "best.pt")["temperature"]
    one = str(next((data / "rose").iterdir()))
    via = [json.loads(_ok(runner, "predict", one, "--weights", str(w), "--device", "cpu", "--format", "json",
                          "--batch-size", "2"))[0]
           for w in (folder / "best.pt", out)]
    assert [p["prob"] for p in via[0]["predictions"]] == pytest.approx([p["prob"] for p in via[1]["predictions"]],
                                                                        abs=1e-4)
