"""Batched inference for ``cnntrain predict``.

Everything comes from the checkpoint (architecture, classes, image size, normalisation),
so a trained model is one file. Images are decoded in DataLoader workers, every image is
predicted (no dropped tail batch) and an unreadable one becomes an error row, not a crash.

``--weights`` may also be an export (``cnntrain export``: ONNX through onnxruntime, or
TorchScript) with its JSON sidecar; only the model behind :class:`Classifier` differs, the
image loading, batching and rows are the same, so both give the same predictions.
``--tta`` averages the probabilities of each image and its mirror image (:mod:`cnntrain.tta`);
the flip is of the uint8 batch, so it works alike for checkpoints and exports. Probabilities
are calibrated by the temperature training fitted (best.pt, or the export's sidecar), and
``--min-confidence`` turns an answer below it into ``unknown``.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from cnntrain import checkpoint, exported
from cnntrain.analysis.calibration import stored_temperature
from cnntrain.checkpoint import on_device
from cnntrain.data import decode_image, default_workers, eval_transform
from cnntrain.data.datasets import is_hidden, is_image_file
from cnntrain.data.decode import TEXT_LIMIT, ImageDecodeError
from cnntrain.errors import UsageError, first_line
from cnntrain.runtime import resolve_device
from cnntrain.tta import tta_probs

#: The answer to an image whose top probability is below ``--min-confidence``.
UNKNOWN = "unknown"


def expand_inputs(inputs: list[str]) -> list[tuple[str, str | None]]:
    """Files, folders (recursively) and globs -> ``(path, error)``; unmatched inputs become errors."""
    found: list[tuple[str, str | None]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(
                str(Path(dirpath) / f)
                for dirpath, dirnames, filenames in os.walk(path)
                for f in filenames
                if is_image_file(f) and not any(is_hidden(p) for p in Path(dirpath).relative_to(path).parts)
            )
            if not files:
                found.append((item, "folder contains no images"))
            found.extend((f, None) for f in files)
        elif path.is_file():
            found.append((item, None))
        else:
            matches = sorted(m for m in glob.glob(item, recursive=True) if Path(m).is_file() and is_image_file(m))
            if not matches:
                found.append((item, "no such file, folder or matching image"))
            found.extend((m, None) for m in matches)
    return found


class _Images(Dataset):
    def __init__(self, paths: list[str], img_size: int) -> None:
        self.paths = paths
        self.transform = eval_transform(img_size)
        self.img_size = img_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str | None]:
        try:
            return self.transform(decode_image(self.paths[index])), index, None
        except Exception as exc:  # any unreadable file becomes an error row, never a crash
            blank = torch.zeros(3, self.img_size, self.img_size, dtype=torch.uint8)
            reason = exc.reason if isinstance(exc, ImageDecodeError) else f"{type(exc).__name__}: {exc}"
            return blank, index, first_line(reason, TEXT_LIMIT)


def _collate(batch: list[tuple[torch.Tensor, int, str | None]]):
    images = torch.stack([b[0] for b in batch])
    return images, [b[1] for b in batch], [b[2] for b in batch]


@dataclass
class Classifier:
    """What predict needs from a model: its classes, input size and uint8 batch -> logits."""

    classes: list[str]
    img_size: int
    logits: Callable[[torch.Tensor], torch.Tensor]  # uint8 NCHW batch on the CPU -> float logits
    pin_memory: bool = False
    temperature: float = 1.0  # fitted by training (best.pt, an export's sidecar); 1: the raw softmax

    def probs(self, images: torch.Tensor, tta: bool = False, calibrated: bool = True) -> torch.Tensor:
        """Class probabilities: the softmax of the logits divided by the temperature (unless not
        ``calibrated``), with ``tta`` averaged over the image and its mirror image."""
        t = self.temperature if calibrated else 1.0
        logits = self.logits if t == 1.0 else (lambda x: self.logits(x) / t)
        return tta_probs(logits, images) if tta else logits(images).softmax(dim=1)


def _from_checkpoint(weights: str | Path, device: str) -> Classifier:
    ckpt = checkpoint.require_full(checkpoint.load(weights), weights)
    dev = resolve_device(device)
    model, batcher = on_device(ckpt, dev)

    def logits(images: torch.Tensor) -> torch.Tensor:
        images, _ = batcher(images, torch.zeros(len(images), dtype=torch.long))
        with batcher.autocast():
            return model(images).float()

    return Classifier(ckpt["classes"], ckpt["img_size"], logits, pin_memory=dev.type == "cuda",
                      temperature=stored_temperature(ckpt) or 1.0)


def load_classifier(weights: str | Path, device: str = "auto") -> Classifier:
    """A checkpoint, or an ONNX / TorchScript export (picked by the file, not by a flag)."""
    if exported.detect_format(weights) is None:
        return _from_checkpoint(weights, device)
    model = exported.load_exported(weights, device)
    return Classifier(model.classes, model.img_size, model, temperature=stored_temperature(model.meta) or 1.0)


@torch.no_grad()
def predict_files(inputs: list[str], weights: str | Path, *, topk: int = 5, batch_size: int = 32,
                  device: str = "auto", workers: int | None = None, tta: bool = False, calibrated: bool = True,
                  min_confidence: float | None = None) -> list[dict[str, Any]]:
    """Top-k predictions per image, in input order; failures carry an ``error`` instead
    (``tta``: from the probabilities averaged over each image and its mirror image).

    Probabilities use the temperature training stored (``calibrated=False``: the raw softmax).
    Each row's ``answer`` is its top class, or ``unknown`` when the top probability is below
    ``min_confidence`` (the predictions stay listed: the best guesses); None for an error row."""
    if topk < 1:
        raise UsageError("--topk must be at least 1")
    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    check_confidence(min_confidence)
    model = load_classifier(weights, device)
    classes = model.classes
    k = min(topk, len(classes))

    expanded = expand_inputs(inputs)
    rows: list[dict[str, Any]] = [{"path": p, "answer": None, "error": e, "predictions": []} for p, e in expanded]
    todo = [i for i, (_, e) in enumerate(expanded) if e is None]
    n_workers = min(default_workers() if workers is None else workers, max(len(todo) // batch_size, 0))
    loader = DataLoader(_Images([expanded[i][0] for i in todo], model.img_size), batch_size=batch_size,
                        num_workers=n_workers, collate_fn=_collate, pin_memory=model.pin_memory)
    for images, indices, errors in loader:
        probs = model.probs(images, tta=tta, calibrated=calibrated)
        top_p, top_i = probs.topk(k, dim=1)
        for j, (index, error) in enumerate(zip(indices, errors)):
            row = rows[todo[index]]
            if error:
                row["error"] = error
                continue
            row["predictions"] = [{"class": classes[c], "prob": round(float(p), 6)}
                                  for p, c in zip(top_p[j].tolist(), top_i[j].tolist())]
            sure = min_confidence is None or float(top_p[j, 0]) >= min_confidence
            row["answer"] = classes[int(top_i[j, 0])] if sure else UNKNOWN
    return rows


def check_confidence(min_confidence: float | None) -> None:
    """``--min-confidence`` is a probability: [0, 1] (0 answers every image, 1 only certain ones)."""
    if min_confidence is not None and not 0.0 <= min_confidence <= 1.0:
        raise UsageError(f"--min-confidence must be a probability between 0 and 1, not {min_confidence:g}; "
                         "`cnntrain eval` shows the accuracy of the answers kept at each value")


def format_predictions(rows: list[dict[str, Any]], fmt: str) -> str:
    """JSON (one object per image) or CSV (one row per image and rank, each with the image's
    ``answer``: its top class or ``unknown``) for scripts."""
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    from cnntrain.rows import to_csv

    lines: list[dict[str, Any]] = []
    for r in rows:
        if r["error"]:
            lines.append({"path": r["path"], "error": r["error"]})
        lines += [{"path": r["path"], "rank": rank, "class": p["class"], "prob": f"{p['prob']:.6f}",
                   "answer": r["answer"]}
                  for rank, p in enumerate(r["predictions"], start=1)]
    return to_csv(lines, columns=("path", "rank", "class", "prob", "error", "answer"))
