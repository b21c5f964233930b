"""``cnntrain export``: a checkpoint as an ONNX or TorchScript file that runs without cnntrain.

The exported graph takes what an image decoder gives: **uint8 RGB, NCHW, values 0-255**, already
resized (short side to ``resize`` px) and centre-cropped to ``img_size``; it divides by 255 and
normalises with the checkpoint's mean/std itself and returns **float32 logits** ``[N, classes]``.
So a deployment needs no normalisation constants and cannot apply the wrong ones; only the
geometry (resize + crop) is left to it, and the sidecar JSON (``<file>.json``) says it, with the
class names, architecture, opset, source checkpoint and the temperature training fitted: the
graph returns raw logits, and predict divides them by the sidecar's ``temperature``, as it does
for a checkpoint, so the export's probabilities are the checkpoint's.

Every export is verified before it is published: a few fixed-seed inputs go through the PyTorch
model and through the exported file (onnxruntime / ``torch.jit.load``); a logit difference above
``TOLERANCE * max(1, max |logit|)`` is an error and nothing is left under the final name. The
file is opened for that check by :func:`cnntrain.exported.open_exported`, the code predict runs
it with; loading lives in :mod:`cnntrain.exported`, writing here, and ``--int8`` (quantize the
fp32 file, then check it against it) in :mod:`cnntrain.int8`.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from cnntrain import __version__, exported, fileio
from cnntrain.choices import EXPORT_FORMATS
from cnntrain.data.transforms import CROP_RATIO, Normalize
from cnntrain.errors import CnnTrainError, UsageError, first_line
from cnntrain.exported import (
    ONNX_HINT,
    SIDECAR_FORMAT,
    ExportedModel,
    MissingDependencyError,
    import_onnxruntime,
    sidecar_path,
)

SIDECAR_VERSION = 1
# 17 runs on onnxruntime 1.12 and later and on most other runtimes, and is the first with a native
# LayerNormalization (ConvNeXt, Swin, ViT). The TorchScript-based exporter stops at 20.
DEFAULT_OPSET = 17
MIN_OPSET = 9
#: Allowed logit difference between PyTorch and the export, relative to the logits' scale:
#: ``max |diff| <= TOLERANCE * max(1, max |logit|)``. Float32 reordering gives ~1e-6; an
#: untrained network without normalised activations can reach logits of 1e7, hence the scale.
TOLERANCE = 1e-3
INPUT_NAME, OUTPUT_NAME = "images", "logits"
# The sidecar fields copied into an ONNX file's metadata_props (JSON-encoded), for tools like Netron.
METADATA_KEYS = ("arch", "classes", "img_size", "resize", "mean", "std", "input", "output", "source_checkpoint",
                 "temperature")
# The ONNX exporter ends "operator not supported" with an invitation to file a request: not what the user can do.
_ONNX_SUPPORT_PLEA = " Please feel free to request support"


class ExportError(CnnTrainError):
    """The exporter failed, or the exported file disagrees with the PyTorch model."""


def default_output(weights: str | Path, fmt: str) -> Path:
    """Beside the checkpoint: ``best.pt`` -> ``best.onnx`` / ``best.torchscript.pt``."""
    weights = Path(weights)
    return weights.with_name(weights.stem + (".onnx" if fmt == "onnx" else ".torchscript.pt"))


def _import_onnx(what: str) -> Any:
    try:
        import onnx
    except ImportError:
        raise MissingDependencyError(f"{what} needs the onnx package, which is not installed: {ONNX_HINT}") from None
    return onnx


class ExportModule(nn.Module):
    """uint8 NCHW RGB -> logits: the checkpoint's ``Normalize`` (the same one train/eval use) + the model."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(images))


# ----------------------------------------------------------------------------------- export


