"""Heatmaps for pictures of many images: ``eval --explain`` lays them over the top-loss grid.

The worst errors are where a user asks "what was it looking at?": the heatmap of the class the
model predicted shows whether it saw the object, the background, or a watermark.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

from cnntrain.explain.gradcam import gradcam_maps, layer_gradcam
from cnntrain.explain.targets import find_target_layer

Heatmaps = Callable[[Sequence[str], Sequence[int]], list[torch.Tensor | None]]
BATCH = 16


def heatmaps_of(model: nn.Module, batcher: Any, img_size: int, arch: str | None = None) -> Heatmaps:
    """``(paths, class indices) -> one heatmap per image`` (``H x W`` in [0, 1] on the CPU; None for
    an image that cannot be read now), reading each image as evaluation does.

    The target layer is found once, here, and a missing ``cnntrain[explain]`` fails here too:
    before the pass over the data rather than after it."""
    layer_gradcam()
    layer = find_target_layer(model, img_size, arch=arch)

    def heatmaps(paths: Sequence[str], targets: Sequence[int]) -> list[torch.Tensor | None]:
        from cnntrain.analysis.pictures import shown_image

        images = [shown_image(path, img_size) for path in paths]
        readable = [i for i, image in enumerate(images) if image is not None]
        out: list[torch.Tensor | None] = [None] * len(paths)
        for start in range(0, len(readable), BATCH):
            chunk = readable[start:start + BATCH]
            pixels = torch.stack([images[i] for i in chunk])  # type: ignore[misc]
            inputs, _ = batcher(pixels, torch.zeros(len(chunk), dtype=torch.long))
            maps = gradcam_maps(model, inputs.float(), torch.as_tensor([targets[i] for i in chunk]), layer=layer)
            for i, heatmap in zip(chunk, maps.cpu()):
                out[i] = heatmap
        return out

    return heatmaps
