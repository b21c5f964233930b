"""`cnntrain export --int8` (static quantization, verified against fp32) and `bench --weights`.

One tiny checkpoint is trained once and exported to int8 once (module fixtures). The timings the
export takes are cut to one run at batch 4: what is pinned is that they are taken and stored, not
how fast anything is (the README's figures come from a benchmark run, not from here).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_helpers import invoke, one_line_error

from cnntrain import int8

pytestmark = pytest.mark.integration  # a CLI training, the real quantizer and onnxruntime

TINY = ["--arch", "resnet18", "--no-pretrained", "--img-size", "32", "--batch-size", "8", "--workers", "0",
        "--device", "cpu", "--val-split", "0.25", "--epochs", "1", "--quiet"]




@pytest.fixture(scope="module")
def quick_timing():
    """One timed run at batch 4 instead of five at 32: the tests pin that speed is measured."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(int8, "TIMING_RUNS", 1)
        mp.setattr(int8, "TIMING_BATCH", 4)
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory, image_folder) -> Path:
    project = tmp_path_factory.mktemp("runs")
    invoke("train", "--data-path", str(image_folder), *TINY, "--project", str(project))
    return project / "exp" / "best.pt"


@pytest.fixture(scope="module")
def int8_export(trained, quick_timing):
    """best.int8.onnx beside the checkpoint, with a dynamic batch, calibrated on 16 images."""
    run = invoke("export", "--weights", str(trained), "--int8", "--calib-images", "16", "--dynamic-batch")
    return trained.with_name("best.int8.onnx"), run.stdout


def test_int8_file_is_quantized_and_runs_in_onnxruntime(int8_export):
    import onnx
    import onnxruntime as ort

    path, _ = int8_export
    proto = onnx.load(str(path))
    ops = {node.op_type for node in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops, ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"images": torch.zeros(2, 3, 32, 32, dtype=torch.uint8).numpy()})[0]
    assert logits.shape == (2, 3)
    assert {p.key: p.value for p in proto.metadata_props}["quantization"].startswith("int8")


def test_sidecar_records_agreement_speed_and_size(int8_export, trained):
    path, stdout = int8_export
    meta = json.loads(path.with_name(path.name + ".json").read_text())
    assert meta["model_file"] == "best.int8.onnx" and meta["input"]["dtype"] == "uint8"
    q = meta["int8"]
    assert q["format"] == "QDQ" and q["calibration_images"] == 16
    agreement = q["agreement"]
    assert agreement["split"] == "val" and agreement["images"] == 9  # 3 classes x 12 images, a quarter held out
    assert agreement["top1"] >= agreement["required"] == 0.99
    for precision in ("fp32", "int8"):
        speed = q["speed"][precision]
        assert speed["latency_ms"] > 0 and speed["images_per_s"] > 0 and speed["batch_size"] == 4
    assert q["speed"]["latency_speedup"] == pytest.approx(
        q["speed"]["fp32"]["latency_ms"] / q["speed"]["int8"]["latency_ms"], rel=1e-2)
    assert 0 < q["size_bytes"]["int8"] < q["size_bytes"]["fp32"] / 2  # int8 weights: about a quarter
    assert "int8 agrees with fp32 on" in stdout and "latency (batch 1)" in stdout and "MB int8" in stdout


def test_predict_runs_the_int8_file(int8_export, image_folder):
    path, _ = int8_export
    image = sorted((image_folder / "red").iterdir())[0]
    rows = json.loads(invoke("predict", str(image), "--weights", str(path), "--format", "json").stdout)
    assert rows[0]["error"] is None and rows[0]["predictions"][0]["class"] in {"blue", "green", "red"}


def test_bench_weights_times_int8_file_and_checkpoint(int8_export, trained):
    path, _ = int8_export
    run = invoke("bench", "--weights", str(path), "--weights", str(trained), "--batch-size", "4", "--runs", "1",
                 "--format", "json")
    rows = json.loads(run.stdout)
    assert [(r["format"], r["int8"]) for r in rows] == [("onnx", True), ("checkpoint", False)]
    for row in rows:
        assert row["latency_ms"] > 0 and row["infer_images_per_s"] > 0 and row["batch_size"] == 4
        assert row["img_size"] == 32 and row["arch"] == "resnet18" and row["size_mb"] > 0


_measure_agreement = int8.measure_agreement


def _one_disagreement(fp32, int8_model, batches, split):
    """What measure_agreement would say if the int8 model changed the top-1 of one image."""
    found = _measure_agreement(fp32, int8_model, batches, split)
    found.agree -= 1
    return found


