"""Name -> builder registry: torchvision's classifiers and our own, behind one lookup.

Builders only construct an architecture (random init, any ``num_classes``); loading
pretrained weights and swapping the head is done once, generically, in
``cnntrain.models.get_model``, so a new architecture is one module plus one decorator.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn
import torchvision
from torchvision.models import WeightsEnum

from cnntrain.errors import UsageError

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelSpec:
    """Everything the rest of cnntrain needs to know about an architecture."""

    name: str
    builder: Builder
    family: str
    source: str  # "torchvision" or "cnntrain"
    # ImageNet weights that initialise this architecture (for our own models: those of
    # the plain torchvision network they extend, loaded non-strictly).
    weights: WeightsEnum | None = None
    # Our extensions of torchvision networks load those weights partially; the keys the
    # file lacks (SE / attention layers) start fresh and are reported.
    partial_weights: bool = False
    # Keyword arguments for builds from scratch (e.g. no auxiliary heads), and a fix-up
    # applied after torchvision's builder loaded weights (which refuses those kwargs).
    build_kwargs: dict[str, Any] = field(default_factory=dict)
    after_pretrained: Callable[[nn.Module], None] | None = None
    # Applied to every model build_model returns, from scratch or pretrained (same modules and state):
    # e.g. ShuffleNet V2's layout-keeping channel shuffle.
    after_build: Callable[[nn.Module], Any] | None = None
    # Smallest square input the architecture accepts, for quick tests and MAC counts.
    min_size: int = 32
    description: str = ""
    # Where another library loads its own weights (timm, from the Hugging Face cache) instead of a
    # torchvision entry: builds the network with them and a head of ``num_classes`` outputs, and says
    # whether that head is new. ``weights_label`` names those weights in messages.
    pretrained_loader: Callable[[int], tuple[nn.Module, bool]] | None = None
    weights_label: str | None = None
    # Normalisation those weights were trained with (a torchvision entry carries its own).
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    # The classifier's module name where the library states it; else ``heads.find_head`` finds it.
    head: str | None = None

    @property
    def has_weights(self) -> bool:
        """Whether trained weights exist to start from, wherever they are loaded from."""
        return self.weights is not None or self.pretrained_loader is not None


_REGISTRY: dict[str, ModelSpec] = {}
# Other libraries' zoos by name prefix (``timm/``), resolved on demand: they are large and slow to
# import, so nothing of them is loaded until one of their names is used.
_SOURCES: dict[str, Callable[[str], ModelSpec]] = {}


def register_source(prefix: str, resolve: Callable[[str], ModelSpec]) -> None:
    """Names starting with ``prefix`` (lowercase, e.g. ``timm/``) are looked up by ``resolve``."""
    if prefix in _SOURCES:
        raise ValueError(f"model source {prefix!r} is already registered")
    _SOURCES[prefix] = resolve


def register_model(
    name: str,
    *,
    family: str,
    weights: WeightsEnum | None = None,
    min_size: int = 32,
    description: str = "",
) -> Callable[[Builder], Builder]:
    """Decorator for cnntrain's own builders; ``weights`` are the torchvision weights to start from."""

    def wrap(builder: Builder) -> Builder:
        _add(
            ModelSpec(
                name=name,
                builder=builder,
                family=family,
                source="cnntrain",
                weights=weights,
                partial_weights=weights is not None,
                min_size=min_size,
                description=description or (builder.__doc__ or "").strip().split("\n")[0],
            )
        )
        return builder

    return wrap


def _add(spec: ModelSpec) -> None:
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec


# Families are read off the builder's module (torchvision.models.resnet -> resnet), except
# where the name says more than the module (resnext and wide_resnet live in resnet.py).
_FAMILY_PREFIXES = ("resnext", "wide_resnet", "efficientnet_v2", "swin_v2", "mobilenet_v3", "mobilenet_v2")



def _drop_aux_heads(model: nn.Module) -> None:
    """Auxiliary classifiers only complicate fine-tuning: train and predict the main head."""
    model.aux_logits = False  # type: ignore[assignment]  # a plain flag, which nn.Module's stubs do not know
    for attr in ("AuxLogits", "aux1", "aux2"):
        if hasattr(model, attr):
            setattr(model, attr, None)