@dataclass
class ExportResult:
    path: Path
    sidecar: Path
    fmt: str
    max_abs_diff: float  # largest |logit difference| PyTorch vs export over the verification inputs
    allowed: float  # the tolerance that difference was held to
    batch_sizes: list[int]  # batches verified
    seconds: float
    int8: Any = None  # export --int8: the int8.Int8Report (agreement with fp32, speed-up)


def export_checkpoint(weights: str | Path, fmt: str = "onnx", output: str | Path | None = None, *,
                      dynamic_batch: bool = False, opset: int | None = None) -> ExportResult:
    """Export a cnntrain checkpoint (arch, classes, image size, normalisation all come from it)."""
    from cnntrain import checkpoint

    output = Path(output) if output is not None else default_output(weights, fmt)
    check_request(fmt, opset, output)  # before the (maybe large) checkpoint is read
    ckpt = checkpoint.require_full(checkpoint.load(weights), weights)
    return export_loaded(ckpt, weights, output, fmt, dynamic_batch=dynamic_batch, opset=opset)


def export_loaded(ckpt: dict[str, Any], weights: str | Path, output: str | Path, fmt: str, *,
                  dynamic_batch: bool = False, opset: int | None = None) -> ExportResult:
    """:func:`export_checkpoint` of a checkpoint already read (``export --int8`` reads it for its data too)."""
    from cnntrain import checkpoint
    from cnntrain.analysis.calibration import stored_temperature

    model = checkpoint.restore_model(ckpt)
    return export_model(model, output, fmt, arch=ckpt["arch"], classes=ckpt["classes"], img_size=ckpt["img_size"],
                        mean=ckpt["mean"], std=ckpt["std"], dynamic_batch=dynamic_batch, opset=opset,
                        source={"source_checkpoint": str(weights), "epoch": ckpt.get("epoch"),
                                "temperature": stored_temperature(ckpt) or 1.0})


def export_model(model: nn.Module, output: str | Path, fmt: str, *, arch: str, classes: list[str], img_size: int,
                 mean: list[float], std: list[float], dynamic_batch: bool = False, opset: int | None = None,
                 source: dict[str, Any] | None = None) -> ExportResult:
    """Export ``model`` (any classifier), verify it, then publish the file and its sidecar."""
    output = Path(output)
    check_request(fmt, opset, output)
    if fmt == "onnx":
        opset = opset or DEFAULT_OPSET
    start = time.perf_counter()
    wrapped = ExportModule(model, mean, std).eval()
    meta = _sidecar(fmt, arch=arch, classes=classes, img_size=img_size, mean=mean, std=std,
                    dynamic_batch=dynamic_batch, opset=opset if fmt == "onnx" else None, file=output.name,
                    source=source or {})
    example = torch.zeros(1, 3, img_size, img_size, dtype=torch.uint8)
    try:
        with fileio.atomic_path(output) as tmp:  # published only once verified
            if fmt == "onnx":
                _write_onnx(wrapped, example, tmp, opset=meta["opset"], dynamic_batch=dynamic_batch, arch=arch,
                            img_size=img_size, metadata={k: meta[k] for k in METADATA_KEYS if k in meta})
            else:
                _write_torchscript(wrapped, example, tmp, arch=arch, img_size=img_size)
            runner = exported.open_exported(fmt, tmp, meta, "cpu")
            diff, allowed, sizes = _verify(wrapped, runner, img_size, dynamic_batch)
            if diff > allowed:
                raise ExportError(f"the {fmt} export of {arch} disagrees with the PyTorch model: max |logit "
                                  f"difference| {diff:.3g} > {allowed:.3g}; nothing was written")
            meta["verification"] = {"max_abs_diff": diff, "allowed": allowed, "batch_sizes": sizes,
                                    "runtime": "onnxruntime" if fmt == "onnx" else "torch.jit"}
    except OSError as exc:
        raise ExportError(f"could not write {output}: {exc.strerror or exc}") from None
    meta["sha256"] = fileio.sha256_file(output)  # predict checks a TorchScript file against it before loading it
    sidecar = sidecar_path(output)
    try:
        fileio.atomic_write_text(sidecar, json.dumps(meta, indent=2) + "\n")
    except OSError as exc:
        raise ExportError(f"wrote {output} but not its sidecar {sidecar}: {exc.strerror or exc}") from None
    return ExportResult(output, sidecar, fmt, diff, allowed, sizes, time.perf_counter() - start)


