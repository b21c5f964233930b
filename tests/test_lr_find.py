"""The learning-rate range test: its suggestion, its clean-up, its early stop, and `cnntrain lr-find`."""

from __future__ import annotations

import copy
import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import make_image_folder
from PIL import Image

from cnntrain.cli import app
from cnntrain.config import build_config
from cnntrain.engine import Batcher
from cnntrain.plots import plot_lr_find
from cnntrain.train.lr_find import METHODS, LrFindResult, find_lr, lr_find_for_config, suggest

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def regression(seed: int, n: int = 512, dim: int = 8, batch: int = 64) -> tuple[list, float]:
    """Batches of a noisy linear regression, and the rate above which SGD on its MSE diverges:
    2 / the largest eigenvalue of the loss's Hessian, 2 X'X / n."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    y = x @ torch.randn(dim, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)
    unstable = 2 / torch.linalg.eigvalsh(2 * x.T @ x / n).max().item()
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)], unstable


def linear_test(seed: int, **kwargs) -> tuple[LrFindResult, float]:
    batches, unstable = regression(seed)
    torch.manual_seed(seed)
    model = nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return find_lr(model, batches, nn.MSELoss(), Batcher(CPU, None), optimizer, **kwargs), unstable


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_suggestion_lies_in_the_range_where_sgd_converges_well(seed):
    """Plain SGD on this quadratic diverges above ``unstable`` and crawls below a hundredth of it;
    the default 1e-7..10 sweep (eight cycled batches of unequal loss) must land in between."""
    result, unstable = linear_test(seed)
    assert result.method == "steepest"
    assert unstable / 100 <= result.suggestion <= unstable, (result.suggestion, unstable)


def test_stops_early_when_the_loss_diverges_and_not_before():
    result, unstable = linear_test(0, end_lr=10.0)
    assert result.diverged and len(result.lrs) < 100
    assert result.lrs[-1] > unstable  # it ran on past the stable range, then stopped
    assert result.smoothed[-1] > 4 * min(result.smoothed)
    assert len(result.lrs) == len(result.losses) == len(result.smoothed)

    calm, _ = linear_test(0, end_lr=unstable / 10)
    assert not calm.diverged and len(calm.lrs) == 100 and calm.lrs[-1] == pytest.approx(unstable / 10)


def test_a_non_finite_loss_ends_the_test_unrecorded():
    batches, _ = regression(0)
    model = nn.Linear(8, 1)
    calls = []

    def loss(out, target):
        calls.append(1)
        return nn.functional.mse_loss(out, target) * (math.inf if len(calls) > 7 else 1.0)

    result = find_lr(model, batches, loss, Batcher(CPU, None), torch.optim.SGD(model.parameters(), lr=0.1))
    assert result.diverged and len(result.lrs) == 7 and all(math.isfinite(v) for v in result.losses)


class TinyNet(nn.Module):
    """Convolution, BatchNorm (buffers), dropout (the RNG) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten(), nn.Dropout(0.5))
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def _image_batches(n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 256, (8, 3, 12, 12), dtype=torch.uint8, generator=g),
             torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def _assert_same(a, b, where="") -> None:
    """Nested dicts/lists/tensors equal bit for bit (tensors: same dtype and values)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def _stepped(opt: str) -> tuple[TinyNet, torch.optim.Optimizer, Batcher]:
    """A model and an optimiser that already hold state (momentum, Adam moments, gradients)."""
    from cnntrain.data.transforms import Normalize

    torch.manual_seed(0)
    model = TinyNet()
    optimizer = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
                 if opt == "sgd" else torch.optim.AdamW(model.parameters(), lr=1e-3))
    batcher = Batcher(CPU, Normalize([0.5] * 3, [0.25] * 3))
    images, targets = batcher(*_image_batches(1)[0])
    nn.functional.cross_entropy(model(images), targets).backward()
    optimizer.step()
    model.eval()
    return model, optimizer, batcher


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_weights_optimizer_state_and_rng_are_bit_identical_afterwards(opt):
    model, optimizer, batcher = _stepped(opt)
    weights = copy.deepcopy(model.state_dict())
    grads = [p.grad.clone() for p in model.parameters()]
    state = copy.deepcopy(optimizer.state_dict())
    torch_rng, py_rng, np_rng = torch.get_rng_state(), random.getstate(), np.random.get_state()
    moved = []

    def criterion(logits, targets):
        moved.append(model.fc.weight.detach().clone())  # the weights do change during the test
        return nn.functional.cross_entropy(logits, targets)

    result = find_lr(model, _image_batches(), criterion, batcher, optimizer, steps=12, end_lr=1.0)
    assert len(result.lrs) == 12 and not torch.equal(moved[0], moved[-1])

    _assert_same(model.state_dict(), weights, "weights")
    _assert_same([p.grad for p in model.parameters()], grads, "grads")
    _assert_same(optimizer.state_dict(), state, "optimizer")
    assert not any(m.training for m in model.modules())  # it was in eval mode
    assert torch.equal(torch.get_rng_state(), torch_rng)
    assert random.getstate() == py_rng
    assert np.array_equal(np.random.get_state()[1], np_rng[1])


def test_everything_is_restored_when_the_test_fails_midway():
    model, optimizer, batcher = _stepped("sgd")
    weights, state = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    calls = []

    def criterion(logits, targets):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return nn.functional.cross_entropy(logits, targets)

    with pytest.raises(KeyboardInterrupt):
        find_lr(model, _image_batches(), criterion, batcher, optimizer)
    _assert_same(model.state_dict(), weights, "weights")
    _assert_same(optimizer.state_dict(), state, "optimizer")


LRS = list(np.logspace(-6, 0, 40))


@pytest.mark.parametrize("curve, method, where", [
    # falls fastest at 1e-3 (a smooth step down, centred at index 19.5), then blows up
    ([2 - np.tanh((i - 19.5) / 3) for i in range(34)] + [4, 9, 20, 40, 80, 160], "steepest", (5e-4, 2e-3)),
    # rises from the start: nothing fell, the first rate tried
    ([1 + 0.1 * i for i in range(40)], "minimum", (1e-6, 1e-6)),
    # a minimum too early for a slope (the warm-up tenth and 3 points), yet something fell
    ([3, 2.5, 2, 1.8] + [1.8 + 0.1 * i for i in range(1, 37)], "valley", (1e-6, 1e-5)),
])
def test_suggest_falls_back_when_the_curve_has_no_slope_to_read(curve, method, where):
    suggestion, how = suggest(LRS, [float(v) for v in curve])
    assert how == method
    assert where[0] * 0.999 <= suggestion <= where[1] * 1.001, suggestion


def test_lr_find_for_config_is_seeded_and_leaves_the_rng_as_it_found_it(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=4, size=20)
    cfg = build_config({}, dict(data_path=str(data), arch="squeezenet1_1", pretrained=False, img_size=32,
                                batch_size=4, workers=0, device="cpu", seed=3))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = lr_find_for_config(cfg, steps=6)
    assert torch.equal(torch.get_rng_state(), before)
    assert lr_find_for_config(cfg, steps=6).losses == first.losses  # the same start, the same batches
    assert len(first.lrs) <= 6 and first.method in METHODS


@pytest.mark.parametrize("argv, message", [
    (["--start-lr", "1", "--end-lr", "0.1"], "--start-lr (1) must be below --end-lr (0.1)"),
    (["--steps", "4"], "--steps must be at least 5"),
    (["--start-lr", "0"], "--start-lr must be positive"),
    (["--format", "csv"], "--format must be one of table, json"),
])
def test_bad_values_are_usage_errors_before_any_data_is_read(runner, tmp_path, argv, message):
    result = runner.invoke(app, ["lr-find", "--data-path", str(tmp_path / "missing"), *argv])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_cli_prints_json_and_writes_the_plot(runner, tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "data", per_class=6, size=24)
    common = ["lr-find", "--data", str(data), "--arch", "squeezenet1_1", "--img-size", "32", "--no-pretrained",
              "--batch-size", "4", "--workers", "0", "--device", "cpu"]
    plot = tmp_path / "lr.png"
    result = runner.invoke(app, [*common, "--steps", "20", "--format", "json", "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    assert set(found) == {"lrs", "losses", "smoothed", "suggestion", "method", "diverged"}
    assert len(found["lrs"]) == len(found["losses"]) == len(found["smoothed"]) <= 20
    assert found["lrs"][0] == pytest.approx(1e-7) and found["method"] in METHODS
    assert found["lrs"][0] <= found["suggestion"] <= found["lrs"][-1]
    with Image.open(plot) as im:
        assert im.format == "PNG" and im.size[0] > 300

    monkeypatch.chdir(tmp_path)  # table: the default plot path, and the train command to run next
    table = runner.invoke(app, [*common, "--steps", "5", "--opt", "adamw", "--aug-preset", "no-mirror"])
    assert table.exit_code == 0, table.output
    assert "training transform: crop 0.6-1 of the area" in table.stderr  # the augmentation options reach it
    assert "suggested learning rate" in table.stdout and (tmp_path / "lr_find.png").is_file()
    hint = next(line for line in table.stdout.splitlines() if line.startswith("use it: "))
    assert hint.startswith(f"use it: cnntrain train --data-path {data} ") and "--no-pretrained" in hint
    assert "--opt adamw" in hint and " --lr " in hint and "--aug-preset no-mirror" in hint


def test_plot_draws_a_test_that_stopped_after_one_step(tmp_path):
    result = LrFindResult([1e-3], [2.0], [2.0], 1e-3, "minimum", True)
    with Image.open(plot_lr_find(result, tmp_path / "one.png")) as im:
        assert im.format == "PNG"


def test_train_lr_auto_trains_at_the_suggestion_and_leaves_no_trace(runner, tmp_path):
    """`train --lr auto`: the number, not "auto", in config.yaml, and the run it makes is the run
    `--lr NUMBER` makes: the range test disturbed neither the starting weights nor the RNG."""
    import yaml

    from cnntrain.weights import safe_load

    data = make_image_folder(tmp_path / "data", per_class=6, size=24)
    args = ["train", "--data", str(data), "--arch", "squeezenet1_1", "--img-size", "32", "--no-pretrained",
            "--batch-size", "4", "--workers", "0", "--device", "cpu", "--epochs", "1", "--deterministic",
            "--project", str(tmp_path / "runs")]
    result = runner.invoke(app, [*args, "--lr", "auto", "--name", "auto"])
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((tmp_path / "runs" / "auto" / "config.yaml").read_text())
    assert isinstance(saved["lr"], float) and saved["lr_auto"] is False
    line = next(s for s in result.output.splitlines() if s.startswith("--lr auto: "))
    assert f"{saved['lr']:.3g}" in line
    plain = runner.invoke(app, [*args, "--lr", repr(saved["lr"]), "--name", "plain"])
    assert plain.exit_code == 0, plain.output
    a, b = (safe_load(tmp_path / "runs" / name / "last.pt")["model"] for name in ("auto", "plain"))
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_lr_auto_on_resume_is_refused(runner, tmp_path):
    result = runner.invoke(app, ["train", "--resume", str(tmp_path / "nothing"), "--lr", "auto"])
    assert result.exit_code == 2 and "--lr auto" in result.stderr
