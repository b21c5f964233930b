"""On-disk storage of the decoded-image cache: where it lives, its key, and a crash-safe build.

This is the part of :mod:`cnntrain.data.imagecache` that is about files rather than images:
naming a cache folder by what its pixels depend on, publishing it atomically so a killed build
never looks complete, letting one process build while the others wait, sweeping up what killed
builds left behind, and mapping a finished cache read-only. It knows the folder layout
(``data.u8``, ``entries.npy``, ``index.json`` written last) and nothing about decoding, budgets
or :class:`~cnntrain.data.imagecache.ImageCache`: the caller hands it a ``fill`` function that
writes the pixels, and gets back the raw pieces as a :class:`StoredCache`. So the dependency
goes one way: imagecache imports this module, never the reverse.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from cnntrain import fileio
from cnntrain.data.decode import decoder_id
from cnntrain.errors import DataError
from cnntrain.paths import image_cache_dir

CACHE_VERSION = 1
#: A temporary build folder untouched this long belongs to a killed build and is removed.
STALE_SECONDS = 3600.0

#: Decodes every image into the data file it is given (already of its final size, written in
#: place by whichever processes the caller decodes in); returns (entries, reasons).
Fill = Callable[[Path], tuple[torch.Tensor, dict[int, str]]]


class StoredCache(NamedTuple):
    """A complete disk cache as read back: its folder, ``N x 4`` entries, reasons and data size."""

    folder: Path
    entries: torch.Tensor
    reasons: dict[int, str]
    nbytes: int


def _pixels_id() -> str:
    """What the cached pixels depend on besides the files: this layout's version and the decoder
    (:func:`~cnntrain.data.decode.decoder_id`, which covers the resize kernel and CPU path too)."""
    return f"v{CACHE_VERSION} {decoder_id()}"


def cache_key(paths: Sequence[str], short_side: int) -> str:
    """Hash of the sample list (order, absolute paths, sizes, mtimes), the resize and the decoder."""
    h = hashlib.sha256(f"{_pixels_id()}\nshort_side {short_side}\n".encode())
    for path in paths:
        try:
            st = os.stat(path)
            stamp = f"{st.st_size} {st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"{os.path.abspath(path)}\0{stamp}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:32]


def read_disk_cache(key: str) -> StoredCache | None:
    """The complete disk cache with this key, or None (absent, still building, damaged)."""
    folder = image_cache_dir() / key
    try:
        index = json.loads((folder / "index.json").read_text(encoding="utf-8"))
        if index.get("version") != CACHE_VERSION or index.get("key") != key:
            return None
        nbytes, count = int(index["nbytes"]), int(index["count"])
        if (folder / "data.u8").stat().st_size != nbytes:
            return None
        entries = np.load(folder / "entries.npy", allow_pickle=False)
        if entries.shape != (count, 4) or entries.dtype != np.int64:
            return None
        reasons = {int(k): str(v) for k, v in index.get("reasons", {}).items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return StoredCache(folder, torch.from_numpy(entries), reasons, nbytes)


def map_data(folder: Path, nbytes: int) -> torch.Tensor:
    """Map a finished cache's pixels; copy-on-write, so the file itself is never written."""
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.from_numpy(np.memmap(folder / "data.u8", dtype=np.uint8, mode="c", shape=(nbytes,)))


def free_space(folder: Path) -> int | None:
    """Free bytes on the file system that holds (or will hold) ``folder``; None if unknown."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def _newest_mtime(folder: Path) -> float:
    times = [folder.stat().st_mtime]
    with contextlib.suppress(OSError):
        times += [entry.stat().st_mtime for entry in os.scandir(folder)]
    return max(times)


def _remove_stale(root: Path) -> None:
    """Remove build folders of killed builds (temp names, untouched for STALE_SECONDS)."""
    now = time.time()
    for entry in os.scandir(root):
        if fileio.is_temp_name(entry.name) and entry.is_dir(follow_symlinks=False):
            with contextlib.suppress(OSError):
                if now - _newest_mtime(Path(entry.path)) > STALE_SECONDS:
                    shutil.rmtree(entry.path, ignore_errors=True)


def write_disk_cache(paths: Sequence[str], nbytes: int, key: str, short_side: int, fill: Fill,
                     log: Callable[[str], None]) -> StoredCache:
    """Build the disk cache ``key`` of ``nbytes`` with ``fill`` (unless another process just
    did) and return it as read back; a failed or killed build leaves nothing that looks complete."""
    root = image_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    waiting = f"image cache: another process is building {root / key}; waiting for it"
    with fileio.exclusive_lock(root / f".{key}.lock", on_wait=lambda: log(waiting)):
        found = read_disk_cache(key)  # built by another process while we waited
        if found is not None:
            return found
        _remove_stale(root)
        final = root / key
        if final.exists():  # incomplete or damaged (not written by this version): never reused
            shutil.rmtree(final, ignore_errors=True)
        tmp = root / fileio.temp_name(key)
        tmp.mkdir()
        try:
            data_path = tmp / "data.u8"
            with open(data_path, "wb") as f:
                f.truncate(nbytes)
            entries, reasons = fill(data_path)
            with open(data_path, "rb+") as f:  # the pages written through mappings, on disk
                os.fsync(f.fileno())
            with fileio.atomic_open(tmp / "entries.npy", "wb") as f:
                np.save(f, entries.numpy(), allow_pickle=False)
            index = {"version": CACHE_VERSION, "key": key, "short_side": short_side, "count": len(paths),
                     "nbytes": nbytes, "decoder": _pixels_id(), "reasons": {str(i): r for i, r in reasons.items()},
                     "first": os.path.abspath(paths[0]) if paths else None}
            fileio.atomic_write_text(tmp / "index.json", json.dumps(index))  # last: marks it complete
            try:
                os.rename(tmp, final)  # the whole folder appears at once
            except OSError:  # another builder (no lock on this system) published first: use theirs
                shutil.rmtree(tmp, ignore_errors=True)
            fileio.fsync_dir(root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    stored = read_disk_cache(key)
    if stored is None:
        raise DataError(f"the image cache written to {final} cannot be read back; delete {root} and retry, "
                        "or train with --cache none")
    return stored
