"""Parameter and multiply-add counts, measured with torch's own FLOP counter.

Models are built on the meta device where the builder allows it, so even the largest
networks are counted in well under a second without allocating their weights. Counts only
change with the library versions, so they are cached (``model_stats_cached``) and
`cnntrain models` does not rebuild RegNet-128GF on every call.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from cnntrain.fileio import atomic_write_text, exclusive_lock
from cnntrain.models.registry import get_spec
from cnntrain.models.timm_models import is_timm_name
from cnntrain.paths import model_stats_dir


def count_macs(model: nn.Module, img_size: int = 224, device: torch.device | str | None = None) -> int:
    """Multiply-adds of one forward pass at batch 1 (torch counts a MAC as 2 FLOPs)."""
    device = device or next(model.parameters()).device
    x = torch.zeros(1, 3, img_size, img_size, device=device)
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    model.train(was_training)
    return counter.get_total_flops() // 2


def _build_for_counting(name: str) -> nn.Module:
    spec = get_spec(name)
    try:
        with torch.device("meta"):
            return spec.builder(num_classes=1000, **spec.build_kwargs)
    except (NotImplementedError, RuntimeError):
        # A few builders (RegNet) compute their widths with tensors, which meta cannot hold.
        return spec.builder(num_classes=1000, **spec.build_kwargs).to("meta")


def model_stats(name: str, img_size: int = 224) -> dict[str, float]:
    """Parameters (millions) and GMACs at ``img_size`` for the 1000-class ImageNet model."""
    model = _build_for_counting(name)
    size = max(img_size, get_spec(name).min_size)
    return {
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "gmacs": count_macs(model, size, device="meta") / 1e9,
        "img_size": size,
    }


def _stats_cache_path(names: Sequence[str] = ()) -> Path:
    import torchvision

    from cnntrain import __version__

    key = f"torch{torch.__version__}-tv{torchvision.__version__}-cnntrain{__version__}"
    if any(is_timm_name(n) for n in names):  # timm's models change with timm's version: a file of their own
        import timm

        key += f"-timm{timm.__version__}"
    key = key.replace("+", "_")
    return model_stats_dir() / f"{key}.json"


def _progress(names: list[str]) -> list[str] | Iterator[str]:
    """``names``, wrapped in a tqdm bar on stderr when it is a terminal and there are several."""
    try:
        interactive = sys.stderr.isatty()
    except (AttributeError, ValueError):
        interactive = False
    if not interactive or len(names) < 2:
        return names
    from tqdm import tqdm

    return iter(tqdm(names, desc="counting", unit="model", file=sys.stderr, leave=False, dynamic_ncols=True))


def _read_stats(path: Path) -> dict[str, dict[str, float]]:
    """The cached counts, or none when the file is missing or damaged (they are only recounted)."""
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(cache, dict):
        return {}
    return {k: v for k, v in cache.items() if isinstance(v, dict) and {"params_m", "gmacs"} <= v.keys()}


def _save_stats(path: Path, counted: dict[str, dict[str, float]]) -> None:
    """Add ``counted`` to the cache file: re-read under a lock and written atomically, so two
    commands counting at once (two `cnntrain models` in a CI matrix) keep each other's counts."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(path.with_name(f".{path.stem}.lock")):
            merged = {**_read_stats(path), **counted}
            atomic_write_text(path, json.dumps(merged, indent=1, sort_keys=True))
    except OSError:
        pass  # a read-only cache only costs time


def model_stats_cached(names: list[str], img_size: int = 224,
                       log: Callable[[str], None] | None = None) -> dict[str, dict[str, float]]:
    """``model_stats`` for many models, remembered across calls (keyed by library versions).

    When some are missing, ``log`` (if given) is called once before counting, since the first
    count of the whole zoo takes tens of seconds; a tqdm bar follows on stderr when it is a terminal.
    """
    path = _stats_cache_path(names)
    cache = _read_stats(path)
    missing = [n for n in names if f"{n}@{img_size}" not in cache]
    if missing and log is not None:
        log(f"counting parameters and MACs of {len(missing)} architecture{'s' if len(missing) != 1 else ''} "
            f"at {img_size} px: a one-time cost, cached in {path} for later calls")
    counted = {f"{name}@{img_size}": model_stats(name, img_size) for name in _progress(missing)}
    if counted:
        _save_stats(path, counted)
    cache.update(counted)
    return {n: cache[f"{n}@{img_size}"] for n in names}
