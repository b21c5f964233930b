"""Better models on small, real data: class weights, the balanced sampler, EMA, mixup/cutmix,
discriminative learning rates. Unit level, on constructed batches: no training runs here."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cnntrain.data.sampler import EpochSampler, balanced_weights
from cnntrain.errors import UsageError
from cnntrain.metrics import ConfusionMatrix
from cnntrain.train.ema import WeightAverage, warmed_decay
from cnntrain.train.imbalance import AUTO_CAP, auto_weights, class_weights, imbalance_line, weights_from_file
from cnntrain.train.loss import build_loss
from cnntrain.train.mixing import build_batch_mix
from cnntrain.train.optim import OptimizerSettings, ScheduleSettings, build_optimizer, build_scheduler
from cnntrain.train.state import TrainingState

# --- class weights --------------------------------------------------------------------------


def test_class_weights_scale_each_samples_loss_by_its_class():
    torch.manual_seed(0)
    logits, targets = torch.randn(5, 3), torch.tensor([0, 0, 1, 2, 2])
    weight = torch.tensor([0.5, 2.0, 3.0])
    per_sample = F.cross_entropy(logits, targets, reduction="none")
    w = weight[targets]
    expected = (per_sample * w).sum() / w.sum()
    assert build_loss(0.0, weight)(logits, targets) == pytest.approx(float(expected), rel=1e-6)
    # the same figure for the same targets written as one-hot soft targets
    soft = F.one_hot(targets, 3).float()
    assert build_loss(0.0, weight)(logits, soft) == pytest.approx(float(expected), rel=1e-6)
    assert build_loss(0.0)(logits, targets) == pytest.approx(float(per_sample.mean()), rel=1e-6)


def test_soft_targets_with_label_smoothing_match_torch():
    torch.manual_seed(1)
    logits, soft = torch.randn(4, 5), torch.softmax(torch.randn(4, 5), dim=1)
    expected = nn.CrossEntropyLoss(label_smoothing=0.1)(logits, soft)
    assert build_loss(0.1)(logits, soft) == pytest.approx(float(expected), rel=1e-6)


def test_auto_weights_are_inverse_frequency_with_mean_one_and_a_cap():
    weights = auto_weights([400, 200, 100, 50, 25])
    assert sum(weights) / 5 == pytest.approx(1.0)
    assert weights[4] / weights[0] == pytest.approx(16.0)
    capped = auto_weights([10_000] * 20 + [1])  # uncapped, the one image would weigh 21 classes' worth
    assert capped[20] == AUTO_CAP and capped[0] == pytest.approx(capped[1])
    assert auto_weights([5, 0, 5]) == [1.0, 0.0, 1.0]  # a class without training images weighs nothing


@pytest.mark.parametrize("suffix, text", [(".yaml", "a: 1\nb: 2.5\n"), (".json", json.dumps({"a": 1, "b": 2.5}))])
def test_class_weight_files_in_yaml_or_json(tmp_path, suffix, text):
    path = tmp_path / f"w{suffix}"
    path.write_text(text)
    assert class_weights(str(path), ["a", "b"], [1, 1]).tolist() == [1.0, 2.5]


@pytest.mark.parametrize("text, says", [("a: 1\n", "no weight for b"),
                                        ("a: 1\nb: 1\nc: 2\n", "not a class of this data: c"),
                                        ("a: 1\nb: heavy\n", "weight of b must be a number"),
                                        ("[1, 2]\n", "must map")])
def test_a_class_weight_file_must_name_every_class_and_only_them(tmp_path, text, says):
    path = tmp_path / "w.yaml"
    path.write_text(text)
    with pytest.raises(UsageError, match=says):
        weights_from_file(path, ["a", "b"])


def test_the_imbalance_line_names_the_remedies_only_above_three_to_one():
    strong = imbalance_line([400, 100, 25], ["daisy", "rose", "tulip"])
    assert strong is not None and "daisy (400) / smallest tulip (25) = 16.0x" in strong
    assert "--class-weights auto or --sampler balanced" in strong
    mild = imbalance_line([30, 20], ["a", "b"])
    assert mild is not None and "1.5x" in mild and "--class-weights" not in mild


# --- balanced sampler -----------------------------------------------------------------------


def _drawn_labels(labels, epoch, **kw):
    sampler = EpochSampler(labels, shuffle=True, seed=3, weights=balanced_weights(labels), **kw)
    sampler.set_epoch(epoch)
    return [labels[index] for _, index in sampler]


def test_the_balanced_sampler_draws_classes_equally_and_replays_exactly():
    labels = [0] * 1200 + [1] * 240 + [2] * 60
    drawn = _drawn_labels(labels, epoch=0)
    assert len(drawn) == len(labels)
    for count in Counter(drawn).values():
        assert count == pytest.approx(len(labels) / 3, rel=0.06)
    assert drawn == _drawn_labels(labels, epoch=0)  # same (seed, epoch): same draw, for resume
    assert drawn != _drawn_labels(labels, epoch=1)


def test_two_ranks_share_out_the_single_process_draw():
    labels = [0] * 30 + [1] * 6
    sampler = EpochSampler(labels, shuffle=True, seed=3, weights=balanced_weights(labels))
    sampler.set_epoch(2)
    whole = list(sampler)
    shares = []
    for rank in range(2):
        part = EpochSampler(labels, shuffle=True, seed=3, weights=balanced_weights(labels), num_replicas=2, rank=rank)
        part.set_epoch(2)
        shares.append(list(part))
    assert [item for pair in zip(*shares, strict=True) for item in pair] == whole


# --- EMA --------------------------------------------------------------------------------------


def test_ema_equals_the_hand_computed_average_over_three_steps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    average = WeightAverage(model, decay=0.9)
    hand: dict[str, torch.Tensor] = {}
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()
        model(torch.randn(8, 3))  # moves BatchNorm's running statistics, which are averaged too
        average.update(model)
        now = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
        d = warmed_decay(0.9, step)
        hand = now if step == 0 else {k: d * hand[k] + (1 - d) * now[k] for k in now}
    got = average.module.state_dict()
    assert {k for k in hand} == {"0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"}
    for key, value in hand.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6, msg=key)
    assert warmed_decay(0.9, 1) == pytest.approx(2 / 11) and warmed_decay(0.9, 10_000) == 0.9


def _state(model, ema_decay=0.9):
    return TrainingState.create(model, OptimizerSettings(), ScheduleSettings(epochs=3), amp_dtype=None,
                                monitor="val_acc", patience=None, ema_decay=ema_decay)


def test_the_ema_state_resumes_exactly():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    state = _state(model)
    for _ in range(4):
        with torch.no_grad():
            model.weight.add_(1.0)
        state.ema.update(model)
    saved = state.state_dict()
    resumed = _state(model)
    resumed.load_state_dict(saved)
    assert resumed.ema.updates == 4
    for a, b in ((state, model), (resumed, model)):
        a.ema.update(b)
    torch.testing.assert_close(resumed.ema.module.weight, state.ema.module.weight, rtol=0, atol=0)


def test_best_pt_takes_the_average_when_it_scores_higher():
    model = nn.Linear(3, 2)
    state = _state(model)
    state.ema.update(model)
    assert state.end_epoch({"epoch": 1, "val_acc": 0.5, "val_acc_ema": 0.7}) and state.best_is_ema
    assert state.best_weights(model) is state.ema.module and state.best_metric == 0.7
    assert state.end_epoch({"epoch": 2, "val_acc": 0.8, "val_acc_ema": 0.6}) and not state.best_is_ema
    assert state.best_weights(model) is model


# --- mixup / cutmix ---------------------------------------------------------------------------


@pytest.mark.parametrize("mixup, cutmix", [(0.2, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_mixed_targets_are_distributions_over_the_classes(mixup, cutmix):
    torch.manual_seed(0)
    mix = build_batch_mix(mixup, cutmix, 0.5, num_classes=4)
    images, labels = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 3, 0, 1])
    mixed, soft = mix(images, labels)
    assert mixed.shape == images.shape and soft.shape == (6, 4)
    torch.testing.assert_close(soft.sum(1), torch.ones(6))
    assert (soft.max(1).values >= 0.5).all()  # the dominant label keeps at least half
    assert build_batch_mix(0.0, 0.0, 0.5, 4) is None


# --- discriminative learning rates ---------------------------------------------------------------


def test_the_backbone_trains_at_the_multiplied_rate_all_through_the_schedule():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    optimizer = build_optimizer(model, OptimizerSettings(lr=0.1, backbone_lr_mult=0.1), head="2")
    rates = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert rates == pytest.approx({"head": 0.1, "backbone": 0.01})
    head_ids = {id(p) for g in optimizer.param_groups if g["name"] == "head" for p in g["params"]}
    assert head_ids == {id(model[2].weight), id(model[2].bias)}
    assert optimizer.param_groups[0]["name"] == "head"  # the lr shown and logged is the head's
    scheduler = build_scheduler(optimizer, ScheduleSettings(sched="cosine", epochs=4))
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    now = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert now["backbone"] == pytest.approx(now["head"] * 0.1) and now["head"] < 0.1
    plain = build_optimizer(model, OptimizerSettings(lr=0.1), head="2")
    assert {g["name"] for g in plain.param_groups} == {"all"}


# --- the scores read on imbalanced data ------------------------------------------------------------


def test_balanced_accuracy_and_macro_f1_weigh_every_class_alike():
    cm = ConfusionMatrix.from_matrix([[90, 0], [10, 0]])  # always the big class: 90% accurate
    scores = cm.scores()
    assert scores["acc"] == pytest.approx(0.9)
    assert scores["balanced_acc"] == pytest.approx(0.5)
    assert scores["macro_f1"] == pytest.approx((2 * 0.9 / 1.9) / 2)


# --- --batch-size auto --------------------------------------------------------------------------


def _gpu(limit_bytes: int, fixed: int = 1000, per_image: int = 100, nonlinear_above: int | None = None):
    """A stand-in for a GPU step: peak = fixed + per_image x batch (more above ``nonlinear_above``);
    out of memory past ``limit_bytes``. Records each batch it was asked to run."""
    asked: list[int] = []

    def measure(batch: int) -> int:
        asked.append(batch)
        peak = fixed + per_image * batch + (0 if nonlinear_above is None or batch <= nonlinear_above
                                            else 50 * (batch - nonlinear_above))
        if peak > limit_bytes:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return peak

    return measure, asked


def test_batch_size_auto_takes_the_largest_multiple_of_8_that_fits_and_verifies_it():
    from cnntrain.train.autobatch import choose_batch_size

    measure, asked = _gpu(limit_bytes=10**6)
    choice = choose_batch_size(measure, budget=20_000)  # (20000 - 1000) / 100 = 190 -> 184
    assert choice.batch_size == 184 and choice.peak_bytes == 1000 + 100 * 184 <= 20_000
    assert asked == [8, 16, 184]  # two to fit the line, one real step at the answer


def test_batch_size_auto_shrinks_when_the_verified_step_does_not_fit():
    """Memory grows faster than the small batches said (ultralytics #1451): the answer is re-verified."""
    from cnntrain.train.autobatch import choose_batch_size

    measure, asked = _gpu(limit_bytes=20_000, nonlinear_above=64)
    choice = choose_batch_size(measure, budget=20_000)
    assert asked[:3] == [8, 16, 184] and len(asked) > 3
    assert choice.peak_bytes <= 20_000 and choice.batch_size % 8 == 0
    assert choice.batch_size == asked[-1]  # the answer is the last size that was really run


def test_batch_size_auto_when_not_even_the_first_batch_fits():
    from cnntrain.errors import CnnTrainError
    from cnntrain.train.autobatch import choose_batch_size

    measure, _ = _gpu(limit_bytes=1500)
    with pytest.raises(CnnTrainError, match="not even 8 images fit"):
        choose_batch_size(measure, budget=10_000)


def test_batch_size_auto_leaves_room_for_the_optimiser_state_and_the_ema():
    from cnntrain.train.autobatch import later_bytes

    model = nn.Linear(10, 10)  # 110 float32 parameters = 440 bytes
    model.bias.requires_grad_(False)
    assert later_bytes(model, "adamw", 0.9, ema=False) == 2 * 400
    assert later_bytes(model, "sgd", 0.9, ema=True) == 400 + 440
    assert later_bytes(model, "sgd", 0.0, ema=False) == 0


def test_batch_size_auto_on_the_cpu_says_so_and_uses_the_default(config_of):
    from cnntrain.train.autobatch import CPU_DEFAULT, auto_batch_size

    lines: list[str] = []
    chosen = auto_batch_size(nn.Linear(2, 2), nn.CrossEntropyLoss(), img_size=32, num_classes=2,
                             device=torch.device("cpu"), channels_last=False, amp_dtype=None, opt="sgd",
                             momentum=0.9, ema=False, log=lines.append)
    assert chosen == CPU_DEFAULT and "on cpu it is the default" in lines[0]
    cfg = config_of("--dataset", "shapes", "--batch-size", "auto")
    assert cfg.batch_size_auto and config_of("--dataset", "shapes", "--batch-size", "16").batch_size == 16
