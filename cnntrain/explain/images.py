"""``cnntrain explain``'s library half: Grad-CAM pictures for image files, from a checkpoint.

The images are read exactly as ``predict`` reads them (the same inputs: files, folders, globs;
the same decode and eval transform; the same Batcher; the same stored temperature), so the class
and probability in each picture's title are the ones ``cnntrain predict`` prints for that image. An unreadable image
becomes an error row, never a crash, and the others are still explained.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from cnntrain import checkpoint
from cnntrain.errors import UsageError, first_line

BATCH = 8  # images per Grad-CAM pass: the backward pass keeps every activation of the batch


@dataclass
class Explained:
    """One image's result: the class explained and its probability, what the model predicted,
    and where the picture went (or why there is none)."""

    path: str
    output: str | None = None
    explained: str | None = None  # the class the heatmap is for (--class, else the prediction)
    prob: float | None = None  # that class's probability
    predicted: str | None = None
    predicted_prob: float | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def said(self) -> str:
        """``rose 0.934 (predicted)``, or with --class ``tulip 0.031 (predicted: rose 0.934)``."""
        if self.explained == self.predicted:
            return f"{self.explained} {self.prob:.3f} (predicted)"
        return f"{self.explained} {self.prob:.3f} (predicted: {self.predicted} {self.predicted_prob:.3f})"

    def line(self) -> str:
        """One line for the terminal: the image, the class and probability, where the picture is."""
        if self.error:
            return f"{self.path}: error: {self.error}"
        return f"{self.path}: {self.said()} -> {self.output}"


def class_index(name: str, classes: list[str]) -> int:
    """The index of ``--class name`` among the checkpoint's classes; a usage error listing them."""
    if name in classes:
        return classes.index(name)
    close = difflib.get_close_matches(name, classes, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    shown = ", ".join(classes[:10]) + (f", ... ({len(classes)} in all)" if len(classes) > 10 else "")
    raise UsageError(f"--class {name!r} is not a class of this model{hint} Its classes: {shown}")


def explain_files(inputs: list[str], weights: str | Path, *, class_name: str | None = None,
                  output: str | Path = "explain", device: str = "auto",
                  log: Callable[[str], None] = lambda s: None) -> list[Explained]:
    """A Grad-CAM picture ``OUTPUT/<image stem>_gradcam.png`` per image, for ``class_name`` or
    the predicted class; rows in input order (unreadable images: an ``error`` instead)."""
    from cnntrain.analysis.calibration import stored_temperature
    from cnntrain.explain.gradcam import layer_gradcam
    from cnntrain.explain.targets import find_target_layer
    from cnntrain.predict import expand_inputs
    from cnntrain.runtime import resolve_device

    layer_gradcam()  # a missing extra fails before the checkpoint is read
    ckpt = checkpoint.require_full(checkpoint.load(weights), weights)
    classes: list[str] = ckpt["classes"]
    target = class_index(class_name, classes) if class_name is not None else None
    model, batcher = checkpoint.on_device(ckpt, resolve_device(device))
    temperature = stored_temperature(ckpt) or 1.0  # calibrated, as predict's probabilities are
    layer = find_target_layer(model, ckpt["img_size"], arch=ckpt["arch"])
    log(f"Grad-CAM on {ckpt['arch']}'s {layer.name}: {' x '.join(map(str, layer.shape))} at {ckpt['img_size']} px")
    rows = [Explained(path, error=error) for path, error in expand_inputs(inputs)]
    readable = [(row, image) for row in rows if row.error is None
                for image in [_read(row, ckpt["img_size"])] if image is not None]
    names = _output_names([row.path for row, _ in readable])
    for start in range(0, len(readable), BATCH):
        chunk = readable[start:start + BATCH]
        pixels = torch.stack([image for _, image in chunk])
        heatmaps, probs = _maps(model, batcher, pixels, target, layer, temperature)
        for j, (row, image) in enumerate(chunk):
            _describe(row, probs[j], classes, target)
            title = f"{Path(row.path).name}: {row.said()}"
            row.output = str(_picture(image, heatmaps[j], title, Path(output) / names[row.path]))
    return rows


def _read(row: Explained, img_size: int) -> torch.Tensor | None:
    """The uint8 image as predict would feed it, or None with ``row.error`` saying why."""
    from cnntrain.data import decode_image, eval_transform
    from cnntrain.data.decode import TEXT_LIMIT, ImageDecodeError

    try:
        return eval_transform(img_size)(decode_image(row.path))
    except Exception as exc:  # any unreadable file becomes an error row, as in predict
        reason = exc.reason if isinstance(exc, ImageDecodeError) else f"{type(exc).__name__}: {exc}"
        row.error = first_line(reason, TEXT_LIMIT)
        return None


def _maps(model: torch.nn.Module, batcher: Any, pixels: torch.Tensor, target: int | None, layer: Any,
          temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Heatmaps (on the CPU) and probabilities for one batch of uint8 images. The temperature
    changes the probabilities only: dividing the logits by it scales Grad-CAM's map, which is
    then scaled to [0, 1] anyway."""
    from cnntrain.explain.gradcam import gradcam_maps

    inputs, _ = batcher(pixels, torch.zeros(len(pixels), dtype=torch.long))
    with torch.no_grad(), batcher.autocast():  # the probabilities predict shows
        probs = (model(inputs).float() / temperature).softmax(dim=1)
    targets = probs.argmax(dim=1) if target is None else torch.full((len(pixels),), target, device=probs.device)
    return gradcam_maps(model, inputs.float(), targets, layer=layer).cpu(), probs.cpu()


def _describe(row: Explained, probs: torch.Tensor, classes: list[str], target: int | None) -> None:
    top = int(probs.argmax())
    explained = top if target is None else target
    row.predicted, row.predicted_prob = classes[top], round(float(probs[top]), 6)
    row.explained, row.prob = classes[explained], round(float(probs[explained]), 6)


def _picture(image: torch.Tensor, heatmap: torch.Tensor, title: str, path: Path) -> Path:
    from cnntrain.explain.overlay import plot_gradcam

    with checkpoint.write_errors_reported(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        return plot_gradcam(image, heatmap, title, path)


def _output_names(paths: list[str]) -> dict[str, str]:
    """``<stem>_gradcam.png`` per image; a stem met again (``a/cat.jpg``, ``b/cat.jpg``) gets ``_2``, ``_3``..."""
    names: dict[str, str] = {}
    taken: set[str] = set()
    for path in paths:
        stem, n = Path(path).stem, 1
        name = f"{stem}_gradcam.png"
        while name in taken:
            n += 1
            name = f"{stem}_{n}_gradcam.png"
        taken.add(name)
        names[path] = name
    return names
