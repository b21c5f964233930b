"""`cnntrain export` (ONNX, TorchScript) and `predict` from exported files.

One tiny checkpoint is trained once and exported once per format (module fixtures); each
registered model family is exported to ONNX from random init at a small size.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import one_line_error
from typer.testing import CliRunner

from cnntrain import checkpoint, export, exported
from cnntrain.cli import app
from cnntrain.data import IMAGENET_MEAN, IMAGENET_STD
from cnntrain.errors import CnnTrainError
from cnntrain.models import get_model, get_spec, list_models

# a CLI training for the shared checkpoint, and the real ONNX exporter + onnxruntime for each family
pytestmark = pytest.mark.integration

TINY = ["--arch", "resnet18", "--no-pretrained", "--img-size", "32", "--batch-size", "8", "--workers", "0",
        "--device", "cpu", "--val-split", "0.25", "--epochs", "1", "--quiet"]


def invoke(runner: CliRunner, *args: str, code: int = 0):
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, result.output
    return result



def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, image_folder) -> Path:
    project = tmp_path_factory.mktemp("runs")
    invoke(CliRunner(), "train", "--data-path", str(image_folder), *TINY, "--project", str(project))
    return project / "exp" / "best.pt"


@pytest.fixture(scope="module")
def exports(trained, tmp_path_factory):
    """ONNX at the default place and batch 1; TorchScript elsewhere with a dynamic batch."""
    runner = CliRunner()
    onnx_run = invoke(runner, "export", "--weights", str(trained), "--format", "onnx")
    ts_path = tmp_path_factory.mktemp("ts") / "model.torchscript.pt"
    ts_run = invoke(runner, "export", "--weights", str(trained), "--format", "torchscript", "--dynamic-batch",
                    "--output", str(ts_path))
    return {"onnx": trained.with_name("best.onnx"), "torchscript": ts_path,
            "onnx_out": onnx_run.stdout, "torchscript_out": ts_run.stdout}


# ------------------------------------------------------------------------------- export


def test_export_writes_model_and_sidecar(trained, exports):
    import onnx

    onnx_path, ts_path = exports["onnx"], exports["torchscript"]
    assert onnx_path.is_file() and ts_path.is_file()
    assert "max |logit difference|" in exports["onnx_out"] and "batch sizes 1, 3:" in exports["torchscript_out"]
    meta = json.loads(exported.sidecar_path(onnx_path).read_text())
    assert meta["format"] == "cnntrain-export" and meta["model_format"] == "onnx" and meta["arch"] == "resnet18"
    assert meta["classes"] == ["blue", "green", "red"] and meta["img_size"] == 32 and meta["resize"] == 36
    assert meta["input"] == {"name": "images", "dtype": "uint8", "layout": "NCHW", "channels": "RGB",
                             "shape": [1, 3, 32, 32], "range": [0, 255]}
    assert meta["output"]["shape"] == [1, 3] and meta["opset"] == 17
    assert meta["source_checkpoint"] == str(trained)
    assert meta["verification"]["max_abs_diff"] <= meta["verification"]["allowed"]
    assert meta["verification"]["batch_sizes"] == [1] and "batch sizes 1:" in exports["onnx_out"]
    ts_meta = json.loads(exported.sidecar_path(ts_path).read_text())
    assert ts_meta["model_format"] == "torchscript" and ts_meta["input"]["shape"][0] == "batch"
    assert ts_meta["opset"] is None and ts_meta["verification"]["batch_sizes"] == [1, 3]
    props = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    assert json.loads(props["classes"]) == ["blue", "green", "red"] and json.loads(props["mean"]) == meta["mean"]
    assert not leftovers(onnx_path.parent) and not leftovers(ts_path.parent)


def test_exports_compute_the_checkpoints_logits(trained, exports):
    ckpt = checkpoint.load(trained)
    model = export.ExportModule(checkpoint.restore_model(ckpt), ckpt["mean"], ckpt["std"]).eval()
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(images)
    for fmt in ("onnx", "torchscript"):
        loaded = exported.load_exported(exports[fmt], device="cpu")
        assert loaded.classes == ckpt["classes"] and loaded.img_size == 32
        got = loaded(images)  # ONNX exported at batch 1: fed image by image
        assert (got - expected).abs().max() < 1e-4, fmt


def test_predict_with_exports_equals_checkpoint(trained, exports, image_folder, runner):
    def rows(weights: Path) -> list[dict]:
        result = invoke(runner, "predict", str(image_folder), "--weights", str(weights), "--format", "json",
                        "--topk", "3", "--batch-size", "5", "--device", "cpu")
        return json.loads(result.stdout)

    reference = rows(trained)
    assert len(reference) == 36
    for fmt in ("onnx", "torchscript"):
        got = rows(exports[fmt])
        assert [r["path"] for r in got] == [r["path"] for r in reference]
        for a, b in zip(reference, got, strict=True):
            assert b["error"] is None
            assert [p["class"] for p in a["predictions"]] == [p["class"] for p in b["predictions"]], fmt
            pairs = zip(a["predictions"], b["predictions"], strict=True)
            assert max(abs(p["prob"] - q["prob"]) for p, q in pairs) <= 1e-4


def test_dynamic_batch_onnx_with_chosen_opset(trained, tmp_path, runner):
    import onnxruntime

    out = tmp_path / "dyn.onnx"
    result = invoke(runner, "export", "--weights", str(trained), "--dynamic-batch", "--opset", "13", "-o", str(out))
    assert "batch sizes 1, 3:" in result.stdout
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 3, 32, 32] and session.get_inputs()[0].type == "tensor(uint8)"
    assert json.loads(exported.sidecar_path(out).read_text())["opset"] == 13


def test_format_is_detected_from_the_file(trained, exports, tmp_path):
    renamed = tmp_path / "model.pt"  # TorchScript under a checkpoint-like name: found by its zip contents
    renamed.symlink_to(exports["torchscript"])
    assert exported.detect_format(renamed) == "torchscript"
    assert exported.detect_format(exports["onnx"]) == "onnx"
    assert exported.detect_format(trained) is None


# ------------------------------------------------------------------------------- failures


def _pair(exports, fmt: str, folder: Path) -> Path:
    """A link to the export plus a copy of its sidecar, to damage without touching the original."""
    model = folder / exports[fmt].name
    model.symlink_to(exports[fmt])
    exported.sidecar_path(model).write_text(exported.sidecar_path(exports[fmt]).read_text())
    return model


@pytest.mark.parametrize("damage, message", [
    ("missing", "has no sidecar"),
    ("not-json", "is not valid JSON"),
    ("other-format", "is not a cnntrain export sidecar"),
    ("no-classes", "classes must be a non-empty list"),
    ("fewer-classes", "belongs to another export"),
])
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_missing_or_tampered_sidecar_is_one_line_error(exports, image_folder, tmp_path, runner, fmt, damage, message):
    model = _pair(exports, fmt, tmp_path)
    side = exported.sidecar_path(model)
    meta = json.loads(side.read_text())
    if damage == "missing":
        side.unlink()
    elif damage == "not-json":
        side.write_text("{classes: [")
    elif damage == "other-format":
        side.write_text(json.dumps({**meta, "format": "something-else"}))
    elif damage == "no-classes":
        side.write_text(json.dumps({k: v for k, v in meta.items() if k != "classes"}))
    else:
        side.write_text(json.dumps({**meta, "classes": ["blue", "green"]}))
    result = invoke(runner, "predict", str(next(image_folder.rglob("*.png"))), "--weights", str(model),
                    "--device", "cpu", code=1)
    assert message in one_line_error(result)


def test_failed_verification_leaves_nothing_under_the_final_name(trained, tmp_path, runner, monkeypatch):
    real = exported.open_exported  # export_model verifies through it

    def off_by_half(*args, **kwargs):
        runner_ = real(*args, **kwargs)
        run = runner_._run
        runner_._run = lambda images: run(images) + 0.5
        return runner_

    monkeypatch.setattr(exported, "open_exported", off_by_half)
    for fmt in ("onnx", "torchscript"):
        out = tmp_path / f"model.{fmt}"
        out.write_bytes(b"previous export")  # an earlier good file must survive a failed re-export
        result = invoke(runner, "export", "--weights", str(trained), "--format", fmt, "-o", str(out), code=1)
        line = one_line_error(result)
        assert "disagrees with the PyTorch model" in line and "difference| 0.5 >" in line
        assert "nothing was written" in line
        assert out.read_bytes() == b"previous export"
        assert not exported.sidecar_path(out).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.torchscript"]


def test_unexportable_graph_is_one_line_and_prints_no_graph(tmp_path, capfd):
    # AlexNet's 6x6 adaptive pooling exports only when its last feature map divides it (224 px).
    torch.manual_seed(0)
    model = get_model("alexnet", num_classes=3).eval()
    with pytest.raises(export.ExportError, match="ONNX export of alexnet at 64 px failed.*adaptive_avg_pool2d") as info:
        export.export_model(model, tmp_path / "a.onnx", "onnx", arch="alexnet", classes=["a", "b", "c"], img_size=64,
                            mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert "\n" not in str(info.value) and "--format torchscript" in str(info.value)
    assert list(tmp_path.iterdir()) == []
    captured = capfd.readouterr()
    assert "graph(" not in captured.out and "graph(" not in captured.err  # the exporter's IR dump stays hidden


@pytest.mark.parametrize("missing", ["onnxruntime", "onnx"])
def test_missing_onnx_packages_name_the_extra(trained, exports, image_folder, tmp_path, runner, monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # makes `import <missing>` raise ImportError
    result = invoke(runner, "export", "--weights", str(trained), "-o", str(tmp_path / "m.onnx"), code=1)
    line = one_line_error(result)
    assert missing in line and "pip install 'cnntrain[onnx]'" in line
    assert list(tmp_path.iterdir()) == []
    if missing == "onnxruntime":  # predicting needs only onnxruntime
        result = invoke(runner, "predict", str(next(image_folder.rglob("*.png"))), "--weights", str(exports["onnx"]),
                        code=1)
        assert "pip install 'cnntrain[onnx]'" in one_line_error(result)
    # TorchScript needs neither
    invoke(runner, "export", "--weights", str(trained), "--format", "torchscript", "-o", str(tmp_path / "m.pt"))


@pytest.mark.parametrize("args, message", [
    (["--format", "tflite"], "--format must be one of onnx, torchscript"),
    (["--opset", "99"], "--opset must be between 9 and"),
    (["--format", "torchscript", "--opset", "13"], "--opset applies to --format onnx only"),
    (["--output", "no/such/folder/m.onnx"], "does not exist"),
    (["--output", "model.pt"], "an ONNX file must end in .onnx"),
    (["--format", "torchscript", "--output", "model.onnx"], "must not end in .onnx"),
])
def test_bad_options_are_usage_errors(trained, runner, args, message):
    result = invoke(runner, "export", "--weights", str(trained), *args, code=2)
    assert message in one_line_error(result)


# ------------------------------------------------------------------------------- every family

# One small member per registered family, at the smallest size it exports at: 32 px for the
# convnets (the exporter's work does not depend on the size, the verification's does), 75 for
# Inception v3. AlexNet and VGG pool adaptively to 6x6 / 7x7, which the ONNX exporter supports only
# when the last feature map divides that size, as at 224 px; the transformers need 224 px anyway.
FAMILIES = {
    "alexnet": ("alexnet", 224), "vgg": ("vgg11", 224),
    "vision_transformer": ("vit_b_16", 224), "swin_transformer": ("swin_t", 224),
    "swin_v2": ("swin_v2_t", 224), "maxvit": ("maxvit_t", 224),
    "resnet": ("resnet18", 32), "resnext": ("resnext50_32x4d", 32), "wide_resnet": ("wide_resnet50_2", 32),
    "se_resnet": ("se_resnet18", 32), "cbam_resnet": ("cbam_resnet50", 32), "densenet": ("densenet121", 32),
    "googlenet": ("googlenet", 32), "inception": ("inception_v3", 75), "mobilenet_v2": ("mobilenet_v2", 32),
    "mobilenet_v3": ("mobilenet_v3_small", 32), "mnasnet": ("mnasnet0_5", 32),
    "efficientnet": ("efficientnet_b0", 32), "efficientnet_v2": ("efficientnet_v2_s", 32),
    "regnet": ("regnet_y_400mf", 32), "convnext": ("convnext_tiny", 32), "squeezenet": ("squeezenet1_1", 32),
    "shufflenetv2": ("shufflenet_v2_x0_5", 32), "shufflenet_v1": ("shufflenet_v1_g1", 32),
}
# 250-550 MB of ONNX each, so they run in the slow group.
SLOW = {"alexnet", "vgg", "vision_transformer", "swin_transformer", "swin_v2", "maxvit", "wide_resnet"}


def test_every_registered_family_has_a_representative():
    assert {get_spec(n).family for n in list_models()} == set(FAMILIES)


def _export_fresh(arch: str, size: int, fmt: str, folder: Path) -> export.ExportResult:
    torch.manual_seed(0)
    model = get_model(arch, num_classes=3).eval()
    out = folder / (arch + (".onnx" if fmt == "onnx" else ".torchscript.pt"))
    result = export.export_model(model, out, fmt, arch=arch, classes=["a", "b", "c"], img_size=size,
                                 mean=IMAGENET_MEAN, std=IMAGENET_STD, dynamic_batch=True)
    assert result.max_abs_diff <= result.allowed and result.batch_sizes == [1, 3]
    logits = exported.load_exported(out, device="cpu")(torch.zeros(2, 3, size, size, dtype=torch.uint8))
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    return result


@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) if f in SLOW else f for f in FAMILIES])
def test_family_exports_to_onnx(family, tmp_path):
    arch, size = FAMILIES[family]
    _export_fresh(arch, size, "onnx", tmp_path)


@pytest.mark.parametrize("arch", ["shufflenet_v1_g1", "squeezenet1_1"])
def test_channel_shuffle_and_conv_heads_trace_to_torchscript(arch, tmp_path):
    # channel shuffle reshapes by the batch size; the trace must keep it symbolic (batch 3 is verified)
    assert _export_fresh(arch, 32, "torchscript", tmp_path).max_abs_diff == 0.0


def test_fixed_batch_export_lists_each_batch_size_once(tmp_path):
    # issue 17: a fixed-batch export verified two batch-1 inputs and reported "batch sizes 1, 1"
    torch.manual_seed(0)
    model = get_model("squeezenet1_1", num_classes=3).eval()
    result = export.export_model(model, tmp_path / "m.torchscript.pt", "torchscript", arch="squeezenet1_1",
                                 classes=["a", "b", "c"], img_size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert result.batch_sizes == [1]
    meta = json.loads(exported.sidecar_path(tmp_path / "m.torchscript.pt").read_text())
    assert meta["verification"]["batch_sizes"] == [1]


def test_export_error_is_a_cnntrain_error():
    assert issubclass(export.ExportError, CnnTrainError) and issubclass(exported.MissingDependencyError, CnnTrainError)
    assert os.fspath(exported.sidecar_path("a/best.onnx")) == os.path.join("a", "best.onnx.json")
