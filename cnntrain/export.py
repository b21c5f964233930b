"""``cnntrain export``: a checkpoint as an ONNX or TorchScript file that runs without cnntrain.

The exported graph takes what an image decoder gives: **uint8 RGB, NCHW, values 0-255**, already
resized (short side to ``resize`` px) and centre-cropped to ``img_size``; it divides by 255 and
normalises with the checkpoint's mean/std itself and returns **float32 logits** ``[N, classes]``.
So a deployment needs no normalisation constants and cannot apply the wrong ones; only the
geometry (resize + crop) is left to it, and the sidecar JSON (``<file>.json``) says it, with the
class names, architecture, opset and source checkpoint.

Every export is verified before it is published: a few fixed-seed inputs go through the PyTorch
model and through the exported file (onnxruntime / ``torch.jit.load``); a logit difference above
``TOLERANCE * max(1, max |logit|)`` is an error and nothing is left under the final name.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from cnntrain import __version__, fileio
from cnntrain.data.transforms import CROP_RATIO, Normalize
from cnntrain.errors import CheckpointError, CnnTrainError, UsageError

FORMATS = ("onnx", "torchscript")
SIDECAR_FORMAT = "cnntrain-export"
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
ONNX_HINT = "pip install 'cnntrain[onnx]'"
# The sidecar fields copied into an ONNX file's metadata_props (JSON-encoded), for tools like Netron.
_METADATA_KEYS = ("arch", "classes", "img_size", "resize", "mean", "std", "input", "output", "source_checkpoint")


class ExportError(CnnTrainError):
    """The exporter failed, or the exported file disagrees with the PyTorch model."""


class MissingDependencyError(CnnTrainError):
    """An optional package (onnx, onnxruntime) is needed for this and is not installed."""


def sidecar_path(model_path: str | Path) -> Path:
    """``model.onnx`` -> ``model.onnx.json``: the full name plus ``.json``, so the pair sorts together."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".json")


def default_output(weights: str | Path, fmt: str) -> Path:
    """Beside the checkpoint: ``best.pt`` -> ``best.onnx`` / ``best.torchscript.pt``."""
    weights = Path(weights)
    return weights.with_name(weights.stem + (".onnx" if fmt == "onnx" else ".torchscript.pt"))


