"""Configuration layering, YAML recipes, and the learning-rate schedules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cnntrain.cli import app
from cnntrain.config import TrainConfig, build_config, load_yaml
from cnntrain.errors import UsageError
from cnntrain.train.optim import OptimizerSettings, ScheduleSettings, build_optimizer, build_scheduler, lr_factor

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_there_are_recipes():
    names = {p.stem for p in CONFIGS}
    assert {"flowers_shufflenet_v2", "flowers_resnet34", "flowers_resnext50", "flowers_shufflenet_v1_g3",
            "cifar10_se_resnet50"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_recipe_loads(path):
    from cnntrain.models import get_spec

    cfg = build_config(load_yaml(path), source=str(path))
    get_spec(cfg.arch)  # the architecture exists
    # a recipe names its data, or is for one's own folder and says how to give it
    assert cfg.dataset or cfg.data_path or "--data-path" in path.read_text().splitlines()[1]


def test_seed_recipes_match_the_tutorials():
    v2 = build_config(load_yaml(Path(__file__).parents[1] / "configs/flowers_shufflenet_v2.yaml"))
    assert (v2.arch, v2.epochs, v2.batch_size, v2.opt, v2.lr, v2.momentum, v2.weight_decay, v2.sched, v2.lrf) == (
        "shufflenet_v2_x1_0", 30, 16, "sgd", 0.01, 0.9, 4e-5, "cosine", 0.1)
    se = build_config(load_yaml(Path(__file__).parents[1] / "configs/cifar10_se_resnet50.yaml"))
    assert (se.dataset, se.arch, se.pretrained, se.batch_size, se.epochs, se.lr, se.weight_decay, se.nesterov,
            se.sched, se.step_size, se.gamma) == ("cifar10", "se_resnet50", False, 128, 12, 0.01, 5e-4, True,
                                                  "step", 5, 0.1)


def test_precedence_defaults_file_command_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data-path: photos\nepochs: 7\nbatch-size: 4\nlr: 0.5\n")
    cfg = build_config(load_yaml(path), {"lr": 0.1})
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.opt) == (7, 4, 0.1, TrainConfig().opt)


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 3\nlearning_rate: 0.1\n")
    with pytest.raises(UsageError, match="learning_rate"):
        build_config(load_yaml(path))


def test_unknown_key_through_cli_exits_2(runner, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epoch: 3\n")
    result = runner.invoke(app, ["train", "--config", str(path)])
    assert result.exit_code == 2 and "'epoch'" in result.stderr


@pytest.mark.integration
def test_command_line_beats_file_through_cli(runner, tmp_path, image_folder):
    path = tmp_path / "c.yaml"
    path.write_text(f"data_path: {image_folder}\narch: resnet18\npretrained: false\nimg_size: 32\nepochs: 5\n"
                    "batch_size: 8\nworkers: 0\n")
    result = runner.invoke(app, ["train", "--config", str(path), "--epochs", "1", "--project", str(tmp_path / "r"),
                                 "--quiet"])
    assert result.exit_code == 0, result.output
    saved = load_yaml(tmp_path / "r" / "exp" / "config.yaml")
    assert saved["epochs"] == 1 and saved["batch_size"] == 8 and saved["img_size"] == 32
    # the saved config reruns the same job
    assert build_config(saved).to_dict() == {**saved, "resume": None, "quiet": False}  # not saved: output only


@pytest.mark.parametrize("bad", [{"epochs": 0}, {"opt": "lion"}, {"sched": "multistep"}, {"val_split": 1.0},
                                 {"aug": "mixup"}, {"unfreeze_epoch": 2}, {"data_path": "x", "dataset": "shapes"}])
def test_invalid_values(bad):
    with pytest.raises(UsageError):
        build_config(overrides=bad)


def _run_schedule(scheduler, optimizer, epochs):
    lrs = []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def _optimizer():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)


def test_step_schedule_matches_torch():
    cfg = build_config(overrides={"sched": "step", "step_size": 3, "gamma": 0.5, "lr": 0.1, "epochs": 10})
    ours = _run_schedule(build_scheduler(o := _optimizer(), cfg.pick(ScheduleSettings)), o, 10)
    theirs = _run_schedule(torch.optim.lr_scheduler.StepLR(t := _optimizer(), step_size=3, gamma=0.5), t, 10)
    assert ours == pytest.approx(theirs)


def test_multistep_schedule_matches_torch():
    cfg = build_config(overrides={"sched": "multistep", "milestones": "2,5", "gamma": 0.1, "lr": 0.1, "epochs": 8})
    ours = _run_schedule(build_scheduler(o := _optimizer(), cfg.pick(ScheduleSettings)), o, 8)
    theirs = _run_schedule(torch.optim.lr_scheduler.MultiStepLR(t := _optimizer(), [2, 5], 0.1), t, 8)
    assert ours == pytest.approx(theirs)


def test_cosine_schedule_matches_torch():
    cfg = build_config(overrides={"sched": "cosine", "lrf": 0.1, "lr": 0.1, "epochs": 12})
    ours = _run_schedule(build_scheduler(o := _optimizer(), cfg.pick(ScheduleSettings)), o, 12)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(t := _optimizer(), T_max=12, eta_min=0.1 * 0.1)
    assert ours == pytest.approx(_run_schedule(cosine, t, 12))


def test_warmup_then_cosine():
    factors = [lr_factor(e, sched="cosine", epochs=10, warmup_epochs=2, lrf=0.0) for e in range(10)]
    assert factors[0] == pytest.approx(1 / 3) and factors[1] == pytest.approx(2 / 3)
    assert factors[2] == pytest.approx(1.0) and factors[-1] < 0.05
    assert all(a >= b for a, b in zip(factors[2:], factors[3:], strict=False))


def test_nesterov_default_and_off():
    model = torch.nn.Linear(2, 2)
    photos = {"data_path": "photos"}  # (no data at all is `shapes`, which trains with AdamW)
    assert build_optimizer(model, build_config(photos).pick(OptimizerSettings)).defaults["nesterov"] is True
    plain = build_config(photos, overrides={"nesterov": False}).pick(OptimizerSettings)
    assert build_optimizer(model, plain).defaults["nesterov"] is False


@pytest.mark.parametrize("text, key", [("epochs: ten\n", "epochs"), ("lr: fast\n", "lr"), ("nesterov: 3\n", "nesterov"),
                                       ("aug: [1, 2]\n", "aug"), ("milestones: [a]\n", "milestones")])
def test_wrong_types_are_usage_errors(tmp_path, text, key):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(UsageError, match=key):
        build_config(load_yaml(path))


def test_yaml_scientific_notation_and_ints_for_floats(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\nweight_decay: 0\n")  # YAML 1.1 reads 1e-3 as a string
    cfg = build_config(load_yaml(path))
    assert cfg.lr == 0.001 and cfg.weight_decay == 0.0 and isinstance(cfg.weight_decay, float)


@pytest.mark.parametrize("size", [15, 4097, 10**6, 2**64])
def test_an_image_size_no_run_could_use_is_a_usage_error_before_any_data_is_read(size):
    with pytest.raises(UsageError, match="--img-size must be between 16 and 4096"):
        build_config({}, {"img_size": size})


@pytest.mark.parametrize("workers", [-1, 257, 45086, 2**64])
def test_more_loader_processes_than_any_machine_uses_is_a_usage_error(workers):
    with pytest.raises(UsageError, match="--workers must be between 0 and 256"):
        build_config({}, {"workers": workers})


def test_the_worker_pool_starts_no_process_without_an_item(monkeypatch):
    from cnntrain.data import pool

    started = []
    monkeypatch.setattr(pool, "DataLoader", lambda *a, num_workers, **k: started.append(num_workers) or [[1], [2]])
    assert list(pool.run_in_workers([10, 20], 200)) == [1, 2] and started == [2]
    assert list(pool.run_in_workers([], 200)) == [] and started == [2]  # nothing to do: no pool at all
