"""The ``shapes`` dataset: procedurally drawn, offline, deterministic, learnable in a minute.

Five classes (circle, square, triangle, star, cross), 64x64 RGB PNGs. Every image varies the
shape's colour (any hue, always bright), size, position and tilt, and the background's (dark)
colour, gradient and noise, so a model has to learn the outline, not a colour or a position.
Each image is drawn from its own seed ``(seed, split, class, index)``, so the files are
byte-identical on every run. 1,000 images take about 2 s to draw.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cnntrain.data.dataset_download import publish_dir

SHAPE_CLASSES = ("circle", "square", "triangle", "star", "cross")
SHAPES_VERSION = "shapes-v1"
# Written into the dataset folder; a cached copy whose marker differs is drawn again.
_DESIGN = "shapes-v1 design 2 (bright shapes on dark backgrounds)"
_MARKER = "SHAPES.txt"
_SUPERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliased edges
# Upright pose of each polygon (radians); each image tilts it by up to +-MAX_TILT degrees.
_UPRIGHT = {"square": math.pi / 4, "triangle": -math.pi / 2, "star": -math.pi / 2, "cross": 0.0}
MAX_TILT = 15.0
SIZE_RANGE = (0.36, 0.48)  # circumradius as a fraction of the side: big, so random crops keep the shape
MAX_NOISE = 10.0  # per-image Gaussian noise sigma is drawn from [0, MAX_NOISE]
GRADIENT_P = 0.5  # share of backgrounds that are a two-colour gradient (the rest nearly flat)
BG_MAX = 110  # background channels lie in [0, BG_MAX]; shapes are bright (max channel >= 190)


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float, rng) -> list[tuple[float, float]]:
    if kind == "square":
        radii, n = [r], 4
    elif kind == "triangle":
        radii, n = [r], 3
    elif kind == "star":
        radii, n = [r, r * rng.uniform(0.38, 0.5)], 10
    else:  # cross: a plus sign as a 12-gon, arm half-width w
        w = r * rng.uniform(0.26, 0.36)
        pts = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r),
               (-w, -r), (-w, -w), (-r, -w), (-r, w), (-w, w), (-w, r)]
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
    return [
        (cx + radii[i % len(radii)] * math.cos(angle + 2 * math.pi * i / n),
         cy + radii[i % len(radii)] * math.sin(angle + 2 * math.pi * i / n))
        for i in range(n)
    ]


def _background(rng, size: int) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """A two-colour linear gradient in a random direction, and its two end colours."""
    c0, c1 = rng.uniform(0, BG_MAX, 3), rng.uniform(0, BG_MAX, 3)
    if rng.random() >= GRADIENT_P:  # the others are nearly flat
        c1 = np.clip(c0 + rng.normal(0, 20, 3), 0, BG_MAX)
    theta = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:size, 0:size] / (size - 1)
    t = (math.cos(theta) * (xs - 0.5) + math.sin(theta) * (ys - 0.5)) / math.sqrt(0.5) + 0.5
    t = np.clip(t, 0, 1)[..., None]
    return c0 * (1 - t) + c1 * t, (c0, c1)


def _foreground(rng, ends: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """A bright colour of any hue, well away from both ends of the background.

    Random hue but a consistent polarity (bright on dark) is what makes this learnable in a
    minute: with fully random foreground and background colours a small CNN stayed near chance
    for its first ~200 steps, with bright-on-dark it passes 80% in the same budget.
    """
    colour = np.full(3, 255.0)
    for _ in range(100):
        colour = rng.uniform(0, 255, 3)
        colour = colour / max(colour.max(), 1.0) * rng.uniform(190, 255)
        if min(np.linalg.norm(colour - c) for c in ends) > 100:
            break
    return colour


def draw_shape(kind: str, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One ``size`` x ``size`` RGB image of ``kind``, drawn from ``rng``."""
    big = size * _SUPERSAMPLE
    r = rng.uniform(*SIZE_RANGE) * big
    margin = r * (0.85 if kind == "circle" else 1.0)
    cx, cy = rng.uniform(margin, big - margin, 2)
    angle = _UPRIGHT.get(kind, 0.0) + math.radians(rng.uniform(-MAX_TILT, MAX_TILT))
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    if kind == "circle":
        rc = r * 0.85  # a circle fills more than a polygon of the same circumradius
        draw.ellipse([cx - rc, cy - rc, cx + rc, cy + rc], fill=255)
    else:
        draw.polygon(_polygon(kind, cx, cy, r, angle, rng), fill=255)
    alpha = np.asarray(mask.resize((size, size), Image.Resampling.BOX), dtype=np.float64)[..., None] / 255
    background, ends = _background(rng, size)
    colour = _foreground(rng, ends)
    image = background * (1 - alpha) + colour * alpha
    image += rng.normal(0, rng.uniform(0, MAX_NOISE), image.shape)
    return Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8), mode="RGB")


def generate_shapes(
    dest: str | Path,
    *,
    train_per_class: int = 160,
    val_per_class: int = 40,
    size: int = 64,
    seed: int = 0,
) -> Path:
    """Write ``dest/{train,val}/<class>/NNNN.png`` unless it is already there; return ``dest``.

    Drawn into a hidden temporary sibling and renamed into place, so an interrupted run leaves
    no half dataset (and two processes racing both end up with one complete copy). A marker
    file records the design and arguments; a cached copy from another design is replaced.
    """
    dest = Path(dest)
    marker = (f"{_DESIGN}\nradius={SIZE_RANGE} tilt={MAX_TILT} noise={MAX_NOISE} "
              f"gradient={GRADIENT_P} bg_max={BG_MAX}\n"
              f"seed={seed} train={train_per_class} val={val_per_class} size={size}\n")
    if _marker_matches(dest, marker):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        for split_id, (split, count) in enumerate((("train", train_per_class), ("val", val_per_class))):
            for class_id, kind in enumerate(SHAPE_CLASSES):
                folder = tmp / split / kind
                folder.mkdir(parents=True)
                for i in range(count):
                    rng = np.random.default_rng([seed, split_id, class_id, i])
                    draw_shape(kind, rng, size).save(folder / f"{i:04d}.png", optimize=False)
        (tmp / _MARKER).write_text(marker)
        if not dest.exists():
            return publish_dir(tmp, dest)
        if _marker_matches(dest, marker):  # another run drew the same while this one did: keep theirs,
            return dest  # rather than swap it out from under a run that may be reading it
        # A stale copy (older design or other arguments): move it aside, swap the new one in.
        stale = Path(tempfile.mkdtemp(prefix=f".{dest.name}.stale-", dir=dest.parent))
        try:
            os.replace(dest, stale / dest.name)
            return publish_dir(tmp, dest)
        finally:
            shutil.rmtree(stale, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _marker_matches(dest: Path, marker: str) -> bool:
    try:
        return (dest / _MARKER).read_text() == marker
    except OSError:
        return False