def detect_format(path: str | Path) -> str | None:
    """``"onnx"`` (by suffix), ``"torchscript"`` (a zip holding TorchScript code) or None (a checkpoint)."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return "onnx"
    if path.name.endswith((".torchscript", ".torchscript.pt")):
        return "torchscript"
    try:
        with zipfile.ZipFile(path) as zf:
            # torch.save archives hold data.pkl; torch.jit.save archives also hold code/ and constants.pkl.
            if any("/code/" in n or n.endswith("/constants.pkl") for n in zf.namelist()):
                return "torchscript"
    except (OSError, zipfile.BadZipFile):
        pass
    return None


def import_onnxruntime(what: str) -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependencyError(f"{what} needs onnxruntime, which is not installed: {ONNX_HINT}") from None
    return onnxruntime


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


def export_checkpoint(weights: str | Path, fmt: str = "onnx", output: str | Path | None = None, *,
                      dynamic_batch: bool = False, opset: int | None = None) -> ExportResult:
    """Export a cnntrain checkpoint (arch, classes, image size, normalisation all come from it)."""
    from cnntrain import checkpoint

    output = Path(output) if output is not None else default_output(weights, fmt)
    _check_request(fmt, opset, output)  # before the (maybe large) checkpoint is read
    ckpt = checkpoint.require_full(checkpoint.load(weights), weights)
    model = checkpoint.restore_model(ckpt)
    return export_model(model, output, fmt, arch=ckpt["arch"], classes=ckpt["classes"], img_size=ckpt["img_size"],
                        mean=ckpt["mean"], std=ckpt["std"], dynamic_batch=dynamic_batch, opset=opset,
                        source={"source_checkpoint": str(weights), "epoch": ckpt.get("epoch")})


def export_model(model: nn.Module, output: str | Path, fmt: str, *, arch: str, classes: list[str], img_size: int,
                 mean: list[float], std: list[float], dynamic_batch: bool = False, opset: int | None = None,
                 source: dict[str, Any] | None = None) -> ExportResult:
    """Export ``model`` (any classifier), verify it, then publish the file and its sidecar."""
    output = Path(output)
    _check_request(fmt, opset, output)
    if fmt == "onnx":
        opset = opset or DEFAULT_OPSET
    start = time.perf_counter()
    wrapped = ExportModule(model, mean, std).eval()
    meta = _sidecar(fmt, arch=arch, classes=classes, img_size=img_size, mean=mean, std=std,
                    dynamic_batch=dynamic_batch, opset=opset if fmt == "onnx" else None, file=output.name,
                    source=source or {})
    example = torch.zeros(1, 3, img_size, img_size, dtype=torch.uint8)
    tmp = output.parent / fileio.temp_name(output)
    try:
        if fmt == "onnx":
            _write_onnx(wrapped, example, tmp, opset=meta["opset"], dynamic_batch=dynamic_batch, arch=arch,
                        img_size=img_size, metadata={k: meta[k] for k in _METADATA_KEYS if k in meta})
        else:
            _write_torchscript(wrapped, example, tmp, arch=arch, img_size=img_size)
        runner = _exported_runner(fmt, tmp, meta, "cpu")
        diff, allowed, sizes = _verify(wrapped, runner, img_size, dynamic_batch)
        if diff > allowed:
            raise ExportError(f"the {fmt} export of {arch} disagrees with the PyTorch model: max |logit difference| "
                              f"{diff:.3g} > {allowed:.3g}; nothing was written")
        meta["verification"] = {"max_abs_diff": diff, "allowed": allowed, "batch_sizes": sizes,
                                "runtime": "onnxruntime" if fmt == "onnx" else "torch.jit"}
        os.replace(tmp, output)
    except OSError as exc:
        raise ExportError(f"could not write {output}: {exc.strerror or exc}") from None
    finally:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
    fileio.fsync_dir(output.parent)
    sidecar = sidecar_path(output)
    try:
        fileio.atomic_write_text(sidecar, json.dumps(meta, indent=2) + "\n")
    except OSError as exc:
        raise ExportError(f"wrote {output} but not its sidecar {sidecar}: {exc.strerror or exc}") from None
    return ExportResult(output, sidecar, fmt, diff, allowed, sizes, time.perf_counter() - start)


def _check_request(fmt: str, opset: int | None, output: Path) -> None:
    """Everything that can be wrong with the request itself, checked before any work is done."""
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
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
        raise UsageError(f"--output {output}: " + ("an ONNX file must end in .onnx" if fmt == "onnx" else
                                                   "a TorchScript file must not end in .onnx; e.g. model.torchscript.pt"))
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
                       "(x / 255 - mean) / std; apply softmax to the logits for probabilities."),
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


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    first = (lines[0] if lines else "").split(" Please feel free to request support")[0]
    return f"{type(exc).__name__}: {first}"


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
        raise ExportError(f"ONNX export of {arch} at {img_size} px failed ({_first_line(exc)}); "
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
        raise ExportError(f"TorchScript export of {arch} at {img_size} px failed ({_first_line(exc)})") from None


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
def _verify(model: nn.Module, runner: ExportedModel, img_size: int, dynamic_batch: bool) -> tuple[float, float, list[int]]:
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
            raise ExportError(f"the exported file fails on a batch of {len(images)} ({_first_line(exc)}); "
                              "nothing was written") from None
        if got.shape != expected.shape:
            raise ExportError(f"the exported file returns shape {list(got.shape)} for a batch of {len(images)}, "
                              f"expected {list(expected.shape)}; nothing was written")
        # NaN from the export counts as infinitely far (a plain max() would skip it)
        diff = max(diff, float((got - expected).abs().nan_to_num(nan=float("inf")).max()))
        scale = max(scale, float(expected.abs().max()))
    return diff, TOLERANCE * scale, [len(x) for x in inputs]


# ------------------------------------------------------------------------------- loading


class ExportedModel:
    """An exported file plus its sidecar, called like a model: uint8 NCHW batch -> float32 logits (CPU)."""

    def __init__(self, meta: dict[str, Any], fixed_batch: int | None) -> None:
        self.meta = meta
        self.classes: list[str] = meta["classes"]
        self.img_size: int = meta["img_size"]
        self.fixed_batch = fixed_batch  # exported without --dynamic-batch: fed this many at a time

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        step = self.fixed_batch or len(images)
        logits = torch.cat([self._run(images[i:i + step]) for i in range(0, len(images), step)])
        if logits.dim() != 2 or logits.shape[1] != len(self.classes):
            raise CheckpointError(f"the model returns {list(logits.shape)} but its sidecar names "
                                  f"{len(self.classes)} classes; the sidecar belongs to another export")
        return logits

    def _run(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class OnnxModel(ExportedModel):
    def __init__(self, session: Any, meta: dict[str, Any]) -> None:
        batch = session.get_inputs()[0].shape[0]
        super().__init__(meta, batch if isinstance(batch, int) else None)
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def _run(self, images: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: images.contiguous().numpy()})[0]
        return torch.from_numpy(out).float()


class TorchScriptModel(ExportedModel):
    def __init__(self, module: torch.jit.ScriptModule, meta: dict[str, Any], device: torch.device) -> None:
        super().__init__(meta, None if meta.get("dynamic_batch") else 1)
        self.module = module
        self.device = device

    @torch.no_grad()
    def _run(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(images.to(self.device)).float().cpu()


def load_exported(path: str | Path, device: str = "auto") -> ExportedModel:
    """Load an ONNX / TorchScript export and its sidecar for ``predict``."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt is None:
        raise CheckpointError(f"{path} is not an ONNX (.onnx) or TorchScript export")
    meta = read_sidecar(path, fmt)
    return _exported_runner(fmt, path, meta, device)


