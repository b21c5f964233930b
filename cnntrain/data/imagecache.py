"""Decoded-image cache: decode every image once, keep it as uint8, read it back every epoch.

Decoding a JPEG costs far more than cropping and flipping it, and without a cache every epoch
decodes every file again. So before training each image is decoded once (with the same
:func:`~cnntrain.data.decode.decode_image` as everywhere else), shrunk so its *short side* is
the largest size training needs (``int(img_size / CROP_RATIO)``, the eval resize: 256 for 224)
and stored as uint8. Random crops, flips and the rest then run on the cached pixels.

The resize rule: an image whose short side is larger than ``short_side`` is resized exactly
as :func:`~cnntrain.data.transforms.eval_transform` resizes it (``v2.Resize``, bilinear,
antialiased); a smaller one is stored as decoded, never upscaled (upscaling adds bytes and no
detail; eval upscales it from the same pixels). Eval resizing a cached image is then a no-op,
so evaluation through the cache gives bit for bit the tensors it gives without one. Training
crops come from the cached (smaller) image instead of the full-size file: the same trade
every decoded-image cache makes, invisible at ``RandomResizedCrop``'s usual scales.

Two homes for the pixels, one layout (a flat uint8 buffer, and per image an offset, height,
width and a tag of its path):

- ``ram``: one tensor in shared memory, so DataLoader workers (fork or spawn) read it without
  copying. It is allocated once at its final size, from the header sizes, so it never exceeds
  the budget (``--cache-max-gb``, default a quarter of the available memory).
- ``disk``: a memory-mapped file in ``cnntrain.paths.image_cache_dir()/<key>/``; the key hashes the file
  list, sizes and mtimes, the resize and the decoder, so a changed file means a new cache.
  It is built in a temporary folder and renamed into place when complete (its index is
  written last), so a killed build never looks complete; a complete one is reused read-only,
  never rewritten, by later runs and by the other ranks of a distributed run (a lock file
  lets one process build while the others wait). The files live in :mod:`cnntrain.data.diskcache`.

Either way the decoding workers write each image into its slot themselves and send back only
its size, so the pixels never travel between processes during the build.

``auto`` takes an existing disk cache, else RAM when the estimate fits the budget, else disk,
else (no disk space either) no cache. A file that fails to decode is recorded with its reason
and :class:`~cnntrain.data.datasets.ImageDataset` reports it as unreadable, as without a cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2
from tqdm import tqdm

from cnntrain.choices import CACHE_MODES
from cnntrain.data import decode
from cnntrain.data.decode import TEXT_LIMIT, ImageDecodeError, decode_image
from cnntrain.data.diskcache import (
    StoredCache,
    cache_key,
    free_space,
    map_data,
    read_disk_cache,
    write_disk_cache,
)
from cnntrain.data.pool import POOL_THRESHOLD, run_in_workers
from cnntrain.errors import DataError, UsageError, first_line
from cnntrain.fileio import format_bytes
from cnntrain.paths import image_cache_dir

#: Free space a disk cache must leave behind on its file system.
DISK_RESERVE = 512 * 2**20
GB = 1e9  # --cache-max-gb counts decimal gigabytes, like the sizes printed (fileio.format_bytes)

# The height column holds these for images that have no pixels in the cache.
_MISSING = -1  # failed to decode for good: ImageDataset reports it as unreadable
_UNCACHED = -2  # transient failure, or bigger than its header promised: decoded from the file when used

Log = Callable[[str], None]


# ------------------------------------------------------------------------------ the cache


def path_tag(path: str) -> int:
    """A 63-bit tag of a sample's path: each lookup checks it, so a cache is never read for
    a sample list it was not built for."""
    digest = hashlib.blake2b(str(path).encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class ImageCache:
    """Decoded uint8 images of one sample list, by index; see the module docstring.

    ``entries`` is an ``N x 4`` int64 tensor (offset, height, width, path tag); ``data`` the
    flat uint8 buffer (``ram``) or the folder holding it as ``data.u8`` (``disk``, mapped
    lazily in each process, so pickling for a spawned worker sends only the folder name).
    """

    def __init__(self, mode: str, entries: torch.Tensor, reasons: dict[int, str], *,
                 data: torch.Tensor | None = None, folder: Path | None = None, nbytes: int | None = None) -> None:
        self.mode = mode
        self.entries = entries
        self.reasons = reasons
        self.folder = folder
        self._data = data
        self.nbytes = int(data.numel()) if nbytes is None and data is not None else int(nbytes or 0)

    @property
    def data(self) -> torch.Tensor:
        if self._data is None:
            assert self.folder is not None, "a cache without pixels in memory is a disk cache"
            self._data = map_data(self.folder, self.nbytes)
        return self._data

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def missing(self) -> int:
        """Images recorded as unreadable."""
        return int((self.entries[:, 1] == _MISSING).sum())

    def verdicts(self) -> dict[int, str | None]:
        """What the build learnt of each image, by index: None when it is stored (it decodes), the
        reason when it failed for good. Images read from their files when used (a transient failure,
        a header that lied) are left out: nothing final is known of them."""
        heights = self.entries[:, 1].tolist()
        return {i: None if h >= 0 else self.reasons.get(i, "unreadable when the cache was built")
                for i, h in enumerate(heights) if h != _UNCACHED}

    def get(self, index: int, path: str) -> torch.Tensor | None:
        """The cached ``3 x H x W`` uint8 image of sample ``index`` (a copy, so transforms may
        write to it), None when it must be decoded from ``path``, or :class:`ImageDecodeError`
        with the recorded reason when it could not be decoded."""
        offset, height, width, tag = self.entries[index].tolist()
        if tag != path_tag(path):
            # A bug, not bad data: it must not pass for an unreadable file (skip_unreadable).
            raise ValueError(f"the image cache holds another image at index {index} than "
                             f"{first_line(path, TEXT_LIMIT)}; build the cache for exactly this sample list, "
                             "in this order")
        if height == _MISSING:
            raise ImageDecodeError(path, self.reasons.get(index, "unreadable when the cache was built"))
        if height == _UNCACHED:
            return None
        return self.data[offset: offset + 3 * height * width].view(3, height, width).clone()

    def split(self, n: int) -> tuple[ImageCache, ImageCache]:
        """Views of the first ``n`` images and of the rest (one cache built for train + val)."""
        first = {i: r for i, r in self.reasons.items() if i < n}
        rest = {i - n: r for i, r in self.reasons.items() if i >= n}
        return (self._view(self.entries[:n], first), self._view(self.entries[n:], rest))

    def select(self, indices: Sequence[int]) -> ImageCache:
        """A view of the images at ``indices``, in that order (a cache built for a list that
        readable samples were then picked from); the pixels are shared, not copied."""
        reasons = {new: self.reasons[old] for new, old in enumerate(indices) if old in self.reasons}
        entries = self.entries[torch.as_tensor(list(indices), dtype=torch.int64)]
        if self.entries.is_shared():  # as the whole cache's: workers read it without a copy
            entries.share_memory_()
        return self._view(entries, reasons)

    def _view(self, entries: torch.Tensor, reasons: dict[int, str]) -> ImageCache:
        return ImageCache(self.mode, entries, reasons, data=self._data, folder=self.folder, nbytes=self.nbytes)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self.mode == "disk":
            state["_data"] = None  # a memory map would be pickled as its whole content; reopen instead
        return state

    def __repr__(self) -> str:
        where = f", {self.folder}" if self.folder is not None else ""
        return f"ImageCache({self.mode}, {len(self)} images, {format_bytes(self.nbytes)}{where})"


# ------------------------------------------------------------------------------ sizes and budget


def available_memory() -> int | None:
    """Bytes of memory available to new allocations: MemAvailable on Linux, else sysconf."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        pass
    try:  # macOS has no "available" count: assume half of the physical memory is
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (AttributeError, ValueError, OSError):
        return None


