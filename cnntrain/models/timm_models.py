"""timm's architectures by name: ``--arch timm/<name>`` (``timm/convnext_nano``, ``timm/resnet50d.a1_in1k``).

timm already does for its zoo what cnntrain does for torchvision's, so it is used, not copied: it
builds a network with any head (``num_classes``), loads its own weights (``pretrained=True``, from
the Hugging Face cache, as safetensors or with ``weights_only``), and each model's
``pretrained_cfg`` names its classifier and gives the normalisation and input size its weights were
trained with. This module turns that into a ``ModelSpec``, so training, freezing, the feature
cache, export, predict, eval and bench treat a timm network like any other, and a checkpoint
that records ``timm/<name>`` is rebuilt by the same builder (without weights: it has its own).

timm is imported only when a ``timm/`` name is used: ``import cnntrain`` and ``cnntrain --help``
never pay for it, and without the extra a ``timm/`` name is one line naming the pip command.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch.nn as nn

from cnntrain.errors import UsageError, WeightsError, first_line, missing_extra
from cnntrain.models.registry import ModelSpec, register_source

PREFIX = "timm/"
#: ``cnntrain models --source timm`` counts parameters and GMACs only when at most this many names
#: match: timm ships no counts, each one builds the model (0.3-1.5 s on a 2-core CPU, even on the
#: meta device), and its whole zoo of ~1,400 would take tens of minutes.
COUNT_LIMIT = 30
#: Smallest input of a convnet whose pretrained config states none (five stride-2 stages).
_MIN_SIZE = 32


def is_timm_name(name: str) -> bool:
    return name.lower().startswith(PREFIX)


def _timm() -> ModuleType:
    try:
        import timm
    except ImportError:
        raise missing_extra(f"a {PREFIX} architecture", "timm", "timm") from None
    return timm


def _pretrained_cfg(timm: ModuleType, model_name: str, arch: str) -> Any:
    """timm's config of ``model_name``'s weights (the default tag's when none is given)."""
    try:
        return timm.models.get_pretrained_cfg(model_name)
    except RuntimeError:  # timm's word for a tag the architecture does not have
        tags = timm.list_pretrained(f"{arch}.*")
        known = f"; its weights: {', '.join(PREFIX + t for t in tags[:6])}" if tags else "; it has no weights"
        raise UsageError(f"timm has no weights {PREFIX}{model_name}{known}") from None


def _unknown(timm: ModuleType, arch: str) -> UsageError:
    close = difflib.get_close_matches(arch, timm.list_models(), n=4, cutoff=0.6)
    hint = f"; did you mean: {', '.join(PREFIX + c for c in close)}?" if close else ""
    return UsageError(f"timm has no architecture {arch!r}{hint} (`cnntrain models --source timm PATTERN` "
                      "lists them)")


@functools.cache
def timm_spec(name: str) -> ModelSpec:
    """The ``ModelSpec`` of ``timm/<name>[.<tag>]``, read off timm's registry and ``pretrained_cfg``."""
    timm = _timm()
    model_name = name[len(PREFIX):].strip().lower()
    if not model_name:
        raise UsageError(f"name a timm architecture after {PREFIX}, e.g. {PREFIX}convnext_nano")
    arch, _ = timm.models.split_model_name_tag(model_name)
    if not timm.is_model(arch):
        raise _unknown(timm, arch)
    cfg = _pretrained_cfg(timm, model_name, arch)
    has_weights = timm.models.is_model_pretrained(model_name)
    classifier = cfg.classifier if cfg is not None else None
    # Distilled models (DeiT) name two classifiers; the first is the one their forward leads with.
    head = classifier[0] if isinstance(classifier, (tuple, list)) else classifier
    label = (cfg.hf_hub_id or f"{arch}.{cfg.tag}") if has_weights else None

    def build(num_classes: int = 1000, **kwargs: Any) -> nn.Module:
        return timm.create_model(model_name, pretrained=False, num_classes=num_classes, **kwargs)

    build.__name__ = arch
    return ModelSpec(
        name=PREFIX + model_name,
        builder=build,
        family=timm.models.model_entrypoint(arch).__module__.rsplit(".", 1)[-1],
        source="timm",
        pretrained_loader=_loader(timm, model_name, label or model_name, cfg) if has_weights else None,
        weights_label=label,
        mean=tuple(cfg.mean) if cfg is not None else None,
        std=tuple(cfg.std) if cfg is not None else None,
        head=head or None,
        min_size=_min_size(cfg),
        description=f"timm.models.{arch}" + (f" ({cfg.tag} weights)" if has_weights and cfg.tag else ""),
    )


def _min_size(cfg: Any) -> int:
    """A model whose weights fix their input size (ViT, Swin) takes only that; else timm's stated minimum."""
    if cfg is None:
        return _MIN_SIZE
    if cfg.fixed_input_size:
        return int(cfg.input_size[-1])
    return int(cfg.min_input_size[-1]) if cfg.min_input_size else _MIN_SIZE


def _loader(timm: ModuleType, model_name: str, label: str, cfg: Any) -> Callable[[int], tuple[nn.Module, bool]]:
    """timm's own pretrained build, with a head of ``num_classes``; failures as one ``WeightsError`` line."""

    def load(num_classes: int) -> tuple[nn.Module, bool]:
        try:
            model = timm.create_model(model_name, pretrained=True, num_classes=num_classes)
        except OSError as exc:  # the hub's "not cached and not reachable", a refused URL, a full disk
            raise _not_fetched(label, cfg, exc) from None
        except Exception as exc:  # noqa: BLE001 - a damaged file: safetensors and torch raise many types
            raise WeightsError(f"pretrained weights {label} in the Hugging Face cache could not be loaded "
                               f"({first_line(exc, 160, with_type=True)}); delete them from {_hub_cache()} to "
                               "fetch them again, or use --no-pretrained") from None
        return model, num_classes != cfg.num_classes

    return load


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _not_fetched(label: str, cfg: Any, exc: OSError) -> WeightsError:
    """The offline ways out, as for torchvision weights: bring a file, train from scratch, or a cache."""
    from huggingface_hub import constants

    why = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else
           f"{first_line(exc, 120)}; set HF_HUB_OFFLINE=1 to fail without the retries")
    source = f"the pytorch_model.bin of huggingface.co/{cfg.hf_hub_id}" if cfg.hf_hub_id else cfg.url or "its file"
    return WeightsError(
        f"pretrained weights {label} are not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and could not "
        f"be downloaded ({why}); use `--weights FILE` ({source}, or a cnntrain checkpoint), `--no-pretrained` to "
        "train from scratch, or copy a Hugging Face cache that holds them here and point HF_HOME at it"
    )


# --------------------------------------------------------------------------- `cnntrain models --source timm`


def timm_names(pattern: str | None = None) -> list[str]:
    """timm's architectures (no weight tags) as ``timm/<name>``, filtered like ``list_models``: a glob
    (``convnext*``, with or without the ``timm/``) or a substring."""
    names = _timm().list_models()
    if pattern:
        bare = pattern[len(PREFIX):] if is_timm_name(pattern) else pattern
        glob = bare if any(ch in bare for ch in "*?[") else f"*{bare}*"
        names = [n for n in names if fnmatch.fnmatch(n, glob)]
    return [PREFIX + n for n in names]


register_source(PREFIX, timm_spec)