def _exported_runner(fmt: str, path: Path, meta: dict[str, Any], device: str) -> ExportedModel:
    """Open an exported file with its own runtime (also used to verify a fresh export)."""
    if fmt == "onnx":
        ort = import_onnxruntime("running an ONNX model")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: its warnings are about graph optimisations
        try:
            session = ort.InferenceSession(str(path), options, providers=_onnx_providers(ort, device))
        except Exception as exc:
            raise CheckpointError(f"onnxruntime cannot load {path} ({_first_line(exc)})") from None
        model = OnnxModel(session, meta)
        out_shape = session.get_outputs()[0].shape
        if len(out_shape) == 2 and isinstance(out_shape[1], int) and out_shape[1] != len(meta["classes"]):
            raise CheckpointError(f"{path} has {out_shape[1]} outputs but its sidecar names {len(meta['classes'])} "
                                  "classes; the sidecar belongs to another export")
        return model
    from cnntrain.runtime import resolve_device

    dev = resolve_device(device)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.jit.load(str(path), map_location=dev)
    except Exception as exc:
        raise CheckpointError(f"{path} is not a loadable TorchScript file ({_first_line(exc)})") from None
    return TorchScriptModel(module.eval(), meta, dev)


def _onnx_providers(ort: Any, device: str) -> list[Any]:
    """``auto``: CUDA when onnxruntime-gpu and a GPU are there, else CPU; ``cuda[:N]`` insists."""
    available = ort.get_available_providers()
    if device == "auto":
        if "CUDAExecutionProvider" in available and torch.cuda.is_available():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]
    from cnntrain.runtime import resolve_device

    dev = resolve_device(device)
    if dev.type == "cpu":
        return ["CPUExecutionProvider"]
    if dev.type == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise UsageError(f"--device {device}: this onnxruntime has no CUDA support (pip install onnxruntime-gpu); "
                             "use --device cpu")
        return [("CUDAExecutionProvider", {"device_id": dev.index or 0}), "CPUExecutionProvider"]
    raise UsageError(f"--device {device}: ONNX models run on cpu or cuda here; use --device cpu")


def read_sidecar(path: str | Path, fmt: str | None = None) -> dict[str, Any]:
    """The sidecar of an export, checked: everything predict needs must be there and make sense."""
    path = Path(path)
    side = sidecar_path(path)
    redo = "re-export with `cnntrain export --weights CKPT`"
    if not side.is_file():
        raise CheckpointError(f"{path} has no sidecar {side.name} (class names, image size); `cnntrain export` "
                              f"writes one beside the model: keep them together, or {redo}")
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read {side}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{side} is not valid JSON (line {exc.lineno}: {exc.msg}); {redo}") from None
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        raise CheckpointError(f"{side} is not a cnntrain export sidecar (no \"format\": \"{SIDECAR_FORMAT}\"); {redo}")
    problems = []
    classes = meta.get("classes")
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        problems.append("classes must be a non-empty list of names")
    size = meta.get("img_size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        problems.append("img_size must be a positive integer")
    for key in ("mean", "std"):
        value = meta.get(key)
        if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value)):
            problems.append(f"{key} must be 3 numbers")
    if (meta.get("input") or {}).get("dtype") != "uint8":
        problems.append("input.dtype must be uint8")
    if fmt is not None and meta.get("model_format") not in (None, fmt):
        problems.append(f"it describes a {meta.get('model_format')} model, this file is {fmt}")
    if problems:
        raise CheckpointError(f"{side} is damaged: {'; '.join(problems)}; {redo}")
    return meta
