"""Grad-CAM heatmaps (Selvaraju et al., 2017) through captum's ``LayerGradCam``.

Grad-CAM weighs each channel of the target layer's feature map by the mean gradient of the
class score over it, sums the weighted channels and keeps the positive part: where, in the
last map before the head, the evidence *for* the class lies. captum (the optional extra
``cnntrain[explain]``) computes it; this module finds the layer (``targets.py``), upsamples the
map to the input's size and scales each map to [0, 1], so callers get one picture per image.

:func:`gradcam_maps` is the one entry point for other code (``cnntrain explain``, and a grid of
the worst validation errors with their heatmaps).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from cnntrain.errors import missing_extra
from cnntrain.explain.targets import TargetLayer, eval_mode, find_target_layer


def layer_gradcam() -> Any:
    """captum's ``LayerGradCam`` class, or a one-line error naming the extra that brings it."""
    try:
        from captum.attr import LayerGradCam
    except ImportError:
        raise missing_extra("Grad-CAM", "captum", "explain") from None
    return LayerGradCam


def gradcam_maps(model: nn.Module, images: torch.Tensor, targets: Sequence[int] | torch.Tensor | None = None, *,
                 layer: TargetLayer | None = None) -> torch.Tensor:
    """One Grad-CAM heatmap per image: ``Tensor[N, H, W]`` in [0, 1] (1 = the strongest evidence
    in that image), on the images' device, float32.

    ``images``: the model's input, ``N x 3 x H x W`` float as the ``Batcher`` makes it
    (normalised, on the model's device). ``targets``: the class index to explain for each image
    (the true class, or the predicted one); None explains each image's predicted class.
    ``layer``: the layer to read (``find_target_layer``); found from ``images``' size when None.
    The model is in eval mode for the pass and left as it was; its weights' gradients are untouched.
    An image with no positive evidence for its class gets an all-zero map.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be N x C x H x W, got shape {tuple(images.shape)}")
    height, width = images.shape[-2:]
    if layer is None:
        layer = find_target_layer(model, (height, width))
    gradcam = layer_gradcam()(model, layer.module)
    with eval_mode(model):
        if targets is None:
            with torch.no_grad():
                targets = model(images).argmax(dim=1)
        target = torch.as_tensor(targets, device=images.device, dtype=torch.long)
        # captum takes torch.autograd.grad of the scores w.r.t. the layer's output: the weights'
        # .grad stay as they were; the input asks for a gradient so that a graph exists even when
        # every weight is frozen.
        maps = gradcam.attribute(images.detach().requires_grad_(True), target=target, relu_attributions=True)
    maps = F.interpolate(maps.detach().float(), size=(height, width), mode="bilinear", align_corners=False)
    maps = maps[:, 0].clamp_min(0)
    peak = maps.flatten(1).amax(dim=1).view(-1, 1, 1)
    return torch.where(peak > 0, maps / peak.clamp_min(torch.finfo(maps.dtype).tiny), torch.zeros_like(maps))