# torchvision quirks expressed as data: auxiliary classifiers are dropped, and the vision
# transformers / MaxViT need larger inputs than convnets.
_NO_AUX = {"aux_logits": False, "init_weights": True}
_TORCHVISION_KWARGS = {"googlenet": _NO_AUX, "inception_v3": _NO_AUX}
# ViTs take exactly their image_size (a fixed patch grid); Swin pads its windows, so any size from 32 works.
_TORCHVISION_MIN_SIZE = {"inception_v3": 75, "googlenet": 32, "alexnet": 63, "maxvit_t": 224, "squeezenet1_0": 33}


def _family_of(name: str, builder: Builder) -> str:
    for prefix in _FAMILY_PREFIXES:
        if name.startswith(prefix):
            return prefix
    return builder.__module__.rsplit(".", 1)[-1]


def _torchvision_builder(name: str) -> Builder:
    def build(**kwargs: Any) -> nn.Module:
        return torchvision.models.get_model(name, weights=None, **kwargs)

    build.__name__ = name
    return build


def _register_torchvision() -> None:
    from cnntrain.models.shuffle import keep_memory_format  # channels_last kept through the shuffles

    for name in torchvision.models.list_models(module=torchvision.models):
        tv_builder = torchvision.models.get_model_builder(name)
        weights = torchvision.models.get_model_weights(name)
        min_size = _TORCHVISION_MIN_SIZE.get(name, 224 if name.startswith("vit_") else 32)
        _add(
            ModelSpec(
                name=name,
                builder=_torchvision_builder(name),
                family=_family_of(name, tv_builder),
                source="torchvision",
                weights=weights.DEFAULT if len(weights) else None,
                build_kwargs=_TORCHVISION_KWARGS.get(name, {}),
                after_pretrained=_drop_aux_heads if name in _TORCHVISION_KWARGS else None,
                after_build=keep_memory_format if name.startswith("shufflenet_v2") else None,
                min_size=min_size,
                description=f"torchvision.models.{name}",
            )
        )


_register_torchvision()


def get_spec(name: str) -> ModelSpec:
    """The registry entry for ``name``, in any case (``ResNet18`` is resnet18); unknown names
    raise UsageError with close matches. A registered source's prefix (``timm/``) hands the
    name to that source."""
    for prefix, resolve in _SOURCES.items():
        if name.lower().startswith(prefix):
            return resolve(name)
    spec = _REGISTRY.get(name) or _REGISTRY.get(name.lower())
    if spec is not None:
        return spec
    close = suggest(name)
    hint = f"; did you mean: {', '.join(close)}?" if close else ""
    raise UsageError(f"unknown architecture {name!r}{hint} (`cnntrain models` lists them all)")


def _squash(name: str) -> str:
    """A name without case or separators: ``ShuffleNet-V2`` and ``shufflenet_v2`` both read ``shufflenetv2``."""
    return "".join(ch for ch in name.lower() if ch.isalnum())


def suggest(name: str, n: int = 4) -> list[str]:
    """Registered names a user who typed ``name`` probably meant, best first.

    The same name but for separators comes first (``seresnet50``: se_resnet50), then the
    names it begins (``shufflenetv2``: the four shufflenet_v2 widths, shortest first), then
    difflib's close matches. Separators are never ignored for an exact match: regnet_x_1_6gf
    and regnet_x_16gf differ only by one.
    """
    squashed = _squash(name)
    if not squashed:
        return []
    names_of: dict[str, list[str]] = {}
    for registered in sorted(_REGISTRY):
        names_of.setdefault(_squash(registered), []).append(registered)
    same = names_of.get(squashed, [])
    begun = sorted((r for s, names in names_of.items() if s.startswith(squashed) and s != squashed for r in names),
                   key=lambda r: (len(r), r))
    fuzzy = [r for s in difflib.get_close_matches(squashed, list(names_of), n=n, cutoff=0.6) for r in names_of[s]]
    return list(dict.fromkeys([*same, *begun, *fuzzy]))[:n]


def _natural_key(name: str) -> list[tuple[int, int | str]]:
    """Sort key comparing digit runs as numbers: resnet18 < resnet50 < resnet101, vit_b_16 < vit_b_32."""
    return [(1, int(part)) if part.isdigit() else (0, part) for part in re.split(r"(\d+)", name) if part]


def list_models(pattern: str | None = None) -> list[str]:
    """Registered names in natural order (resnet18 before resnet101), optionally filtered by a glob
    (``resnet*``) or substring."""
    names = sorted(_REGISTRY, key=lambda n: (_natural_key(n), n))
    if not pattern:
        return names
    if any(ch in pattern for ch in "*?["):
        return [n for n in names if fnmatch.fnmatch(n, pattern)]
    return [n for n in names if pattern in n]
