"""Hashes of image files: what check-data's duplicate search and train's leakage line compare.

Two facts per file, each remembered per file as the scan remembers its verdicts
(:mod:`cnntrain.data.scan`): by (absolute path, size, mtime_ns), in
``hash_cache_dir()/<hash of the dataset root>.<kind>.json``, so a second run reads no file
that has not changed.

- The **content hash**, BLAKE2b of the bytes: equal hashes mean byte-identical files, an exact
  duplicate. It needs nothing but hashlib and one read per file, so ``train`` can afford it
  for its leakage warning.
- The **picture**: width and height as training sees them (EXIF orientation applied), two
  64-bit perceptual hashes from imagehash (the ``check`` extra) and a colour thumbnail. pHash is
  the signs of the low frequencies of a 32x32 grey thumbnail's DCT, dHash the signs of the
  horizontal gradients of a 9x8 one: a resized, re-encoded or slightly cropped copy moves them a
  few bits, unrelated pictures differ in about half. Both see only grey, so a red circle and a
  blue one at the same place hash alike; the colour thumbnail (4x4 cells, RGB, Pillow's box
  filter) tells them apart. That comparison is written here because imagehash's ``colorhash`` (a
  quantised hue histogram) could not: measured, copies lay up to 6 bits apart and look-alikes
  5 to 9. Only check-data computes pictures, in worker processes for large folders, and a file
  read for its picture gets its content hash from the same read.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from PIL import ExifTags, Image, ImageOps
from torch.utils.data import Dataset
from tqdm import tqdm

from cnntrain import fileio
from cnntrain.data.decode import TEXT_LIMIT, to_rgb
from cnntrain.data.loader import default_workers
from cnntrain.data.pool import POOL_THRESHOLD, run_in_workers
from cnntrain.errors import MissingDependencyError, first_line
from cnntrain.paths import hash_cache_dir

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
CONTENT_BYTES = 16  # 128-bit BLAKE2b: no accidental collision in any dataset that fits on a disk
#: JPEGs are decoded at the smallest DCT scale that keeps at least this many pixels a side
#: (Pillow's ``draft``): several times faster than a full decode, and pHash looks at 32x32 anyway.
DRAFT_SIDE = 128
_SIDEWAYS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
COLOUR_CELLS = 4  # the colour thumbnail is 4x4 cells: layout without detail


@dataclass(frozen=True)
class Picture:
    """A file's size as training sees it, its perceptual hashes and colour thumbnail (None without imagehash)."""

    width: int
    height: int
    phash: str | None = None
    dhash: str | None = None
    colour: str | None = None  # hex of the COLOUR_CELLS x COLOUR_CELLS RGB thumbnail, row by row

    def thumbnail(self) -> bytes:
        return bytes.fromhex(self.colour or "")


@dataclass
class FileHashes:
    """What :func:`hash_files` found, keyed by the paths it was given."""

    content: dict[str, str]  # hex BLAKE2b of the bytes
    pictures: dict[str, Picture]  # only when pictures were asked for
    failed: dict[str, str]  # a reason per file that could not be read (changed since the scan?)
    perceptual: bool  # whether pictures carry perceptual hashes (imagehash is installed)
    read: int = 0  # files read this time; the others came from the cache
    seconds: float = field(default=0.0, compare=False)


def imagehash_version() -> str | None:
    """The installed imagehash's version, or None without the ``check`` extra. Imports nothing:
    imagehash loads scipy, seconds that a second run, whose hashes are all cached, need not spend."""
    try:
        return importlib.metadata.version("imagehash")
    except importlib.metadata.PackageNotFoundError:
        return None


def load_imagehash() -> ModuleType:
    """The imagehash module, for the files that need hashing; an installed but broken one is an error."""
    try:
        import imagehash
    except ImportError as e:
        raise MissingDependencyError(f"imagehash is installed but cannot be imported ({first_line(e)}); reinstall "
                                     "it: pip install --force-reinstall 'cnntrain[check]'") from e
    return imagehash


