"""The model zoo: every architecture by name, optionally with ImageNet weights and a new head.

``get_model`` is the one way to build a network. With ``pretrained=True`` it builds at the
weights' own class count, loads them (safely, hash-checked, from torchvision's cache), then
replaces the head, because torchvision builders refuse ``num_classes != 1000`` with weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn
import torchvision

from cnntrain.errors import CnnTrainError, WeightsError

# Our own architectures register themselves on import.
from cnntrain.models import cbam, se_resnet, shufflenet_v1  # noqa: F401
from cnntrain.models.heads import find_head, freeze_backbone, replace_head
from cnntrain.models.registry import ModelSpec, get_spec, list_models
from cnntrain.models.stats import model_stats_cached

__all__ = [
    "LoadReport",
    "ModelSpec",
    "build_model",
    "find_head",
    "freeze_backbone",
    "get_model",
    "get_spec",
    "list_models",
    "model_info",
    "model_rows",
    "normalisation",
]


@dataclass
class LoadReport:
    """What happened when pretrained weights were loaded, for the user to read."""

    weights: str  # file name of the weights
    fresh: list[str] = field(default_factory=list)  # keys the file lacked (start from random init)
    unexpected: list[str] = field(default_factory=list)  # keys in the file the model does not have
    head: str | None = None  # name of the replaced head, if one was replaced

    def summary(self) -> str:
        parts = [f"loaded {self.weights}"]
        if self.fresh:
            parts.append(f"{len(self.fresh)} tensors start fresh ({_modules_of(self.fresh)})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unused tensors in the file ({_modules_of(self.unexpected)})")
        if self.head:
            parts.append(f"new head `{self.head}`")
        return "; ".join(parts)


def _modules_of(keys: list[str], limit: int = 4) -> str:
    """Compress parameter keys to their module names for a one-line report."""
    modules = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in keys))
    more = f", ... +{len(modules) - limit}" if len(modules) > limit else ""
    return ", ".join(modules[:limit]) + more


def build_model(
    name: str, num_classes: int = 1000, pretrained: bool = False, **kwargs: Any
) -> tuple[nn.Module, LoadReport | None]:
    """Build ``name``; with ``pretrained`` also load ImageNet weights and say what was loaded."""
    spec = get_spec(name)
    if not pretrained:
        return spec.builder(num_classes=num_classes, **{**spec.build_kwargs, **kwargs}), None
    if spec.weights is None:
        raise WeightsError(f"{name} has no pretrained weights; train it from scratch with --no-pretrained")

    from cnntrain import weights as weights_mod

    weights_classes = len(spec.weights.meta["categories"])
    weights_mod.ensure_cached(spec.weights, arch=name)
    if spec.partial_weights:
        model = spec.builder(num_classes=weights_classes, **{**spec.build_kwargs, **kwargs})
        state = weights_mod.load_state_dict(spec.weights)
        result = model.load_state_dict(state, strict=False)
        report = LoadReport(
            weights=weights_mod.file_name(spec.weights),
            fresh=list(result.missing_keys),
            unexpected=list(result.unexpected_keys),
        )
    else:
        # torchvision's builders know each family's loading quirks (renamed keys, input
        # transforms); let them load, from our verified file and with weights_only=True.
        with weights_mod.safe_torchvision_loading():
            model = torchvision.models.get_model(name, weights=spec.weights, **kwargs)
        if spec.after_pretrained is not None:
            spec.after_pretrained(model)
        report = LoadReport(weights=weights_mod.file_name(spec.weights))
    if num_classes != weights_classes:
        report.head = replace_head(model, weights_classes, num_classes)
    return model, report


def normalisation(arch: str) -> tuple[list[float], list[float]]:
    """Mean and std the architecture's ImageNet weights were trained with (ImageNet's own when
    it has none): a fact about the model, so training, bench and export all read it here."""
    from cnntrain.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    weights = get_spec(arch).weights
    if weights is not None:
        preset = weights.transforms()
        return list(preset.mean), list(preset.std)
    return list(IMAGENET_MEAN), list(IMAGENET_STD)


def get_model(name: str, num_classes: int = 1000, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build a registered architecture with ``num_classes`` outputs (see ``build_model``)."""
    return build_model(name, num_classes, pretrained, **kwargs)[0]


def model_info(name: str) -> dict[str, Any]:
    """Static facts about an architecture (no weights are built or downloaded)."""
    spec = get_spec(name)
    info: dict[str, Any] = {
        "name": spec.name,
        "family": spec.family,
        "source": spec.source,
        "pretrained": spec.weights is not None,
        "weights": None,
        "top1": None,
        "min_size": spec.min_size,
        "description": spec.description,
    }
    if spec.weights is not None:
        info["weights"] = spec.weights.url.rsplit("/", 1)[-1]
        if not spec.partial_weights:
            metrics = spec.weights.meta.get("_metrics", {}).get("ImageNet-1K", {})
            info["top1"] = metrics.get("acc@1")
    return info


def model_rows(pattern: str | None = None, img_size: int = 224,
               log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """What `cnntrain models` lists: ``model_info`` of each architecture matching ``pattern``
    plus its parameters (millions) and GMACs at ``img_size``, counted once and cached
    (``log`` hears one line before a first, slow count)."""
    names = list_models(pattern)
    if not names:
        raise CnnTrainError(f"no architecture matches {pattern!r}; run `cnntrain models` for the full list")
    stats = model_stats_cached(names, img_size, log=log)
    return [
        {**model_info(name), "params_m": round(stats[name]["params_m"], 3), "gmacs": round(stats[name]["gmacs"], 3),
         "macs_img_size": stats[name]["img_size"]}
        for name in names
    ]
