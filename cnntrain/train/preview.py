"""``train_batch.jpg``: the run's first training batch as the model sees it, labelled.

Crops that cut the object away, flips that make another class, labels in the wrong folder:
one look at the augmented batch shows them before an epoch is spent (ultralytics writes
``train_batch*.jpg`` for the same reason). The picture is the batch itself, not a re-creation:

- the sampler is a pure function of (seed, epoch), so a copy of it gives the epoch's first
  batch without advancing the real one;
- each sample's augmentation runs under its own seed (``SeededDataset``), so reading the
  items again gives the same crops and flips;
- the Batcher (device, normalisation, ``--gpu-decode``) and the batch transform (mixup,
  cutmix) run under ``torch.random.fork_rng``, so the draws they make are the ones the first
  step makes, and the training's random stream is left where it was.

The model's float input is then denormalised back to pixels for display. Written once, by
rank 0, when a run starts (a resumed run keeps its own); skipped when the first epochs train
on cached features, which are not images.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from cnntrain import checkpoint, fileio
from cnntrain.engine import BatchTransform, unpack
from cnntrain.train.phase import Phases
from cnntrain.train.pipeline import InputPipeline

PREVIEW_NAME = "train_batch.jpg"
MAX_IMAGES = 64  # a larger batch shows its first 64 (an 8 x 8 grid)
TILE_MIN, TILE_MAX = 96, 160  # tiles are the model's input resized into this range, px
LABEL_HEIGHT, HEADER_HEIGHT, PAD = 14, 18, 2


@dataclass(frozen=True)
class BatchPreview:
    path: Path
    images: int  # how many images the grid shows
    batch_size: int  # of the batch they came from
    labels: list[str]  # under each image, in batch order


def write_train_batch(run_dir: Path, phases: Phases, epoch: int, classes: Sequence[str], mean: Sequence[float],
                      std: Sequence[float], batch_transform: BatchTransform | None, *,
                      resumed: bool = False) -> BatchPreview | None:
    """``run_dir/train_batch.jpg`` from the first batch of 0-based ``epoch``; None when skipped
    (cached features, a resumed run that has one, a first batch with no readable image)."""
    path = run_dir / PREVIEW_NAME
    if phases.features is not None or (resumed and path.exists()):
        return None
    batch = first_batch(phases.pipeline, epoch, batch_transform)
    if batch is None:
        return None
    images, targets = batch
    pixels = denormalise(images[:MAX_IMAGES], mean, std)
    labels = [_label(t, classes) for t in targets[:MAX_IMAGES].cpu()]
    shown = f"{len(pixels)} of {len(images)}" if len(pixels) < len(images) else f"{len(images)}"
    grid = draw_grid(pixels, labels, f"epoch {epoch + 1}, first batch: {shown} images, {images.shape[-1]} px")
    with checkpoint.write_errors_reported(path), fileio.atomic_open(path, "wb") as fh:
        grid.save(fh, format="JPEG", quality=90)
    return BatchPreview(path, len(pixels), len(images), labels)


def first_batch(pipeline: InputPipeline, epoch: int,
                batch_transform: BatchTransform | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The model's input and targets of ``epoch``'s first training step, made without moving the
    training's sampler or random generators; None when the batch holds no readable image."""
    loader = pipeline.train
    sampler = copy.copy(pipeline.sampler)
    sampler.set_epoch(epoch)
    items = list(itertools.islice(iter(sampler), loader.batch_size))
    images, targets, _ = unpack(loader.collate_fn([loader.dataset[item] for item in items]))
    if targets.numel() == 0:
        return None
    device = pipeline.batcher.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        images, targets = pipeline.batcher(images, targets)
        if batch_transform is not None:
            images, targets = batch_transform(images, targets)
    return images, targets


def denormalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The normalised float input back to uint8 pixels (N x 3 x H x W, on the CPU)."""
    images = images.detach().float().cpu()
    mean_t, std_t = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    return ((images * std_t + mean_t).clamp(0, 1) * 255).round().to(torch.uint8).contiguous()


def _label(target: torch.Tensor, classes: Sequence[str]) -> str:
    """The class name; for a mixed (soft) target, the dominant class and its share."""
    if target.dim() == 0:
        return classes[int(target)]
    share, index = target.max(dim=0)
    return classes[int(index)] if share >= 0.999 else f"{classes[int(index)]} {float(share):.0%}"


def draw_grid(pixels: torch.Tensor, labels: Sequence[str], header: str):
    """Tiles in a near-square grid, each with its label beneath, under a one-line header (a PIL image)."""
    from PIL import Image, ImageDraw
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    side = pixels.shape[-1]
    tile = min(max(side, TILE_MIN), TILE_MAX)
    if tile != side:  # small inputs are enlarged pixel for pixel, large ones reduced smoothly
        mode = InterpolationMode.NEAREST if tile > side else InterpolationMode.BILINEAR
        pixels = TF.resize(pixels, [tile, tile], interpolation=mode, antialias=True)
    cols = math.ceil(math.sqrt(len(pixels)))
    rows = math.ceil(len(pixels) / cols)
    width, cell_h = PAD + cols * (tile + PAD), tile + LABEL_HEIGHT + PAD
    canvas = Image.new("RGB", (width, HEADER_HEIGHT + PAD + rows * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font()
    draw.text((PAD, 3), _fit(draw, header, width - 2 * PAD, font), fill="black", font=font)
    for i, (image, label) in enumerate(zip(pixels, labels)):
        x, y = PAD + (i % cols) * (tile + PAD), HEADER_HEIGHT + PAD + (i // cols) * cell_h
        canvas.paste(Image.fromarray(image.permute(1, 2, 0).numpy()), (x, y))
        draw.text((x + 1, y + tile + 1), _fit(draw, label, tile - 2, font), fill="black", font=font)
    return canvas


def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=11)  # Pillow's scalable default font (FreeType)
    except (TypeError, OSError):  # an older Pillow, or one built without FreeType: the bitmap font
        return ImageFont.load_default()


def _fit(draw, text: str, width: int, font) -> str:
    """``text`` shortened with an ellipsis until it is at most ``width`` pixels wide."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"