class FileCache:
    """Values per file, remembered by (absolute path, size, mtime_ns) in one JSON file.

    The scan cache's scheme: a file whose size or mtime changed is measured again; before the
    file is written it is read again under a lock and merged, so two runs on one dataset keep
    each other's entries; entries of files that are gone are dropped. ``identity`` names what
    the values depend on besides the file (library versions): a file written under another
    identity is ignored. A cache that cannot be read or written only costs time.
    """

    def __init__(self, path: Path, identity: str) -> None:
        self.path, self.identity = path, identity
        self.entries = self._load()
        self.new: dict[str, list[Any]] = {}

    def _load(self) -> dict[str, list[Any]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("version") == CACHE_VERSION and data.get("identity") == self.identity:
                return {k: v for k, v in data["files"].items() if isinstance(v, list) and len(v) >= 2}
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            pass
        return {}

    def get(self, key: str, stamp: tuple[int, int]) -> list[Any] | None:
        """The values stored for ``key`` if its file still has this (size, mtime_ns), else None."""
        entry = self.entries.get(key)
        if entry is not None and entry[0] == stamp[0] and entry[1] == stamp[1]:
            return entry[2:]
        return None

    def put(self, key: str, stamp: tuple[int, int], values: Sequence[Any]) -> None:
        self.new[key] = [*stamp, *values]

    def save(self, current: set[str]) -> None:
        """Merge the new entries into the file; ``current``: the keys this run looked at."""
        if not self.new:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with fileio.exclusive_lock(self.path.with_name(f".{self.path.name}.lock")):
                merged = {**self._load(), **self.new}
                merged = {k: v for k, v in merged.items() if k in current or os.path.exists(k)}
                data = {"version": CACHE_VERSION, "identity": self.identity, "files": merged}
                fileio.atomic_write_text(self.path, json.dumps(data, separators=(",", ":")))
        except OSError as e:
            logger.debug("could not write the hash cache %s: %s", self.path, e)


def _cache_stem(abspaths: Sequence[str]) -> str:
    """A name for the dataset's cache files: a hash of the folder holding every file."""
    folders = sorted({os.path.dirname(p) for p in abspaths})
    try:
        root = os.path.commonpath(folders)
    except ValueError:  # different drives (Windows)
        root = "\n".join(folders)
    return hashlib.sha256(root.encode("utf-8", "surrogateescape")).hexdigest()[:20]


def picture_identity(imagehash: str | None) -> str:
    """What a picture entry depends on: Pillow (decoding, resizing), imagehash's version and the draft size."""
    return f"pillow {Image.__version__} imagehash {imagehash or 'none'} draft {DRAFT_SIDE} colour {COLOUR_CELLS}"


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # noqa: BLE001 - broken EXIF must not cost the image (decode.py does the same)
        return 1


def measure_picture(data: bytes, hasher: ModuleType | None) -> Picture:
    """Size and, with ``hasher`` (imagehash), perceptual hashes of an image file's bytes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # corrupt EXIF and the like: the scan already accepted the file
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if _orientation(img) in _SIDEWAYS:
                width, height = height, width
            if hasher is None:
                return Picture(width, height)
            img.draft("RGB", (DRAFT_SIDE, DRAFT_SIDE))
            try:
                upright = ImageOps.exif_transpose(img)
            except Exception:  # noqa: BLE001 - as above: hash it the way it is stored
                upright = img
            rgb = to_rgb(upright)  # transparency onto the background, as training sees it
            colour = rgb.resize((COLOUR_CELLS, COLOUR_CELLS), Image.Resampling.BOX).tobytes().hex()
            return Picture(width, height, str(hasher.phash(rgb)), str(hasher.dhash(rgb)), colour)


def read_file(path: str, pictures: bool, perceptual: bool) -> tuple[str | None, Picture | None, str | None]:
    """``(content hash, picture or None, None)``, or a reason in the last place when it fails;
    ``perceptual``: the picture gets perceptual hashes too."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return None, None, first_line(e.strerror or e, TEXT_LIMIT)
    digest = hashlib.blake2b(data, digest_size=CONTENT_BYTES).hexdigest()
    if not pictures:
        return digest, None, None
    try:
        return digest, measure_picture(data, load_imagehash() if perceptual else None), None
    except Exception as e:  # noqa: BLE001 - Pillow raises many types; the file changed since the scan
        return digest, None, first_line(e, TEXT_LIMIT, with_type=True)


class _Reads(Dataset):
    """Lets a DataLoader run :func:`read_file` in worker processes."""

    def __init__(self, paths: list[str], pictures: bool, perceptual: bool) -> None:
        self.paths, self.pictures, self.perceptual = paths, pictures, perceptual

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[str | None, Picture | None, str | None]:
        return read_file(self.paths[index], self.pictures, self.perceptual)


def _read_all(paths: list[str], pictures: bool, perceptual: bool, workers: int | None, progress: bool
              ) -> Iterator[tuple[str | None, Picture | None, str | None]]:
    """:func:`read_file` of every path, in order. Content hashes alone are cheap (one read, no
    decode): worker processes would cost more to start than they save, so they run here."""
    if workers is None:
        big = pictures and len(paths) >= POOL_THRESHOLD
        workers = min(default_workers(), max(1, len(paths) // 256)) if big else 0
    with tqdm(total=len(paths), desc="hashing images", unit="img", disable=not progress, leave=False) as bar:
        for result in run_in_workers(_Reads(paths, pictures, perceptual), min(workers, len(paths)), batch_size=32):
            yield result
            bar.update()


def hash_files(paths: Sequence[str], *, pictures: bool = False, cache: bool = True, workers: int | None = None,
               progress: bool = False) -> FileHashes:
    """Content hashes of ``paths`` and, with ``pictures``, their :class:`Picture`, cached per file.

    ``workers``: processes that read and hash (default: none for content hashes or below
    ``POOL_THRESHOLD`` files, else up to ``default_workers()``). Files that cannot be read
    are in ``failed`` with a reason and nowhere else."""
    start = time.perf_counter()
    version = imagehash_version() if pictures else None
    unique = list(dict.fromkeys(paths))
    absolute = {p: os.path.abspath(p) for p in unique}
    stem = _cache_stem(list(absolute.values())) if unique else ""
    contents = FileCache(hash_cache_dir() / f"{stem}.content.json", "blake2b-128") if cache and unique else None
    shapes = (FileCache(hash_cache_dir() / f"{stem}.pictures.json", picture_identity(version))
              if cache and unique and pictures else None)
    found = FileHashes({}, {}, {}, perceptual=version is not None)
    stamps: dict[str, tuple[int, int]] = {}
    for path in unique:
        try:
            st = os.stat(absolute[path])
        except OSError as e:
            found.failed[path] = first_line(e.strerror or e, TEXT_LIMIT)
            continue
        stamps[path] = (st.st_size, st.st_mtime_ns)
        known = contents.get(absolute[path], stamps[path]) if contents else None
        seen = shapes.get(absolute[path], stamps[path]) if shapes else None
        if known is not None and (seen is not None or not pictures):
            found.content[path] = known[0]
            if seen is not None:
                found.pictures[path] = Picture(*seen)
    todo = [p for p in stamps if p not in found.content]
    if todo and found.perceptual:
        load_imagehash()  # a broken install fails here, in one line, not as a reason per file
    reads = _read_all(todo, pictures, found.perceptual, workers, progress)
    for path, (digest, picture, reason) in zip(todo, reads):
        if reason is not None:
            found.failed[path] = reason
            continue
        assert digest is not None
        found.content[path] = digest
        if contents:
            contents.put(absolute[path], stamps[path], [digest])
        if picture is not None:
            found.pictures[path] = picture
            if shapes:
                shapes.put(absolute[path], stamps[path], [picture.width, picture.height, picture.phash,
                                                          picture.dhash, picture.colour])
    for store in (contents, shapes):
        if store is not None:
            store.save(set(absolute.values()))
    found.read, found.seconds = len(todo), time.perf_counter() - start
    return found