def default_budget() -> int:
    """The RAM budget without ``--cache-max-gb``: a quarter of the available memory (2 GB if unknown)."""
    available = available_memory()
    return available // 4 if available else 2 * 10**9


def _shared_memory_free() -> int | None:
    """Free bytes in /dev/shm, where shared tensors live on Linux (containers often give 64 MB)."""
    try:
        return shutil.disk_usage("/dev/shm").free if os.path.isdir("/dev/shm") else None
    except OSError:
        return None


def resized_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """``(height, width)`` after the cache's resize: short side ``short_side``, never upscaled.

    The same arithmetic as torchvision's ``Resize(short_side)`` (long side truncated), so the
    size estimated from a header is the size stored.
    """
    short, long = min(height, width), max(height, width)
    if short <= short_side:
        return height, width
    new_long = int(short_side * long / short)
    return (short_side, new_long) if height <= width else (new_long, short_side)


def _header_bytes(path: str, short_side: int) -> int:
    """Bytes the cached image will take, from the file's header alone (0 if unreadable).

    EXIF orientation may swap height and width, which changes neither the short side nor
    the byte count, so it is not read here.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as img:
                width, height = img.size
        decode._check_geometry(path, (width, height))
    except Exception:  # noqa: BLE001 - anything wrong shows up again, with its reason, when decoding
        return 0
    h, w = resized_size(height, width, short_side)
    return 3 * h * w


# ------------------------------------------------------------------------------ workers


class _Headers(Dataset):
    def __init__(self, paths: Sequence[str], short_side: int) -> None:
        self.paths, self.short_side = paths, short_side

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> int:
        return _header_bytes(self.paths[index], self.short_side)


class _Slots:
    """Where each decoded image goes: its slot of the cache's flat uint8 buffer, writable from
    any process. Workers write the pixels in place and send back only the size: sending every
    image to this process (a shared-memory segment and a socket round trip each) and copying it
    there took longer than decoding and resizing it (3,000 JPEGs of 240-500 px, 2 workers, 2 idle
    cores: 5.6 s against 3.1 s; with other work on the machine, torch's thread pool for that copy
    stalled the build to 39 s against 8 s). RAM: the buffer is a shared-memory tensor, which a
    spawned worker receives by handle; disk: the data file, which each process maps for itself
    (a mapping would be pickled as a copy, and the writes lost)."""

    def __init__(self, sizes: np.ndarray, *, shared: torch.Tensor | None = None, file: Path | None = None) -> None:
        self.sizes, self.shared, self.file = sizes, shared, file
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if len(sizes) else sizes
        self._view: np.ndarray | None = None

    def write(self, index: int, image: torch.Tensor) -> bool:
        """Store ``image`` in slot ``index``; False if it does not fill the slot exactly (its header lied)."""
        n = image.numel()
        if n != self.sizes[index]:
            return False
        start = int(self.offsets[index])
        self._buffer()[start: start + n] = image.numpy().reshape(-1)  # numpy: no thread pool for a memcpy
        return True

    def _buffer(self) -> np.ndarray:
        """The buffer in this process: opened on the first write (a worker's, after the pickle)."""
        if self._view is None:
            if self.shared is not None:
                self._view = self.shared.numpy()
            else:
                assert self.file is not None, "slots live in shared memory or in a file"
                self._view = np.memmap(self.file, dtype=np.uint8, mode="r+", shape=(int(self.sizes.sum()),))
        return self._view

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_view": None}


class _Decode(Dataset):
    """Decodes, resizes and stores one image per item, in a worker; returns ``(index, height,
    width, reason)``: the stored size, or height ``_UNCACHED`` (a transient failure, a header
    that lied) or ``_MISSING`` (with the reason) when nothing was stored."""

    def __init__(self, paths: Sequence[str], indices: Sequence[int], short_side: int, slots: _Slots) -> None:
        self.paths, self.indices, self.short_side, self.slots = paths, indices, short_side, slots
        self.resize = v2.Resize(short_side, antialias=True)  # eval_transform's own resize

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[int, int, int, str | None]:
        index = self.indices[item]
        try:
            image = decode_image(self.paths[index])
        except ImageDecodeError as e:
            return (index, _UNCACHED, 0, None) if e.transient else (index, _MISSING, 0, e.reason)
        except DataError:  # not about the image (e.g. too many open files): it is read again when used
            return index, _UNCACHED, 0, None
        if min(image.shape[-2:]) > self.short_side:
            image = self.resize(image)
        if not self.slots.write(index, image.contiguous()):
            return index, _UNCACHED, 0, None  # the file changed since its header was read: used from the file
        return index, image.shape[1], image.shape[2], None


def estimate_bytes(paths: Sequence[str], short_side: int, workers: int = 0) -> np.ndarray:
    """Bytes each image will take in the cache, from headers (int64 array; 0: unreadable)."""
    workers = workers if len(paths) >= POOL_THRESHOLD else 0
    return np.fromiter(run_in_workers(_Headers(paths, short_side), workers), dtype=np.int64, count=len(paths))


def _fill(paths: Sequence[str], slots: _Slots, short_side: int, workers: int, progress: bool,
          known_bad: Mapping[int, str]) -> tuple[torch.Tensor, dict[int, str]]:
    """Decode every image into its slot; returns (entries, reasons). The images of ``known_bad``
    are recorded as unreadable with their reason, unopened."""
    entries = torch.zeros((len(paths), 4), dtype=torch.int64)
    entries[:, 0] = torch.from_numpy(slots.offsets)
    entries[:, 3] = torch.tensor([path_tag(p) for p in paths], dtype=torch.int64)
    reasons: dict[int, str] = dict(known_bad)
    entries[list(known_bad), 1] = _MISSING
    todo = [i for i in range(len(paths)) if i not in known_bad]
    decode = _Decode(paths, todo, short_side, slots)
    with tqdm(total=len(todo), desc="caching images", unit="img", disable=not progress, leave=False) as bar:
        for index, height, width, reason in run_in_workers(decode, workers, batch_size=16):
            bar.update()
            entries[index, 1], entries[index, 2] = height, width
            if reason is not None:
                reasons[index] = reason
    return entries, reasons


# ------------------------------------------------------------------------------ disk


def open_disk_cache(key: str) -> ImageCache | None:
    """The complete disk cache with this key, or None (absent, still building, damaged)."""
    stored = read_disk_cache(key)
    return None if stored is None else _disk_cache(stored)


def _disk_cache(stored: StoredCache) -> ImageCache:
    return ImageCache("disk", stored.entries, stored.reasons, folder=stored.folder, nbytes=stored.nbytes)


# ------------------------------------------------------------------------------ entry point


def _choose(mode: str, nbytes: int, budget: int, disk_folder: Path, log: Log) -> str:
    """``ram``, ``disk`` or ``none`` for ``nbytes`` of decoded images; raises when ``mode`` cannot be had."""
    shm = _shared_memory_free()
    ram_limit = min(budget, shm) if shm is not None else budget
    need = format_bytes(nbytes)
    if mode in ("ram", "auto") and nbytes <= ram_limit:
        return "ram"
    if mode == "ram":
        where = (f"the RAM budget of {format_bytes(budget)}" if nbytes > budget
                 else f"the {format_bytes(shm or 0)} free in /dev/shm (shared memory)")
        raise UsageError(f"--cache ram: the decoded images need about {need}, more than {where}; "
                         "use --cache disk, or raise --cache-max-gb")
    free = free_space(disk_folder)
    if free is None or free >= nbytes + DISK_RESERVE:
        return "disk"
    message = (f"the decoded images need about {need} plus {format_bytes(DISK_RESERVE)} to spare, and only "
               f"{format_bytes(free)} is free in {disk_folder}")
    if mode == "disk":
        raise UsageError(f"--cache disk: {message}; free some space, set CNNTRAIN_HOME to a bigger disk, "
                         "or use --cache ram / --cache none")
    log(f"image cache: off ({need} is over the RAM budget of {format_bytes(ram_limit)}, and {message})")
    return "none"


def build_image_cache(
    samples: Sequence[tuple[str, int]],
    *,
    short_side: int,
    mode: str,
    max_gb: float | None,
    workers: int,
    log: Log,
    progress: bool = False,
    known_bad: Mapping[int, str] | None = None,
) -> ImageCache | None:
    """Decode ``samples`` once into a cache that :class:`ImageDataset` reads by index.

    ``short_side``: images are shrunk to this short side (never enlarged); pass
    ``int(img_size / CROP_RATIO)``. ``mode``: ``auto``, ``ram``, ``disk`` or ``none`` (returns
    None). ``max_gb``: the RAM budget (None: a quarter of the available memory). ``workers``
    decode in parallel (0: in this process). ``log`` gets one line: the mode, size, image count
    and seconds. The cache is built for exactly this sample list in this order.
    ``known_bad``: reasons, by index, of samples already known to be unreadable (the scan's
    verdicts): recorded as such without opening them, so a file that cannot even be opened
    safely (a FIFO) never is. :meth:`ImageCache.verdicts` says what the build found of the rest.
    """
    if mode not in CACHE_MODES:
        raise UsageError(f"--cache must be one of {', '.join(CACHE_MODES)}, not {mode!r}")
    if isinstance(short_side, bool) or not isinstance(short_side, int) or short_side < 1:
        raise UsageError(f"the cache's short side must be a positive integer, got {short_side!r}")
    if max_gb is not None and not max_gb > 0:
        raise UsageError(f"--cache-max-gb must be positive, got {max_gb!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise UsageError(f"workers must be 0 or more, got {workers!r}")
    if mode == "none" or not samples:
        return None
    started = time.perf_counter()
    paths = [str(path) for path, _ in samples]
    key = cache_key(paths, short_side) if mode != "ram" else None
    found = open_disk_cache(key) if key is not None else None
    if found is None:
        bad = known_bad or {}
        sizes = np.zeros(len(paths), dtype=np.int64)
        todo = [i for i in range(len(paths)) if i not in bad]
        sizes[todo] = estimate_bytes([paths[i] for i in todo], short_side, workers)
        budget = int(max_gb * GB) if max_gb is not None else default_budget()
        chosen = _choose(mode, int(sizes.sum()), budget, image_cache_dir(), log)
        if chosen == "none":
            return None

        def fill(data_file: Path) -> tuple[torch.Tensor, dict[int, str]]:
            return _fill(paths, _Slots(sizes, file=data_file), short_side, workers, progress, bad)

        if chosen == "ram":
            buffer = torch.empty(int(sizes.sum()), dtype=torch.uint8)
            if buffer.numel():
                buffer.share_memory_()
            entries, reasons = _fill(paths, _Slots(sizes, shared=buffer), short_side, workers, progress, bad)
            cache = ImageCache("ram", entries.share_memory_(), reasons, data=buffer)
        else:
            key = key or cache_key(paths, short_side)
            cache = _disk_cache(write_disk_cache(paths, int(sizes.sum()), key, short_side, fill, log))
        how = f"{cache.mode}" + (f" in {cache.folder}" if cache.folder is not None else "")
    else:
        cache, how = found, f"disk, reused {found.folder}"
    notes = []
    if cache.missing:
        notes.append(f"{cache.missing:,} unreadable")
    uncached = int((cache.entries[:, 1] == _UNCACHED).sum())
    if uncached:
        notes.append(f"{uncached:,} read from their files")
    extra = f" ({', '.join(notes)})" if notes else ""
    log(f"image cache: {how}, {format_bytes(cache.nbytes)}, {len(cache):,} images{extra}, "
        f"{_size_note(cache.entries, short_side)}, {time.perf_counter() - started:.1f}s")
    return cache


def _size_note(entries: torch.Tensor, short_side: int) -> str:
    """What the resize did: images are only ever shrunk, so small ones keep their own size."""
    stored = entries[entries[:, 1] > 0][:, 1:3]
    if not len(stored):
        return f"short side up to {short_side}px"
    shorts = stored.min(dim=1).values
    shrunk = int((shorts == short_side).sum())
    if shrunk == len(shorts):
        return f"shrunk to a short side of {short_side}px"
    if shrunk == 0:
        return f"kept at their own size (short side up to {int(shorts.max())}px, within the {short_side}px limit)"
    return f"{shrunk:,} shrunk to a short side of {short_side}px, {len(shorts) - shrunk:,} smaller kept at their size"
