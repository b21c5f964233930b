"""Reliability of runs and checkpoints: nothing already written is lost, and failures say what to do.

Each test is named after the behaviour it pins. Subprocess tests start real `python -m cnntrain` processes so
that signals and SIGKILL hit a real run, not a simulation.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cnntrain import checkpoint, fileio
from cnntrain.cli import app
from cnntrain.weights import safe_load

TINY = ["--arch", "resnet18", "--no-pretrained", "--img-size", "32", "--batch-size", "8", "--workers", "0",
        "--device", "cpu", "--val-split", "0.25"]


def run_cli(runner, *args: str):
    return runner.invoke(app, list(args))


def start_process(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "cnntrain", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.05)


def epochs_logged(run: Path) -> int:
    metrics = run / "metrics.csv"
    return max(len(metrics.read_text().splitlines()) - 1, 0) if metrics.exists() else 0


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = safe_load(a)["model"], safe_load(b)["model"]
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-6, msg=key)


# --- atomic writes ------------------------------------------------------------------------


def test_crash_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "last.pt"
    checkpoint.save(target, {"model": {"w": torch.ones(3)}})
    before = target.read_bytes()

    def crash(obj, fh, *a, **k):
        fh.write(b"half a checkpoint")
        raise KeyboardInterrupt  # the process dies in the middle of writing

    monkeypatch.setattr(checkpoint.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(target, {"model": {"w": torch.zeros(3)}})
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no partial file under any name


@pytest.mark.timeout(120)
@pytest.mark.integration
def test_sigkill_while_saving_leaves_a_loadable_checkpoint(tmp_path):
    """A writer saving checkpoints in a loop is SIGKILLed at several moments: last.pt always loads."""
    script = (
        "import sys, torch\nfrom cnntrain import checkpoint\n"
        "i = 0\n"
        "while True:\n"
        "    checkpoint.save(sys.argv[1], {'model': {'w': torch.full((400_000,), float(i))}, 'i': i})\n"
        "    i += 1\n"
        "    print(i, flush=True)\n"
    )
    target = tmp_path / "last.pt"
    for delay in (0.3, 0.45, 0.6, 0.75):
        proc = subprocess.Popen([sys.executable, "-c", script, str(target)], stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # at least one complete save
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        data = safe_load(target)
        assert float(data["model"]["w"][0]) == data["i"]
        finals = [p for p in tmp_path.iterdir() if not fileio.is_temp_name(p.name)]
        assert finals == [target]
    fileio.clean_stale_temps(tmp_path, older_than=0)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.integration
def test_resume_cleans_up_stale_temp_files(runner, image_folder, tmp_path):
    assert run_cli(runner, "train", "--data-path", str(image_folder), *TINY, "--epochs", "1",
                   "--project", str(tmp_path)).exit_code == 0
    run = tmp_path / "exp"
    stale = run / fileio.temp_name(run / "last.pt")
    Path(stale).write_bytes(b"left by a killed run")
    result = run_cli(runner, "train", "--resume", str(run), "--epochs", "2")
    assert result.exit_code == 0, result.output
    assert not Path(stale).exists()


# --- disk full ----------------------------------------------------------------------------


@pytest.mark.integration
def test_disk_full_keeps_the_last_checkpoint_and_fails_in_one_line(runner, image_folder, tmp_path, monkeypatch):
    real_save = torch.save
    state = {"calls": 0, "before": None}

    def save(obj, fh, *a, **k):
        if isinstance(obj, dict) and obj.get("epoch") == 2:
            state["before"] = (tmp_path / "exp" / "last.pt").read_bytes()
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, fh, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", save)
    result = run_cli(runner, "train", "--data-path", str(image_folder), *TINY, "--epochs", "3",
                     "--project", str(tmp_path))
    assert result.exit_code == 1
    assert "No space left on device" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert (tmp_path / "exp" / "last.pt").read_bytes() == state["before"]
    assert safe_load(tmp_path / "exp" / "last.pt")["epoch"] == 1


# --- SIGINT / SIGTERM ---------------------------------------------------------------------


@pytest.mark.timeout(180)
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.integration
def test_sigint_and_sigterm_save_a_resumable_checkpoint_and_exit_128_plus_signal(image_folder, tmp_path, sig, code):
    proc = start_process("train", "--data-path", str(image_folder), *TINY, "--epochs", "200",
                         "--project", str(tmp_path), cwd=tmp_path)
    run = tmp_path / "exp"
    wait_for(lambda: epochs_logged(run) >= 1, proc)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == code, out
    assert f"cnntrain train --resume {run}" in out
    last = safe_load(run / "last.pt")
    assert "optimizer" in last and last["epoch"] >= 1


# --- kill -9, then resume -----------------------------------------------------------------


@pytest.mark.timeout(300)
@pytest.mark.integration
def test_resume_after_sigkill_ends_with_the_weights_of_an_uninterrupted_run(runner, image_folder, tmp_path):
    common = ["--data-path", str(image_folder), *TINY, "--deterministic", "--epochs", "5", "--aug", "trivialaugment"]
    assert run_cli(runner, "train", *common, "--project", str(tmp_path / "ref")).exit_code == 0
    proc = start_process("train", *common, "--project", str(tmp_path / "killed"), cwd=tmp_path)
    run = tmp_path / "killed" / "exp"
    wait_for(lambda: epochs_logged(run) >= 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert safe_load(run / "last.pt")["epoch"] < 5  # killed before the end
    result = run_cli(runner, "train", "--resume", str(run))
    assert result.exit_code == 0, result.output
    assert_same_weights(tmp_path / "ref" / "exp" / "last.pt", run / "last.pt")


# `python -c` this, then `STEP cnntrain-args...`: a real `cnntrain` process that sends itself SIGINT from
# inside its STEP-th optimiser step (counted over the whole run), so the signal lands mid-epoch every time,
# however fast or slow the machine is. The real handler and the real save path do the rest.
SIGINT_AT_STEP = (
    "import os, signal, sys\n"
    "from torch.optim.optimizer import register_optimizer_step_post_hook\n"
    "from cnntrain.cli import main\n"
    "at, steps = int(sys.argv[1]), 0\n"
    "def hook(optimizer, args, kwargs):\n"
    "    global steps\n"
    "    steps += 1\n"
    "    if steps == at:\n"
    "        os.kill(os.getpid(), signal.SIGINT)\n"
    "register_optimizer_step_post_hook(hook)\n"
    "sys.argv = ['cnntrain', *sys.argv[2:]]\n"
    "main()\n"
)


@pytest.mark.timeout(300)
@pytest.mark.integration
def test_sigint_mid_epoch_saves_the_partial_epoch_and_resume_matches(runner, image_folder, tmp_path):
    """SIGINT in the middle of epoch 2 saves that epoch's progress (exit 130); the resumed run ends
    with the weights and metrics of an uninterrupted one."""
    common = ["--data-path", str(image_folder), *TINY, "--batch-size", "2", "--deterministic", "--epochs", "3"]
    assert run_cli(runner, "train", *common, "--project", str(tmp_path / "ref")).exit_code == 0
    # 27 training images in batches of 2, the last batch of one dropped (BatchNorm needs two): 13 steps an
    # epoch, so step 18 is epoch 2, step 5
    proc = subprocess.run([sys.executable, "-c", SIGINT_AT_STEP, "18", "train", *common,
                           "--project", str(tmp_path / "int")], cwd=tmp_path, text=True, timeout=240,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
    run = tmp_path / "int" / "exp"
    assert proc.returncode == 130, proc.stdout
    assert "stopped during epoch 2 after step 5" in proc.stdout and f"cnntrain train --resume {run}" in proc.stdout
    saved = safe_load(run / "last.pt")
    assert saved["epoch"] == 1 and saved["partial_epoch"]["steps"] == 5  # one epoch done, 5 steps into the next
    assert epochs_logged(run) == 1
    result = run_cli(runner, "train", "--resume", str(run))
    assert result.exit_code == 0, result.output
    assert "epoch 2, step 5" in result.output  # it said where it continues from
    assert_same_weights(tmp_path / "ref" / "exp" / "last.pt", run / "last.pt")
    strip = lambda path: [",".join(r.split(",")[:7]) for r in path.read_text().splitlines()]  # noqa: E731 - no timings
    assert strip(run / "metrics.csv") == strip(tmp_path / "ref" / "exp" / "metrics.csv")


# --- damaged and hostile checkpoints -------------------------------------------------------


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _bad_files(tmp_path: Path, good: Path) -> dict[str, Path]:
    zero = tmp_path / "zero.pt"
    zero.write_bytes(b"")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    evil = tmp_path / "evil.pt"
    torch.save({"model": Payload(tmp_path / "PWNED")}, evil)  # a checkpoint whose unpickling runs a command
    return {"zero": zero, "truncated": truncated, "evil": evil}


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory, image_folder):
    from typer.testing import CliRunner

    project = tmp_path_factory.mktemp("good")
    assert CliRunner().invoke(app, ["train", "--data-path", str(image_folder), *TINY, "--epochs", "1",
                                    "--project", str(project)]).exit_code == 0
    return project / "exp" / "last.pt"


@pytest.mark.parametrize("kind", ["zero", "truncated", "evil"])
@pytest.mark.parametrize("command", ["resume", "weights", "predict", "eval"])
@pytest.mark.integration
def test_damaged_or_hostile_checkpoint_is_refused_in_one_line(runner, image_folder, tmp_path, good_ckpt, kind, command):
    bad = _bad_files(tmp_path, good_ckpt)[kind]
    one = str(next(image_folder.rglob("*.png")))
    argv = {
        "resume": ["train", "--resume", str(bad)],
        "weights": ["train", "--data-path", str(image_folder), *TINY, "--epochs", "1", "--weights", str(bad),
                    "--project", str(tmp_path / "runs")],
        "predict": ["predict", one, "--weights", str(bad)],
        "eval": ["eval", "--weights", str(bad), "--data-path", str(image_folder)],
    }[command]
    result = run_cli(runner, *argv)
    assert result.exit_code == 1, result.output
    line = result.stderr.strip()
    assert "\n" not in line and str(bad) in line and "Traceback" not in result.output
    # Checked without the path: pytest's folder for this test is itself named "...damaged...".
    reason = {"zero": "is empty (0 bytes)", "truncated": "is damaged", "evil": "refused"}[kind]
    assert reason in line.replace(str(bad), "")
    assert not (tmp_path / "PWNED").exists()  # the payload never ran


# --- another architecture or class count --------------------------------------------------


@pytest.mark.integration
def test_weights_of_another_architecture_are_refused_naming_missing_keys(runner, image_folder, tmp_path, good_ckpt):
    result = run_cli(runner, "train", "--data-path", str(image_folder), *TINY[2:], "--arch", "resnet34",
                     "--no-pretrained", "--epochs", "1", "--weights", str(good_ckpt), "--project", str(tmp_path))
    assert result.exit_code == 1
    assert "missing: layer1.2" in result.stderr and "does not fit" in result.stderr


@pytest.mark.integration
def test_weights_with_another_class_count_load_all_but_the_head(runner, tmp_path, good_ckpt):
    from conftest import make_image_folder

    data = make_image_folder(tmp_path / "five", per_class=4, classes=("a", "b", "c", "d", "e"))
    result = run_cli(runner, "train", "--data-path", str(data), *TINY, "--epochs", "1", "--weights",
                     str(good_ckpt), "--project", str(tmp_path / "runs"))
    assert result.exit_code == 0, result.output
    assert "head fc.weight, fc.bias has another class count" in result.output


# --- unusable output folder ---------------------------------------------------------------


@pytest.mark.parametrize("where", ["missing_parent", "file", "read_only"])
def test_unusable_output_folder_fails_before_the_data_is_read(runner, tmp_path, where):
    if where == "missing_parent":
        project = tmp_path / "no" / "such" / "runs"
    elif where == "file":
        project = tmp_path / "afile"
        project.write_text("x")
    else:
        project = Path("/proc/cnntrain-runs")  # a read-only file system
    # the data path does not exist either: the output check must come first
    result = run_cli(runner, "train", "--data-path", str(tmp_path / "nodata"), *TINY, "--project", str(project))
    assert result.exit_code == 2, result.output
    assert "--project" in result.stderr and "nodata" not in result.stderr


# --- training health ----------------------------------------------------------------------


@pytest.mark.integration
def test_nan_loss_stops_training_without_overwriting_checkpoints(runner, image_folder, tmp_path, monkeypatch):
    from cnntrain.train import loop, loss

    class NaNAfterFirstEpoch(torch.nn.CrossEntropyLoss):
        def forward(self, logits, target):
            loss = super().forward(logits, target)
            if self.training and trainer_epoch["n"] >= 2:
                return loss * float("nan")
            return loss

    trainer_epoch = {"n": 0}
    real_train = loop.train_one_epoch

    def counting_train(*a, **k):
        trainer_epoch["n"] += 1
        return real_train(*a, **k)

    monkeypatch.setattr(loss, "build_loss", lambda label_smoothing, weight=None: NaNAfterFirstEpoch())
    monkeypatch.setattr(loop, "train_one_epoch", counting_train)
    result = run_cli(runner, "train", "--data-path", str(image_folder), *TINY, "--epochs", "3",
                     "--project", str(tmp_path))
    assert result.exit_code == 1
    assert "epoch 2, step 1" in result.stderr and "lower --lr" in result.stderr
    for name in ("best.pt", "last.pt"):
        ckpt = safe_load(tmp_path / "exp" / name)
        assert ckpt["epoch"] == 1
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


@pytest.mark.timeout(120)
@pytest.mark.integration
def test_dead_loader_worker_fails_fast_and_suggests_workers_0(runner, image_folder, tmp_path, monkeypatch):
    from cnntrain.data import ImageDataset

    real = ImageDataset.__getitem__

    def die_in_worker(self, index):
        if torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, index)

    monkeypatch.setattr(ImageDataset, "__getitem__", die_in_worker)
    started = time.monotonic()
    result = run_cli(runner, "train", "--data-path", str(image_folder), *TINY[:-4], "--workers", "2",
                     "--device", "cpu", "--epochs", "1", "--project", str(tmp_path))
    assert result.exit_code == 1
    assert "worker" in result.stderr and "--workers 0" in result.stderr
    assert time.monotonic() - started < 90


def test_out_of_memory_suggests_a_smaller_batch(runner, image_folder, tmp_path, monkeypatch):
    from cnntrain.train import loop

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(loop, "train_one_epoch", oom)
    result = run_cli(runner, "train", "--data-path", str(image_folder), *TINY, "--epochs", "1",
                     "--project", str(tmp_path))
    assert result.exit_code == 1
    assert "out of memory" in result.stderr and "--batch-size 4" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.integration
def test_same_seed_gives_the_same_weights(runner, image_folder, tmp_path):
    for name in ("a", "b"):
        assert run_cli(runner, "train", "--data-path", str(image_folder), *TINY, "--epochs", "2", "--deterministic",
                       "--seed", "7", "--aug", "randaugment", "--project", str(tmp_path / name)).exit_code == 0
    assert_same_weights(tmp_path / "a" / "exp" / "last.pt", tmp_path / "b" / "exp" / "last.pt")


# --- tiny datasets (trainer side) ---------------------------------------------------------


@pytest.mark.parametrize("per_class", [1, 2])
@pytest.mark.integration
def test_tiny_dataset_trains_with_or_without_a_validation_split(runner, tmp_path, per_class):
    """One image per class (no validation possible) or two (one held out), batch larger than the data."""
    from conftest import make_image_folder

    data = make_image_folder(tmp_path / "tiny", per_class=per_class)
    result = run_cli(runner, "train", "--data-path", str(data), *TINY[:-2], "--batch-size", "16", "--epochs", "2",
                     "--project", str(tmp_path / "runs"))
    assert result.exit_code == 0, result.output
    summary = __import__("json").loads((tmp_path / "runs" / "exp" / "summary.json").read_text())
    assert summary["train_images"] + summary["val_images"] == 3 * per_class
    assert summary["monitor"] == ("train_acc" if per_class == 1 else "val_acc")


def test_single_training_image_is_a_clear_error(runner, tmp_path):
    from conftest import make_image_folder

    data = make_image_folder(tmp_path / "one", per_class=1, classes=("red",))
    result = run_cli(runner, "train", "--data-path", str(data), *TINY, "--epochs", "1", "--project", str(tmp_path))
    assert result.exit_code == 1 and "at least 2" in result.stderr


# --- bad images at the trainer level ------------------------------------------------------


def _with_bad_files(root: Path) -> list[Path]:
    from conftest import make_image_folder

    make_image_folder(root, per_class=8)
    good = next((root / "red").glob("*.png")).read_bytes()
    bad = [root / "red" / "truncated.png", root / "blue" / "empty.jpg", root / "green" / "notes.jpg"]
    bad[0].write_bytes(good[: len(good) // 2])
    bad[1].write_bytes(b"")
    bad[2].write_text("this is text, not a photo")
    return bad


@pytest.mark.integration
def test_training_skips_unreadable_files_with_one_warning(runner, tmp_path):
    bad = _with_bad_files(tmp_path / "data")
    result = run_cli(runner, "train", "--data-path", str(tmp_path / "data"), *TINY, "--epochs", "1",
                     "--project", str(tmp_path / "runs"))
    assert result.exit_code == 0, result.output
    assert "skipping 3 of 27 images" in result.output
    assert all(str(p) in result.output for p in bad)
    summary = __import__("json").loads((tmp_path / "runs" / "exp" / "summary.json").read_text())
    assert summary["train_images"] + summary["val_images"] == 24


def test_strict_refuses_unreadable_files_before_training(runner, tmp_path):
    _with_bad_files(tmp_path / "data")
    result = run_cli(runner, "train", "--data-path", str(tmp_path / "data"), *TINY, "--epochs", "1", "--strict",
                     "--project", str(tmp_path / "runs"))
    assert result.exit_code == 1 and "3 of 27 images cannot be read" in result.stderr
    assert not (tmp_path / "runs" / "exp" / "last.pt").exists()


@pytest.mark.integration
def test_file_broken_after_the_scan_is_skipped_and_counted(runner, tmp_path, monkeypatch):
    from cnntrain.data.scan import ScanResult
    from cnntrain.train import splits

    bad = _with_bad_files(tmp_path / "data")
    # the scan saw a healthy folder; the files broke afterwards
    monkeypatch.setattr(splits, "scan_samples", lambda samples, **k: ScanResult(good=list(samples), bad=[]))
    result = run_cli(runner, "train", "--data-path", str(tmp_path / "data"), *TINY, "--val-split", "0",
                     "--epochs", "1", "--workers", "2", "--project", str(tmp_path / "runs"))
    assert result.exit_code == 0, result.output
    assert "skipped 3 unreadable image(s)" in result.output
    assert all(str(p) in result.output for p in bad)


def test_resume_point_after_the_last_batch_yields_no_samples():
    """A stop after an epoch's final (partial) batch resumes with nothing left, not a crash."""
    from cnntrain.data.sampler import EpochSampler

    sampler = EpochSampler(range(27), shuffle=True, seed=1)
    sampler.set_epoch(3, skip=14 * 2)  # 14 batches of 2 drawn from 27 samples
    assert len(sampler) == 0 and list(sampler) == []
    sampler.set_epoch(3, skip=10)
    full = EpochSampler(range(27), shuffle=True, seed=1)
    full.set_epoch(3)
    assert list(sampler) == list(full)[10:]