def check_request(fmt: str, opset: int | None, output: Path) -> None:
    """Everything that can be wrong with the request itself, checked before any work is done."""
    if fmt not in EXPORT_FORMATS:
        raise UsageError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, not {fmt!r}")
    if opset is not None and fmt != "onnx":
        raise UsageError("--opset applies to --format onnx only")
    if opset is not None and not MIN_OPSET <= opset <= _max_opset():
        raise UsageError(f"--opset must be between {MIN_OPSET} and {_max_opset()} (the TorchScript-based "
                         f"exporter's range), not {opset}; the default is {DEFAULT_OPSET}")
    if output.is_dir():
        raise UsageError(f"--output {output} is a folder; give a file name, e.g. {output / ('model.' + fmt)}")
    if not output.parent.is_dir():
        raise UsageError(f"--output {output}: the folder {output.parent} does not exist")
    # predict tells ONNX from TorchScript by the .onnx suffix, so the name must agree with the format.
    if (output.suffix.lower() == ".onnx") != (fmt == "onnx"):
        rule = ("an ONNX file must end in .onnx" if fmt == "onnx"
                else "a TorchScript file must not end in .onnx; e.g. model.torchscript.pt")
        raise UsageError(f"--output {output}: {rule}")
    if fmt == "onnx":  # the exporter needs onnx, verification onnxruntime
        _import_onnx("--format onnx")
        import_onnxruntime("--format onnx")


def _max_opset() -> int:
    try:
        from torch.onnx import _constants

        return int(_constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
    except (ImportError, AttributeError):  # private constant: fall back to torch 2.x's value
        return 20


def _sidecar(fmt: str, *, arch: str, classes: list[str], img_size: int, mean: list[float], std: list[float],
             dynamic_batch: bool, opset: int | None, file: str, source: dict[str, Any]) -> dict[str, Any]:
    batch: int | str = "batch" if dynamic_batch else 1
    resize = int(img_size / CROP_RATIO)
    return {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        "model_file": file,
        "model_format": fmt,
        "arch": arch,
        "classes": list(classes),
        "img_size": int(img_size),
        "resize": resize,
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "input": {"name": INPUT_NAME, "dtype": "uint8", "layout": "NCHW", "channels": "RGB",
                  "shape": [batch, 3, img_size, img_size], "range": [0, 255]},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": [batch, len(classes)], "kind": "logits"},
        "preprocess": (f"decode to RGB; resize the shorter side to {resize} px (bilinear, antialiased); centre-crop "
                       f"{img_size}x{img_size}; uint8 HWC -> CHW, add the batch axis. The graph itself computes "
                       "(x / 255 - mean) / std; apply softmax to the logits divided by temperature for "
                       "calibrated probabilities (temperature 1: the raw softmax)."),
        "dynamic_batch": bool(dynamic_batch),
        "opset": opset,
        **source,
        "torch_version": torch.__version__,
        "cnntrain_version": __version__,
    }


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the legacy exporters: deprecation warnings, and the whole IR graph that the ONNX one
    prints to the process's stdout from C++ when it fails (verification is our check, not warnings)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            sys.stdout.flush()
            saved = os.dup(1)
        except (OSError, ValueError, AttributeError):  # no real stdout: nothing to protect
            yield
            return
        try:
            with open(os.devnull, "wb") as null:
                os.dup2(null.fileno(), 1)
            yield
        finally:
            _flush_c_stdio()
            os.dup2(saved, 1)
            os.close(saved)


def _flush_c_stdio() -> None:
    """Flush C's stdout buffer while it still points at /dev/null (a pipe makes it fully buffered)."""
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError, TypeError):  # no C library to reach (e.g. Windows): nothing buffered there
        pass


