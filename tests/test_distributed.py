"""Data-parallel training on CPU with gloo: real torchrun launches on a tiny generated folder,
plus the pieces (sharded sampling, argument stripping) checked without processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cnntrain.data.sampler import EpochSampler, ShardSampler
from cnntrain.train.distributed import strip_option

CNNTRAIN = [sys.executable, "-m", "cnntrain"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
TINY = ["--arch", "resnet18", "--img-size", "32", "--no-pretrained", "--device", "cpu", "--workers", "0", "-q"]


def run(cmd: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


# --- without processes --------------------------------------------------------------------------


@pytest.mark.parametrize("size,world", [(10, 2), (11, 2), (7, 3), (2, 4)])
def test_ranks_split_the_single_process_order(size, world):
    """Rank r takes every world-th item of the one-process order (padded by wrapping), so N ranks
    with batch B draw, step by step, the samples one process with batch N x B draws."""
    alone = EpochSampler(range(size), shuffle=True, seed=5)
    alone.set_epoch(3)
    order = list(alone)
    shards = []
    for rank in range(world):
        sampler = EpochSampler(range(size), shuffle=True, seed=5, num_replicas=world, rank=rank)
        sampler.set_epoch(3)
        shards.append(list(sampler))
    assert len({len(s) for s in shards}) == 1  # every rank takes the same number of steps
    padded = (order * world)[: len(shards[0]) * world]
    assert [shards[i % world][i // world] for i in range(len(padded))] == padded


def test_resuming_rank_skips_its_own_samples():
    sampler = EpochSampler(range(9), shuffle=True, seed=1, num_replicas=2, rank=1)
    sampler.set_epoch(0)
    full = list(sampler)
    sampler.set_epoch(0, skip=2)
    assert list(sampler) == full[2:] and len(sampler) == len(full) - 2


def test_validation_shards_cover_every_sample_once():
    shards = [list(ShardSampler(range(7), num_replicas=3, rank=r)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(7))


def test_strip_option_removes_both_spellings():
    argv = ["train", "--nproc", "2", "--epochs", "3", "--nproc=4", "--name", "x"]
    assert strip_option(argv, "--nproc") == ["train", "--epochs", "3", "--name", "x"]


def test_sync_bn_on_cpu_is_refused_before_launch(runner, image_folder, tmp_path):
    from cnntrain.cli import app

    result = runner.invoke(app, ["train", "--data-path", str(image_folder), *TINY, "--nproc", "2", "--sync-bn",
                                 "--project", str(tmp_path)])
    assert result.exit_code == 2 and "--sync-bn needs CUDA" in result.output
    assert not any(tmp_path.iterdir())


# --- real launches (gloo on CPU) -----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("variant, both",
                         [(["--no-feature-cache"], []),
                          (["--feature-cache", "--lr", "0.005", "--lr-scale", "linear"],
                           ["--sampler", "balanced", "--class-weights", "auto", "--ema"])],
                         ids=["full-model", "feature-cache+lr-scale+balanced+ema"])
def test_two_processes_match_one_with_the_same_global_batch(image_folder, tmp_path, runner, variant, both):
    """torchrun with 2 ranks x batch 4 == 1 process x batch 8: same losses, accuracy and weights
    (frozen backbone, so BatchNorm statistics cannot differ between the two), one run folder,
    validation counted once over the whole set, no `module.` prefix in the checkpoint. With
    --lr-scale linear, 2 x 0.005 is the single process's 0.01. The balanced draw, the class
    weights and the average of the weights (validated on the cached features) agree too."""
    common = ["train", "--data-path", str(image_folder), *TINY, "--epochs", "2", "--freeze-layers", "--aug", "none",
              "--project", str(tmp_path / "runs"), *both]
    run([*TORCHRUN, "-m", "cnntrain", *common, "--batch-size", "4", "--name", "ddp", *variant], tmp_path)
    from cnntrain.cli import app  # the one-process run here: no second torch import to wait for

    single = runner.invoke(app, [*common, "--batch-size", "8", "--name", "single", "--no-feature-cache"])
    assert single.exit_code == 0, single.output

    runs = tmp_path / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["ddp", "latest", "single"]
    ddp, single = (json.loads((runs / n / "summary.json").read_text()) for n in ("ddp", "single"))
    assert ddp["processes"] == 2 and single["processes"] == 1
    assert ddp["val_images_scored"] == ddp["val_images"] == single["val_images"]
    assert ddp["best_val_acc"] == pytest.approx(single["best_val_acc"])
    # the shards' per-image answers gathered on rank 0: the same temperature, every val image in top_losses
    assert ddp["temperature"] == pytest.approx(single["temperature"], rel=1e-3)
    assert sorted(m["path"] for m in ddp["top_losses"]) == sorted(m["path"] for m in single["top_losses"])
    assert len(ddp["top_losses"]) == ddp["val_images"] and (runs / "ddp" / "top_losses.png").is_file()
    rows = [(runs / n / "metrics.csv").read_text().splitlines()[1:] for n in ("ddp", "single")]
    for a, b in zip(*rows, strict=True):
        loss_a, loss_b = float(a.split(",")[1]), float(b.split(",")[1])
        assert loss_a == pytest.approx(loss_b, rel=1e-4)
        assert float(a.split(",")[6]) == pytest.approx(float(b.split(",")[6]))  # learning rate
    a, b = weights(runs / "ddp" / "best.pt"), weights(runs / "single" / "best.pt")
    assert not any(k.startswith("module.") for k in a)
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), atol=1e-4, rtol=1e-4)


def start_job(image_folder: Path, tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    """`cnntrain train --nproc 2` for many epochs, returned once its first epoch is saved."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    project = tmp_path / "runs"
    job = subprocess.Popen([*CNNTRAIN, "train", "--data-path", str(image_folder), *TINY, "--epochs", "500",
                            "--batch-size", "4", "--nproc", "2", "--project", str(project), *extra],
                           cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (project / "exp" / "metrics.csv").exists():
        if job.poll() is not None or time.monotonic() > deadline:
            job.kill()
            pytest.fail("training never got going: " + job.communicate()[1][-2000:])
        time.sleep(0.2)
    return job, project / "exp"


@pytest.mark.slow
def test_sigterm_saves_then_one_process_resumes(image_folder, tmp_path, runner):
    """SIGTERM to `cnntrain train --nproc 2` stops every rank at the same step, rank 0 saves and
    the job exits 143; the checkpoint resumes in a single process (the interrupted epoch is
    replayed whole, as shards differ with the process count) and serves predict and eval
    (those three in this process: a fresh interpreter each would add a torch import apiece)."""
    from cnntrain.cli import app

    def here(*argv: str):
        result = runner.invoke(app, list(argv))
        assert result.exit_code == 0, result.output
        return result

    job, run_dir = start_job(image_folder, tmp_path)
    try:
        job.send_signal(signal.SIGTERM)
        _, stderr = job.communicate(timeout=90)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 143, stderr[-2000:]
    assert "Resume with: cnntrain train --resume" in stderr
    saved = torch.load(run_dir / "last.pt", weights_only=True)
    assert saved["world_size"] == 2 and "module." not in "".join(saved["model"])
    epochs = saved["epoch"] + 1
    resumed = here("train", "--resume", str(run_dir), "--epochs", str(epochs))
    if saved.get("partial_epoch"):
        assert f"restarting epoch {epochs} from its start with 1" in resumed.stdout
    lines = (run_dir / "metrics.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in lines[1:]] == [str(e) for e in range(1, epochs + 1)]
    assert torch.load(run_dir / "last.pt", weights_only=True)["world_size"] == 1
    image = next((image_folder / "red").iterdir())
    predicted = here("predict", str(image), "--weights", str(run_dir / "best.pt"), "--format", "json",
                     "--device", "cpu")
    assert json.loads(predicted.stdout)[0]["predictions"]
    here("eval", "--weights", str(run_dir / "best.pt"), "--data-path", str(image_folder), "--device", "cpu",
         "--workers", "0")


@pytest.mark.slow
def test_a_dead_worker_stops_the_whole_job(image_folder, tmp_path):
    job, run_dir = start_job(image_folder, tmp_path)
    try:
        children = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True).stdout.split()
        assert len(children) == 2, children
        os.kill(int(children[-1]), signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 1
    assert time.monotonic() - killed < 60
    assert "was killed by SIGKILL" in stderr
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] >= 1  # what was saved is intact
