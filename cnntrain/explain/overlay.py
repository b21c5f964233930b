"""Heatmaps over images: the pixels the model saw, coloured by where its evidence lies.

:func:`overlay` blends one map into one image (an RGB array, for any grid of pictures, e.g.
the worst errors); :func:`plot_gradcam` writes ``cnntrain explain``'s picture: the image as the
model saw it (after the eval resize and centre crop) beside the same image with its heatmap.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

CMAP = "jet"  # the colour scale Grad-CAM pictures are read in: red = strong evidence, blue = none
ALPHA = 0.45  # share of the heatmap in the blend: the image stays recognisable beneath it


def overlay(image: torch.Tensor, heatmap: torch.Tensor, alpha: float = ALPHA) -> np.ndarray:
    """``image``: uint8 ``3 x H x W`` (the pixels the model saw); ``heatmap``: ``H x W`` in [0, 1]
    (``gradcam_maps``; another size is resized to the image's). Returns ``H x W x 3`` uint8 RGB."""
    from matplotlib import colormaps

    if heatmap.shape[-2:] != image.shape[-2:]:
        heatmap = torch.nn.functional.interpolate(heatmap[None, None].float(), size=tuple(image.shape[-2:]),
                                                  mode="bilinear", align_corners=False)[0, 0]
    pixels = image.detach().cpu().permute(1, 2, 0).numpy().astype(np.float32) / 255.0
    colours = colormaps[CMAP](heatmap.detach().cpu().float().clamp(0, 1).numpy())[..., :3]
    blend = (1 - alpha) * pixels + alpha * colours
    return (blend * 255).round().clip(0, 255).astype(np.uint8)


def plot_gradcam(image: torch.Tensor, heatmap: torch.Tensor, title: str, path: str | os.PathLike[str]) -> Path:
    """The image as the model saw it and, beside it, the heatmap over it, under ``title``; a PNG."""
    from matplotlib import cm, colors

    from cnntrain.plots import new_figure, save_png

    fig = new_figure(8.4, 4.4)
    ax_image, ax_map = fig.subplots(1, 2)
    ax_image.imshow(image.detach().cpu().permute(1, 2, 0).numpy())
    ax_image.set_title("as the model saw it", fontsize=10)
    ax_map.imshow(overlay(image, heatmap))
    ax_map.set_title("Grad-CAM: where the evidence for the class lies", fontsize=10)
    for ax in (ax_image, ax_map):
        ax.set_xticks([])
        ax.set_yticks([])
    scale = cm.ScalarMappable(norm=colors.Normalize(0, 1), cmap=CMAP)
    fig.colorbar(scale, ax=ax_map, shrink=0.8, label="evidence (1 = strongest in this image)")
    fig.suptitle(title)
    return save_png(fig, path, dpi=100)
