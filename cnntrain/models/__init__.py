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

# Our own architectures register themselves on import; timm's names resolve on use (`timm/<name>`).
from cnntrain.models import cbam, se_resnet, shufflenet_v1, timm_models  # noqa: F401
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
    "head_of",
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
    model, report = _build(spec, num_classes, pretrained, **kwargs)
    if spec.after_build is not None:
        spec.after_build(model)
    return model, report


def _build(spec: ModelSpec, num_classes: int, pretrained: bool, **kwargs: Any) -> tuple[nn.Module, LoadReport | None]:
    name = spec.name
    if not pretrained:
        return spec.builder(num_classes=num_classes, **{**spec.build_kwargs, **kwargs}), None
    if spec.pretrained_loader is not None:  # the library loads its own weights and sizes its head
        model, new_head = spec.pretrained_loader(num_classes)
        return model, LoadReport(weights=spec.weights_label or name, head=spec.head if new_head else None)
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

    spec = get_spec(arch)
    if spec.mean is not None and spec.std is not None:
        return list(spec.mean), list(spec.std)
    weights = spec.weights
    if weights is not None:
        preset = weights.transforms()
        return list(preset.mean), list(preset.std)
    return list(IMAGENET_MEAN), list(IMAGENET_STD)


def head_of(arch: str, model: nn.Module, num_classes: int) -> str:
    """The classifier of ``model``: the module its library names (timm's ``pretrained_cfg``), else
    the one ``find_head`` finds. Freezing, the feature cache and the backbone's learning rate use it."""
    return get_spec(arch).head or find_head(model, num_classes)


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
        "pretrained": spec.has_weights,
        "weights": spec.weights_label,
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


def model_rows(pattern: str | None = None, img_size: int = 224, log: Callable[[str], None] | None = None,
               source: str | None = None) -> list[dict[str, Any]]:
    """What `cnntrain models` lists: ``model_info`` of each architecture matching ``pattern``
    plus its parameters (millions) and GMACs at ``img_size``, counted once and cached
    (``log`` hears one line before a first, slow count).

    ``source``: only torchvision's or cnntrain's (both by default), or timm's, whose counts
    (``None`` otherwise) are only made when at most ``timm_models.COUNT_LIMIT`` names match."""
    if source == "timm":
        names = timm_models.timm_names(pattern)
    else:
        names = [n for n in list_models(pattern) if source in (None, get_spec(n).source)]
    if not names:
        where = f"{source} " if source else ""
        raise CnnTrainError(f"no {where}architecture matches {pattern!r}; run `cnntrain models"
                            f"{' --source ' + source if source else ''}` for the full list")
    counted = source != "timm" or len(names) <= timm_models.COUNT_LIMIT
    if not counted and log is not None:
        log(f"{len(names)} timm architectures match; parameters and GMACs are counted for at most "
            f"{timm_models.COUNT_LIMIT} (timm ships no counts, and each one builds the model): narrow PATTERN, "
            "e.g. 'convnext_*'")
    stats = model_stats_cached(names, img_size, log=log) if counted else {}
    rows = []
    for name in names:
        counts = stats.get(name)
        rows.append({**model_info(name), "params_m": round(counts["params_m"], 3) if counts else None,
                     "gmacs": round(counts["gmacs"], 3) if counts else None,
                     "macs_img_size": counts["img_size"] if counts else None})
    return rows
