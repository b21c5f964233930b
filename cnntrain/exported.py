"""Loading an export back (``cnntrain predict --weights model.onnx``): the file, its sidecar, its runtime.

:mod:`cnntrain.export` writes an ONNX or TorchScript file and a JSON sidecar beside it; this
module opens such a pair and calls it like a model: uint8 NCHW batch in, float32 logits out,
with ONNX run by onnxruntime and TorchScript by ``torch.jit.load``. The sidecar is checked first
(class names, image size, normalisation, input dtype), so a damaged or mismatched one is one
clear error instead of wrong predictions. Kept apart from the writer so predict loads neither
the exporters nor the onnx package, and so the writer can verify a fresh file with exactly the
code that will later run it (:func:`open_exported`).

A TorchScript file is a program: ``torch.jit.load`` runs the code it carries, unlike a checkpoint,
which is read with ``weights_only=True``. So predict loads one only if it is the very file its
sidecar was written for (the SHA-256 recorded at export, checked before loading). That catches a
file swapped or re-saved beside an old sidecar; it cannot vouch for a file whose maker also wrote
the sidecar: run TorchScript only from a source you trust. ONNX runs in onnxruntime, which
executes no Python, so an ONNX file is not held to its hash (a quantized or optimised copy beside
the original sidecar is common); its output count is still checked against the sidecar.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from cnntrain.errors import CheckpointError, MissingDependencyError, UsageError, first_line
from cnntrain.fileio import sha256_file

SIDECAR_FORMAT = "cnntrain-export"
ONNX_HINT = "pip install 'cnntrain[onnx]'"


def sidecar_path(model_path: str | Path) -> Path:
    """``model.onnx`` -> ``model.onnx.json``: the full name plus ``.json``, so the pair sorts together."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".json")


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
    """The onnxruntime module, or a one-line error saying how to install it (it is optional)."""
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependencyError(f"{what} needs onnxruntime, which is not installed: {ONNX_HINT}") from None
    return onnxruntime


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
    if fmt == "torchscript":
        check_digest(path, meta)  # before torch.jit.load runs anything in it
    return open_exported(fmt, path, meta, device)


def check_digest(path: Path, meta: dict[str, Any]) -> None:
    """Refuse a file that is not the one its sidecar describes (see the module docstring);
    a sidecar written before cnntrain recorded the hash has none, and is taken as it is."""
    expected = meta.get("sha256")
    if expected is None:
        return
    actual = sha256_file(path)
    if actual != expected:
        raise CheckpointError(
            f"{path} is not the file its sidecar {sidecar_path(path).name} was written for (SHA-256 {actual[:12]}..., "
            f"the sidecar says {expected[:12]}...); a TorchScript file runs code when loaded, so it is not loaded: "
            "re-export it with `cnntrain export --weights CKPT --format torchscript`")


def open_exported(fmt: str, path: Path, meta: dict[str, Any], device: str) -> ExportedModel:
    """Open an exported file with its own runtime, as ``meta`` (its sidecar) describes it.

    ``load_exported`` calls it for predict, and :func:`cnntrain.export.export_model` to verify
    a fresh export before publishing it, so what was verified is what will run.
    """
    if fmt == "onnx":
        ort = import_onnxruntime("running an ONNX model")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: its warnings are about graph optimisations
        try:
            session = ort.InferenceSession(str(path), options, providers=_onnx_providers(ort, device))
        except Exception as exc:
            raise CheckpointError(f"onnxruntime cannot load {path} ({first_line(exc, with_type=True)})") from None
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
        reason = first_line(exc, with_type=True)
        raise CheckpointError(f"{path} is not a loadable TorchScript file ({reason})") from None
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
    digest = meta.get("sha256")
    if digest is not None and not (isinstance(digest, str) and len(digest) == 64
                                   and all(c in "0123456789abcdef" for c in digest)):
        problems.append("sha256 must be 64 hex digits")
    if fmt is not None and meta.get("model_format") not in (None, fmt):
        problems.append(f"it describes a {meta.get('model_format')} model, this file is {fmt}")
    if problems:
        raise CheckpointError(f"{side} is damaged: {'; '.join(problems)}; {redo}")
    return meta
