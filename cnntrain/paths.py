"""Where cnntrain keeps what it caches: one function per location, and nothing else.

Every cache folder (built-in datasets, scan verdicts, file hashes, decoded images, model statistics,
pretrained weights) is named here, so a user who asks "what can I delete, and where is it?"
gets the answer from one file, and a module that needs a location never imports another
module's internals (or its dependencies) to find it. Only the standard library is imported,
so any module, the CLI included, can ask cheaply.

Locations are computed on every call, not at import, so setting ``CNNTRAIN_HOME`` or
``TORCH_HOME`` (tests do) takes effect at once.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = [
    "HOME_ENV",
    "cache_root",
    "datasets_dir",
    "hash_cache_dir",
    "image_cache_dir",
    "model_stats_dir",
    "scan_cache_dir",
    "weights_dir",
]

HOME_ENV = "CNNTRAIN_HOME"


def cache_root() -> Path:
    """``$CNNTRAIN_HOME`` if set, else ``~/.cache/cnntrain``: the parent of every cnntrain cache."""
    home = os.environ.get(HOME_ENV)
    return Path(home).expanduser() if home else Path.home() / ".cache" / "cnntrain"


def datasets_dir(root: str | os.PathLike[str] | None = None) -> Path:
    """Where built-in datasets live: ``root`` if given, else ``cache_root()/"datasets"``."""
    return Path(root).expanduser() if root is not None else cache_root() / "datasets"


def scan_cache_dir() -> Path:
    """Where image-scan verdicts are remembered (``<hash of the dataset root>.json`` each)."""
    return cache_root() / "scan"


def hash_cache_dir() -> Path:
    """Where file hashes (content, and the perceptual hashes of ``check-data``) are remembered."""
    return cache_root() / "hashes"


def image_cache_dir() -> Path:
    """Where disk caches of decoded images live, one folder per key (delete it to clear them all)."""
    return cache_root() / "images"


def model_stats_dir() -> Path:
    """Where parameter and MAC counts are remembered, one file per set of library versions."""
    return cache_root() / "model_stats"


def weights_dir() -> Path:
    """torchvision's weights folder, ``<torch hub dir>/checkpoints``, so both tools share one cache.

    When torch is loaded (it always is by the time weights are used) its own
    ``torch.hub.get_dir()`` answers, so ``torch.hub.set_dir()`` is honoured. Otherwise nobody can
    have called ``set_dir`` and the folder is computed the way torch computes it
    (``$TORCH_HOME``, else ``$XDG_CACHE_HOME/torch``, else ``~/.cache/torch``; then ``hub``),
    without importing torch for it.
    """
    hub = sys.modules.get("torch.hub")
    if hub is not None:
        return Path(hub.get_dir()) / "checkpoints"
    xdg_cache = os.getenv("XDG_CACHE_HOME", "~/.cache")
    torch_home = os.path.expanduser(os.getenv("TORCH_HOME", os.path.join(xdg_cache, "torch")))
    return Path(torch_home) / "hub" / "checkpoints"
