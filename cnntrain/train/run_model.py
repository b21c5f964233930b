"""The run's model: built by name, its starting weights, its head, its place on the device.

Starting weights come from one of three places, in this order of precedence: a resumed
last.pt, ``--weights FILE`` (only the head may differ), or the architecture's ImageNet weights
(the default where they exist). Normalisation is a fact about the architecture's weights
(``cnntrain.models.normalisation``) and travels with the model into every checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from cnntrain import checkpoint
from cnntrain.models import build_model, get_spec, head_of, normalisation
from cnntrain.train.distributed import DistContext

Log = Callable[[str], None]


@dataclass
class RunModel:
    model: nn.Module  # the bare network: checkpoints are written from it, evaluation runs it
    head: str  # qualified name of the classifier layer
    mean: list[float]
    std: list[float]


def build_run_model(arch: str, num_classes: int, *, pretrained: bool | None, weights: str | None,
                    resumed: dict[str, Any] | None, freeze_layers: bool = False, ctx: DistContext = DistContext(),
                    log: Log = lambda s: None, warn: Log = lambda s: None) -> RunModel:
    """``arch`` with ``num_classes`` outputs and its starting weights (see the module docstring).

    ``pretrained=None`` means ImageNet weights where they exist, unless other weights are given.
    ``warn`` (shown even with --quiet) hears of a ``freeze_layers`` run whose backbone starts random."""
    spec = get_spec(arch)
    if pretrained is None:
        pretrained = spec.has_weights and weights is None and resumed is None
        if not spec.has_weights and weights is None:
            log(f"{arch} has no ImageNet weights: training from scratch")
    if freeze_layers and not pretrained and not weights and resumed is None:
        how = "--pretrained or --weights FILE" if spec.has_weights else "--weights FILE"
        warn(f"warning: --freeze-layers without pretrained weights: a frozen, randomly initialised backbone cannot "
             f"learn useful features; start from trained weights ({how}) or drop --freeze-layers")
    with ctx.main_first():  # rank 0 downloads; the others then read its cache
        model, load_report = build_model(arch, num_classes, pretrained=pretrained)
    if load_report is not None:
        log(load_report.summary())
    head = head_of(arch, model, num_classes)
    if weights and resumed is None:
        start = checkpoint.load(weights)
        log(checkpoint.load_weights_into(model, start["model"], head, weights).summary(weights))
    if resumed is not None:
        model.load_state_dict(resumed["model"])
    mean, std = normalisation(arch)
    return RunModel(model, head, mean, std)


def place(model: nn.Module, device: torch.device, *, channels_last: bool, sync_bn: bool) -> nn.Module:
    """Move the model to ``device`` (NHWC where that is faster); SyncBatchNorm when asked."""
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def wrapper(ctx: DistContext, device: torch.device, compile: bool) -> Callable[[nn.Module], nn.Module]:
    """What wraps a module that trains: DDP when distributed, then torch.compile when asked.

    Called again after unfreezing: DDP only syncs parameters that required grad when wrapped."""

    def wrap(module: nn.Module) -> nn.Module:
        if ctx.enabled:
            module = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
        return torch.compile(module) if compile else module  # type: ignore[return-value]

    return wrap