@pytest.fixture
def one_changed(monkeypatch):
    """One image of nine changes its class; the quantizer is skipped (the fp32 graph stands in for
    the int8 one), since what these tests pin is what happens after the agreement is known."""
    monkeypatch.setattr(int8, "measure_agreement", _one_disagreement)
    monkeypatch.setattr(int8, "_quantize", lambda fp32, out, reader: out.write_bytes(fp32.read_bytes()))


def test_disagreement_is_an_error_that_keeps_nothing(trained, tmp_path, one_changed):
    out = tmp_path / "m.int8.onnx"
    result = invoke("export", "--weights", str(trained), "--int8", "--calib-images", "4", "-o", str(out), code=1)
    *progress, line = result.stderr.strip().splitlines()  # "calibrating on ...", then the error
    assert line.startswith("error:") and not any(p.startswith("error:") for p in progress), result.stderr
    assert "agrees with the fp32 one on 88.9% of 9 val images" in line and "--accept-drop 0.112 accepts it" in line
    assert list(tmp_path.iterdir()) == []  # neither the file, nor its sidecar, nor a temporary


def test_accept_drop_keeps_what_it_accepts(trained, tmp_path, one_changed, quick_timing):
    out = tmp_path / "m.int8.onnx"
    invoke("export", "--weights", str(trained), "--int8", "--calib-images", "4", "--accept-drop", "0.2", "-o", str(out))
    agreement = json.loads(out.with_name(out.name + ".json").read_text())["int8"]["agreement"]
    assert agreement["top1"] == pytest.approx(8 / 9, abs=1e-4) and agreement["required"] == 0.8


def test_agreement_counts_images_not_floats():
    ninety_nine = int8.Agreement(images=100, agree=99, fp32_correct=0, int8_correct=0, split="val")
    assert ninety_nine.within(0.01) and not ninety_nine.within(0.009)
    assert int8.Agreement(3, 3, 0, 0, "val").within(0.0)
    assert not int8.Agreement(3, 2, 0, 0, "val").within(0.3)  # 1 of 3 is 33%


@pytest.mark.parametrize("args, message", [
    (["--format", "torchscript", "--int8"], "--int8 quantizes ONNX models"),
    (["--int8", "--calib-images", "0"], "--calib-images must be at least 1"),
    (["--int8", "--accept-drop", "1.5"], "--accept-drop is a fraction between 0 and 1"),
    (["--int8", "--accept-drop", "-0.1"], "--accept-drop is a fraction between 0 and 1"),
    (["--accept-drop", "0.1"], "--accept-drop goes with --int8"),
    (["--data-path", "."], "--data-path goes with --int8"),
])
def test_bad_int8_options_are_usage_errors(trained, args, message):
    assert message in one_line_error(invoke("export", "--weights", str(trained), *args, code=2))


def test_no_data_to_calibrate_on_is_a_usage_error(trained, tmp_path):
    ckpt = torch.load(trained, weights_only=True)
    ckpt["config"]["data_path"] = str(tmp_path / "gone")
    moved = tmp_path / "moved.pt"
    torch.save(ckpt, moved)
    line = one_line_error(invoke("export", "--weights", str(moved), "--int8", code=2))
    assert "is not there any more; give --data-path DIR" in line
    assert not moved.with_name("moved.int8.onnx").exists()


def test_bench_weights_rejects_options_the_file_decides(int8_export):
    path, _ = int8_export
    line = one_line_error(invoke("bench", "--weights", str(path), "--arch", "resnet18", "--img-size", "64", code=2))
    assert "--arch, --img-size do not apply to --weights" in line


def test_files_table_shows_every_file_with_its_figures():
    from rich.console import Console

    from cnntrain.bench_files import files_table

    rows = [{"weights": f"m{i}.onnx", "format": "onnx", "int8": bool(i), "arch": "resnet18", "img_size": 224,
             "size_mb": 44.7 / (1 + 3 * i), "latency_ms": 20.0 - i, "infer_images_per_s": 50.0 + i,
             "batch_size": 32, "runs": 5, "cpu": "a CPU, 2 cores"} for i in range(2)]
    console = Console(record=True, width=200)
    console.print(files_table(rows))
    text = console.export_text()
    assert "batch 32" in text and "a CPU, 2 cores" in text
    assert "m0.onnx" in text and "m1.onnx" in text and "11.2" in text and "19.00" in text and "yes" in text
