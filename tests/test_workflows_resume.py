"""Workflows around a run's life after it started: interrupted, resumed with ``auto``, extended,
rerun from its config.yaml; and what ``runs/latest`` then means to predict, eval and export."""

from __future__ import annotations

import csv
import os
import signal
from pathlib import Path

import pytest
from conftest import make_image_folder
from torch.optim.optimizer import register_optimizer_step_post_hook

from cnntrain import checkpoint
from cnntrain.cli import app
from cnntrain.config import build_config, load_yaml
from cnntrain.errors import UsageError
from cnntrain.train.resume import load_plan
from cnntrain.weights import safe_load

TINY = ["--arch", "squeezenet1_1", "--no-pretrained", "--img-size", "32", "--batch-size", "4", "--workers", "0",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    # 3 x 6 images, a few of them validation: 4 or 5 steps an epoch in batches of 4
    return make_image_folder(tmp_path_factory.mktemp("data") / "colours", per_class=6, size=24)


def train(runner, *args: str, code: int = 0):
    result = runner.invoke(app, ["train", *args])
    assert result.exit_code == code, result.output
    return result


def lrs(run: Path) -> list[float]:
    return [float(row["lr"]) for row in csv.DictReader((run / "metrics.csv").open())]


def sigint_at_step(step: int):
    """SIGINT from inside the ``step``-th optimiser step from now: what Ctrl-C (or ``timeout -s INT``)
    does, landing at the same place on any machine. Returns the hook's handle."""
    steps = 0

    def hook(optimizer, args, kwargs):
        nonlocal steps
        steps += 1
        if steps == step:
            signal.raise_signal(signal.SIGINT)

    return register_optimizer_step_post_hook(hook)


# --- runs/latest and --resume auto ---------------------------------------------------------


@pytest.mark.integration
def test_latest_is_the_run_last_started_and_resume_auto_continues_it(runner, data, tmp_path):
    """An older finished run, then one interrupted in its second epoch: latest names the
    interrupted one, predict uses it, and --resume auto continues it, saying so."""
    project = str(tmp_path / "runs")
    train(runner, "--data-path", str(data), *TINY, "--epochs", "1", "--project", project, "--name", "old", "--quiet")
    handle = sigint_at_step(6)  # epoch 2, step 2
    try:
        train(runner, "--data-path", str(data), *TINY, "--epochs", "3", "--project", project, "--name", "intr",
              "--quiet", code=130)
    finally:
        handle.remove()
    intr = tmp_path / "runs" / "intr"
    assert checkpoint.latest_run(project).resolve() == intr.resolve()
    # its first epoch is drawn on the interrupt: no need to resume it to see how it went
    assert (intr / "learning_curves.png").stat().st_size and (intr / "confusion_matrix.png").stat().st_size
    predicted = runner.invoke(app, ["predict", str(next(data.glob("red/*"))), "--project", project])
    assert predicted.exit_code == 0, predicted.output
    assert str(intr / "best.pt") in predicted.stderr

    result = train(runner, "--resume", "auto", "--project", project)
    assert f"--resume auto: {intr} (the latest run, stopped during epoch 2 of 3)" in result.output
    assert len(lrs(intr)) == 3 and len(lrs(tmp_path / "runs" / "old")) == 1


def _fake_last(path: Path, epoch: int, epochs: int, *, state: bool = True) -> Path:
    """A last.pt as the checkpointer writes it, without the weights that do not matter here."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": checkpoint.FORMAT, "version": checkpoint.FORMAT_VERSION, "epoch": epoch, "model": {},
               "classes": ["a", "b"], "config": {"epochs": epochs}}
    if state:
        payload["optimizer"] = {}
    checkpoint.save(path, payload)
    return path


def test_resume_auto_without_a_last_pt_in_latest_takes_the_newest_resumable_one(tmp_path):
    """latest was killed before its first epoch ended (no last.pt): the most recently written last.pt
    that holds training state is continued, and the line says why; files without it are passed over."""
    older = _fake_last(tmp_path / "a" / "last.pt", 2, 5)
    newer = _fake_last(tmp_path / "b" / "last.pt", 3, 5)
    weights_only = _fake_last(tmp_path / "c" / "last.pt", 1, 5, state=False)
    for i, path in enumerate((older, newer, weights_only)):
        os.utime(path, (1_000_000 + i, 1_000_000 + i))
    (tmp_path / "killed").mkdir()
    checkpoint.point_latest(tmp_path / "killed")
    plan = load_plan("auto", str(tmp_path))
    assert plan.path == newer
    assert plan.note is not None and str(tmp_path / "b") in plan.note and "stopped after epoch 3 of 5" in plan.note
    assert str(tmp_path / "killed") in plan.note and "no last.pt" in plan.note

    checkpoint.point_latest(tmp_path / "a")  # latest has a resumable last.pt: that one, however old
    plan = load_plan("auto", str(tmp_path))
    assert plan.path.resolve() == older.resolve() and "(the latest run, stopped after epoch 2 of 5)" in plan.note


def test_pointing_latest_at_latest_itself_keeps_it_on_its_run(tmp_path):
    """``--resume runs/latest`` resumes the folder ``runs/latest``; latest must not become a loop."""
    (tmp_path / "exp").mkdir()
    checkpoint.point_latest(tmp_path / "exp")
    checkpoint.point_latest(tmp_path / "latest")
    assert checkpoint.latest_run(tmp_path) == tmp_path / "exp"


def test_resume_auto_with_nothing_resumable_says_so(tmp_path):
    _fake_last(tmp_path / "a" / "last.pt", 1, 5, state=False)
    with pytest.raises(UsageError, match="no run in .* has a last.pt with training state"):
        load_plan("auto", str(tmp_path))


def test_predict_on_a_latest_run_without_best_pt_names_it_and_how_to_choose(runner, tmp_path):
    """Interrupted before its first epoch ended: latest has no best.pt yet. One line names that run
    and --weights, for predict, eval and export alike (they share resolve_weights)."""
    (tmp_path / "intr").mkdir()
    checkpoint.point_latest(tmp_path / "intr")
    with pytest.raises(UsageError) as caught:
        checkpoint.resolve_weights(None, tmp_path)
    message = str(caught.value)
    assert "\n" not in message and str(tmp_path / "intr") in message and "no best.pt" in message
    assert "--weights" in message
    result = runner.invoke(app, ["predict", str(tmp_path / "x.jpg"), "--project", str(tmp_path)])
    assert result.exit_code == 2 and "no best.pt" in result.stderr


# --- --epochs on a resumed run --------------------------------------------------------------


@pytest.mark.integration
def test_extending_a_finished_run_rebuilds_the_schedule_for_the_new_length(runner, data, tmp_path):
    common = ["--data-path", str(data), *TINY, "--sched", "cosine"]
    train(runner, *common, "--epochs", "4", "--project", str(tmp_path / "fresh"), "--quiet")
    train(runner, *common, "--epochs", "2", "--project", str(tmp_path / "ext"), "--quiet")
    run = tmp_path / "ext" / "exp"
    result = train(runner, "--resume", str(run), "--epochs", "4")
    assert (f"extending {run} from 2 to 4 epochs: the cosine schedule is rebuilt for 4 epochs and continues "
            "at epoch 3 with lr 0.00505") in result.output
    assert lrs(run)[2:] == pytest.approx(lrs(tmp_path / "fresh" / "exp")[2:], rel=1e-9)


def test_shortening_below_the_epochs_done_is_a_usage_error(runner, tmp_path):
    _fake_last(tmp_path / "exp" / "last.pt", 2, 5)
    result = train(runner, "--resume", str(tmp_path / "exp"), "--epochs", "1", code=2)
    assert "has done 2 epochs" in result.stderr and len(result.stderr.strip().splitlines()) == 1


# --- config.yaml reruns the run --------------------------------------------------------------


@pytest.mark.integration
def test_config_yaml_of_a_resumed_run_reruns_it_from_scratch(runner, data, tmp_path):
    train(runner, "--data-path", str(data), *TINY, "--epochs", "1", "--project", str(tmp_path / "a"),
          "--quiet")
    run = tmp_path / "a" / "exp"
    train(runner, "--resume", str(run), "--epochs", "2", "--quiet")
    saved = load_yaml(run / "config.yaml")
    assert "resume" not in saved and "quiet" not in saved and saved["epochs"] == 2
    assert build_config(saved).resume is None
    assert safe_load(run / "last.pt")["config"]["resume"] == str(run / "last.pt")  # the checkpoint keeps it all
    result = train(runner, "--config", str(run / "config.yaml"), "--project", str(tmp_path / "b"))
    assert "resuming" not in result.output
    assert len(lrs(tmp_path / "b" / "exp")) == 2 and len(lrs(run)) == 2
