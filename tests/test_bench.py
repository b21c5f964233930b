"""`cnntrain bench`: structure and sanity only, never timing thresholds (CI machines vary)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys

import pytest
from conftest import make_image_folder
from PIL import Image

from cnntrain.cli import app
from cnntrain.models.stats import model_stats

TINY = ["shufflenet_v2_x0_5", "squeezenet1_1"]
FAST = ["--img-size", "64", "--batch-size", "4", "--runs", "1", "--device", "cpu"]
MODEL_FIELDS = ("params_m", "gmacs", "infer_images_per_s", "latency_ms", "train_images_per_s", "bare_images_per_s",
                "step_vs_bare")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _json(result) -> list[dict]:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_bench_json_fields_and_stats(runner, tmp_path):
    plot = tmp_path / "sub" / "bench.png"
    result = runner.invoke(app, ["bench", "--arch", ",".join(TINY), *FAST, "--format", "json", "--plot", str(plot)])
    rows = _json(result)
    assert [r["arch"] for r in rows] == TINY
    for row in rows:
        for key in MODEL_FIELDS:
            assert row[key] > 0, (row["arch"], key)
        stats = model_stats(row["arch"], 64)
        assert row["gmacs"] == pytest.approx(stats["gmacs"], abs=1e-4)
        assert row["params_m"] == pytest.approx(stats["params_m"], abs=1e-4)
        # 64 px: NCHW is faster on the CPU
        assert row["device"] == "cpu" and row["amp"] is None and row["channels_last"] is False
        assert row["img_size"] == 64 and row["batch_size"] == 4
    with Image.open(plot) as img:
        assert img.format == "PNG" and img.size[0] > 100
    assert not list(plot.parent.glob(".*.tmp*"))


def test_bench_csv_and_table(runner):
    result = runner.invoke(app, ["bench", "--arch", ",".join(TINY), *FAST, "--format", "csv"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["arch"] for r in rows] == TINY
    assert all(float(r["train_images_per_s"]) > 0 for r in rows)

    table = runner.invoke(app, ["bench", "--arch", TINY[1], *FAST])
    assert table.exit_code == 0, table.output
    assert TINY[1] in table.stdout and "train img/s" in table.stdout and "bare loop img/s" in table.stdout


@pytest.mark.parametrize("cache", ["none", "ram"])
def test_bench_pipeline(runner, tmp_path, cache):
    data = make_image_folder(tmp_path / "data", per_class=6, size=40)
    result = runner.invoke(app, ["bench", "--pipeline", "--data-path", str(data), "--arch", TINY[0], *FAST,
                                 "--workers", "0", "--epochs", "2", "--format", "json", "--cache", cache])
    (row,) = _json(result)
    assert row["num_classes"] == 3 and row["images"] == 18 and row["workers"] == 0
    assert row["cache"] == cache and (row["cache_seconds"] > 0) == (cache != "none")
    assert ("image cache: ram" in result.stderr) == (cache == "ram")
    assert len(row["epoch_images_per_s"]) == 2 and len(row["data_epoch_images_per_s"]) == 2
    for key in (*MODEL_FIELDS, "data_images_per_s", "e2e_images_per_s", "efficiency"):
        assert row[key] > 0, key
    assert row["e2e_images_per_s"] == pytest.approx(row["epoch_images_per_s"][1])
    # efficiency: epoch 2 against the step alone, timed around that same epoch (not minutes before)
    assert len(row["ceiling_images_per_s"]) == 2
    assert row["efficiency"] == pytest.approx(row["epoch_images_per_s"][1] / row["ceiling_images_per_s"][1])
    assert "the step alone around it" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--arch", "resnt18"], "did you mean"),
    (["--arch", "resnet18", "--pipeline"], "--data-path"),
    (["--arch", "resnet18", "--format", "xml"], "--format"),
    (["--arch", "resnet18", "--batch-size", "1"], "--batch-size"),
    (["--arch", "resnet18", "--cache", "memory"], "--cache"),
])
def test_bench_usage_errors(runner, args, message):
    result = runner.invoke(app, ["bench", *args, "--device", "cpu"])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


@pytest.mark.integration
def test_bench_prints_no_cuda_runtime_warning_on_a_cpu_machine(tmp_path):
    """torch's extension builder warns "No CUDA runtime is found" when it is imported where a CUDA_HOME
    exists but no GPU does; bench imports it through torch.utils.benchmark and must keep it quiet."""
    env = {**os.environ, "CUDA_HOME": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    code = "from cnntrain import bench; bench._timer(lambda: None).timeit(1); import torch.utils.cpp_extension"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "No CUDA runtime" not in done.stderr


def test_the_bare_loop_trains_its_own_nchw_copy_and_leaves_the_model_alone():
    import torch
    import torch.nn as nn

    from cnntrain.bench import _bare_step_fn, _step_fn

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(3))
    model(torch.zeros(2, 3, 8, 8))
    model.to(memory_format=torch.channels_last).train()
    before = [p.detach().clone() for p in model.parameters()]
    bare = _bare_step_fn(model, 2, 8, 3, torch.device("cpu"), None)
    bare()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # a copy trained
    copy = bare.__closure__  # the copy's conv weight is NCHW, the model's stays NHWC
    convs = [c.cell_contents for c in copy if isinstance(c.cell_contents, nn.Module)]
    assert convs and convs[0][0].weight.is_contiguous() and not model[0].weight.is_contiguous()
    _step_fn(model, 2, 8, 3, torch.device("cpu"), True, None)()
    assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # cnntrain's step trains it