def _write_onnx(model: nn.Module, example: torch.Tensor, path: Path, *, opset: int, dynamic_batch: bool,
                arch: str, img_size: int, metadata: dict[str, Any]) -> None:
    onnx = _import_onnx("--format onnx")
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    # Not under no_grad: there nn.MultiheadAttention takes its fused fast path, an op with no ONNX form.
    try:
        with _quiet_exporter():
            torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=axes,
                              do_constant_folding=True)
    except Exception as exc:  # the exporter raises many types; all mean "this graph cannot be exported"
        reason = first_line(exc, with_type=True).split(_ONNX_SUPPORT_PLEA)[0]
        raise ExportError(f"ONNX export of {arch} at {img_size} px failed ({reason}); "
                          "--format torchscript exports every architecture") from None
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    proto.doc_string = f"cnntrain {arch}: uint8 RGB NCHW in, logits out; see the .json sidecar"
    onnx.save(proto, str(path))


@torch.no_grad()
def _write_torchscript(model: nn.Module, example: torch.Tensor, path: Path, *, arch: str, img_size: int) -> None:
    # Tracing, not scripting: it handles every architecture, and verification catches a trace that
    # does not generalise (e.g. to other batch sizes).
    try:
        with _quiet_exporter():
            traced = torch.jit.trace(model, example, check_trace=False)
            torch.jit.save(traced, str(path))
    except Exception as exc:
        reason = first_line(exc, with_type=True)
        raise ExportError(f"TorchScript export of {arch} at {img_size} px failed ({reason})") from None


def _verification_inputs(img_size: int, dynamic_batch: bool) -> list[torch.Tensor]:
    """Fixed-seed noise and a smooth gradient (batch 1), plus a batch of 3 when the batch is dynamic."""
    gen = torch.Generator().manual_seed(0)
    noise = lambda n: torch.randint(0, 256, (n, 3, img_size, img_size), dtype=torch.uint8, generator=gen)  # noqa: E731
    ramp = torch.linspace(0, 255, img_size).round().to(torch.uint8)
    gradient = torch.stack([ramp.expand(img_size, -1), ramp.unsqueeze(1).expand(-1, img_size),
                            ramp.flip(0).expand(img_size, -1)]).unsqueeze(0)
    inputs = [noise(1), gradient]
    if dynamic_batch:
        inputs.append(noise(3))
    return inputs


@torch.no_grad()
def _verify(model: nn.Module, runner: ExportedModel, img_size: int,
            dynamic_batch: bool) -> tuple[float, float, list[int]]:
    diff, scale = 0.0, 1.0
    inputs = _verification_inputs(img_size, dynamic_batch)
    for images in inputs:
        expected = model(images).float()
        if not torch.isfinite(expected).all():
            raise ExportError("the PyTorch model itself returns NaN or infinite logits on the verification inputs; "
                              "nothing was written")
        try:
            got = runner(images)
        except CnnTrainError:
            raise
        except Exception as exc:
            reason = first_line(exc, with_type=True)
            raise ExportError(f"the exported file fails on a batch of {len(images)} ({reason}); "
                              "nothing was written") from None
        if got.shape != expected.shape:
            raise ExportError(f"the exported file returns shape {list(got.shape)} for a batch of {len(images)}, "
                              f"expected {list(expected.shape)}; nothing was written")
        # NaN from the export counts as infinitely far (a plain max() would skip it)
        diff = max(diff, float((got - expected).abs().nan_to_num(nan=float("inf")).max()))
        scale = max(scale, float(expected.abs().max()))
    return diff, TOLERANCE * scale, list(dict.fromkeys(len(x) for x in inputs))  # each size once, in order
