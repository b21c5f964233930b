"""The training loop's bookkeeping: sums read from the device in groups give the same totals,
and a diverging loss is caught whichever step it happens at."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from cnntrain.engine import Batcher, NonFiniteLossError, train_one_epoch


def batches(n: int = 7, size: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(size, 5, generator=gen), torch.randint(0, 3, (size,), generator=gen)) for _ in range(n)]


def run(data, sync_every: int, **kw):
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    steps: list[dict] = []
    totals = train_one_epoch(model, data, opt, nn.CrossEntropyLoss(), Batcher(torch.device("cpu"), None),
                             sync_every=sync_every, on_step=steps.append, **kw)
    return totals, model, steps


@pytest.mark.parametrize("sync_every", [2, 3, 20])
def test_reading_the_loss_in_groups_gives_the_same_totals(sync_every):
    data = batches()
    one, model_one, steps_one = run(data, 1)
    grouped, model_grouped, steps_grouped = run(data, sync_every)
    assert (grouped.seen, grouped.correct, grouped.steps) == (one.seen, one.correct, one.steps)
    assert grouped.loss_sum == pytest.approx(one.loss_sum)
    torch.testing.assert_close(model_one.weight, model_grouped.weight)
    assert len(steps_grouped) == math.ceil(len(data) / sync_every)
    assert sum(s["n"] for s in steps_grouped) == sum(s["n"] for s in steps_one) == one.seen


@pytest.mark.parametrize("sync_every", [1, 4])
def test_nan_loss_is_reported_at_its_step(sync_every):
    data = batches()
    data[4] = (torch.full((4, 5), float("nan")), data[4][1])
    with pytest.raises(NonFiniteLossError, match="step 5"):
        run(data, sync_every)


def test_stop_request_is_polled_at_read_points():
    calls = []
    totals, _, _ = run(batches(), 3, should_stop=lambda: calls.append(1) or len(calls) == 2)
    assert totals.interrupted and totals.steps == 6 and totals.seen == 24


def test_after_step_runs_once_per_optimizer_step_with_the_updated_model():
    seen: list[torch.Tensor] = []
    totals, model, _ = run(batches(), 1, after_step=lambda m: seen.append(m.weight.detach().clone()))
    assert len(seen) == totals.steps == 7
    torch.testing.assert_close(seen[-1], model.weight)
    assert not torch.equal(seen[0], seen[1])  # each call sees that step's update


def test_batch_transform_feeds_the_model_and_soft_targets_count_by_argmax():
    def soften(images, targets):  # zeroed inputs and one-hot targets, as a mixup would hand them over
        return images * 0, nn.functional.one_hot(targets, 3).float()

    torch.manual_seed(0)
    initial = nn.Linear(5, 3).weight.detach().clone()  # what run() builds under the same seed
    data = batches()
    predictions: list[torch.Tensor] = []
    totals, model, _ = run(data, 1, batch_transform=soften,
                           prepare_model=lambda m: m.register_forward_hook(
                               lambda mod, args, out: predictions.append(out.argmax(1))))
    torch.testing.assert_close(model.weight, initial)  # zero inputs reached the model: no weight gradient
    assert totals.seen == 28 and math.isfinite(totals.loss_sum)
    assert totals.correct == sum(int((p == t).sum()) for p, (_, t) in zip(predictions, data))
