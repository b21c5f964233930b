"""The training core's parts, each on its own: the input pipeline bench and fit share, the
training state's save/restore, the resume plan's position, and the phases of a frozen run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from conftest import make_image_folder

from cnntrain.config import build_config
from cnntrain.data import load_folder
from cnntrain.errors import UsageError
from cnntrain.train.distributed import DistContext
from cnntrain.train.optim import OptimizerSettings, ScheduleSettings
from cnntrain.train.pipeline import PipelineSettings, build_pipeline
from cnntrain.train.resume import ResumePlan
from cnntrain.train.state import TrainingState

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    # 3 classes x 7 = 21 images, split 0: 21 % 4 == 1, the lone-last-sample case
    return load_folder(make_image_folder(tmp_path_factory.mktemp("parts") / "d", per_class=7, size=20), val_split=0)


def _pipeline(splits, ctx=DistContext(), **settings):
    return build_pipeline(splits, PipelineSettings(img_size=16, batch_size=4, workers=0, **settings), device=CPU,
                          mean=[0.5] * 3, std=[0.25] * 3, channels_last=False, amp_dtype=None, ctx=ctx,
                          image_cache=False)


def test_pipeline_drops_only_a_lone_last_sample_per_rank(splits):
    one = _pipeline(splits)
    assert one.train.drop_last and len(one.train) == 5 and one.val is None
    # two ranks: 21 padded to 22, 11 each, 11 % 4 == 3: nothing to drop
    rank = _pipeline(splits, DistContext(rank=1, world_size=2))
    assert not rank.train.drop_last and len(rank.train) == 3


def test_pipeline_batches_are_normalised_on_the_device_and_deterministic_with_aug_none(splits):
    pipe = _pipeline(splits, aug=("none",))
    pipe.sampler.set_epoch(0)
    first = [pipe.batcher(x, y)[0] for x, y, _ in pipe.train]
    pipe.sampler.set_epoch(0)
    again = [pipe.batcher(x, y)[0] for x, y, _ in pipe.train]
    assert first[0].dtype == torch.float32 and first[0].shape == (4, 3, 16, 16)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert float(first[0].min()) >= -2.0 - 1e-6 and float(first[0].max()) <= 2.0 + 1e-6  # (x/255 - .5) / .25


def test_bench_times_the_pipeline_that_fit_builds(splits, monkeypatch):
    from cnntrain import bench
    from cnntrain.train import pipeline

    built = []
    real = pipeline.build_pipeline
    monkeypatch.setattr(pipeline, "build_pipeline", lambda *a, **k: built.append(k) or real(*a, **k))
    row, model = bench.bench_model("squeezenet1_1", img_size=32, batch_size=4, device=CPU, amp_dtype=None,
                                   channels_last=False, runs=1, num_classes=3)
    bench.bench_pipeline(row, model, splits, device=CPU, amp_dtype=None, channels_last=False, workers=0, epochs=1)
    assert len(built) == 2  # a data-only pass, then training epochs
    assert row["epoch_images_per_s"][0] > 0


def _state(model: nn.Module, **kw) -> TrainingState:
    cfg = build_config({"data_path": "photos"}, {"epochs": 4, **kw})  # (no data at all: shapes, with AdamW)
    return TrainingState.create(model, cfg.pick(OptimizerSettings), cfg.pick(ScheduleSettings), amp_dtype=None,
                                monitor="val_acc", patience=cfg.patience)


def test_training_state_round_trips_through_its_state_dict():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    state = _state(model)
    model(torch.randn(5, 3)).sum().backward()
    state.optimizer.step()
    for epoch, acc in ((1, 0.5), (2, 0.7), (3, 0.6)):
        state.end_epoch({"epoch": epoch, "val_acc": acc})
    saved = state.state_dict()
    restored = _state(model)
    restored.load_state_dict(saved)
    assert (restored.best_epoch, restored.best_metric, restored.lr) == (2, 0.7, pytest.approx(state.lr))
    assert restored.history == state.history and restored.scheduler.last_epoch == 3
    buf = state.optimizer.state_dict()["state"][0]["momentum_buffer"]
    torch.testing.assert_close(restored.optimizer.state_dict()["state"][0]["momentum_buffer"], buf)


def test_quick_head_only_epochs_save_last_pt_every_few_seconds_and_every_best(tmp_path, monkeypatch):
    """Head-only epochs on cached features take milliseconds: last.pt after the first, then only
    once QUICK_SAVE_EVERY seconds have passed, and always at the end; best.pt at every improvement."""
    from cnntrain import checkpoint
    from cnntrain.train import checkpointer as module

    clock = [100.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: clock[0])
    saved: list[str] = []
    monkeypatch.setattr(checkpoint, "save", lambda path, payload: saved.append(f"{path.stem}@{payload['epoch']}"))
    model = nn.Linear(3, 2)
    state = _state(model)
    describe = dict(arch="x", classes=["a", "b"], img_size=32, mean=[0.5] * 3, std=[0.5] * 3, config={})
    saver = module.Checkpointer(tmp_path, describe, enabled=True, world_size=1)
    for epoch in range(1, 9):
        clock[0] += 1.0 if epoch != 6 else module.QUICK_SAVE_EVERY
        saver.end_of_epoch(model, epoch, {}, state, improved=epoch in (1, 3), quick=True, ending=epoch == 8)
    assert saved == ["best@1", "last@1", "best@3", "last@6", "last@8"]
    saved.clear()
    saver.end_of_epoch(model, 9, {}, state, improved=False)  # an epoch through the whole model: always
    assert saved == ["last@9"]


def test_early_stopping_counts_epochs_since_the_best_and_never_fires_on_the_last():
    state = _state(nn.Linear(3, 2), patience=2)
    assert math.isinf(state.best_metric)
    state.end_epoch({"epoch": 1, "val_acc": 0.9})
    state.end_epoch({"epoch": 2, "val_acc": 0.8})
    assert not state.should_stop_early(2, 4)
    state.end_epoch({"epoch": 3, "val_acc": 0.8})
    assert state.should_stop_early(3, 4) and not state.should_stop_early(4, 4)


def test_resume_plan_replays_a_stopped_epoch_whole_with_another_process_count(tmp_path):
    partial = {"loss_sum": 3.0, "correct": 2, "seen": 4, "steps": 1, "batches": 1, "seconds": 1.0, "skipped": []}
    plan = ResumePlan(tmp_path / "last.pt", {"epoch": 2, "partial_epoch": partial, "world_size": 1,
                                             "classes": ["a", "b"]})
    logged: list[str] = []
    assert plan.partial_epoch(1, True, logged.append) == partial and not logged
    assert plan.partial_epoch(1, False, logged.append)["seen"] == 0  # only rank 0 carries the sums
    assert plan.partial_epoch(2, True, logged.append) is None and "restarting epoch 3" in logged[0]
    assert plan.describe(partial, 5).endswith("from epoch 3, step 1 of 5")
    with pytest.raises(UsageError, match="trained on classes"):
        plan.check_classes(["a", "c"])
