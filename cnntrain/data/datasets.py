"""Image-folder datasets: scanning, train/val splits and decoding to uint8 tensors.

Every dataset, built-in or not, ends up as files in folders, ``DIR/<class>/**/*.jpg``, either
pre-split (``DIR/train/<class>`` and ``DIR/val/<class>``) or split here by class. A split is a
plain list of ``(path, label)`` pairs, so it is cheap to store, print and check.

Datasets yield ``(uint8 CHW tensor, int label)``. Normalisation is deliberately *not* a dataset
transform: it runs on the device after the (4x smaller) uint8 batch has been copied, see
:class:`cnntrain.data.transforms.Normalize`.

The built-in datasets (``load_builtin``, ``BUILTIN_DATASETS``) live in
:mod:`cnntrain.data.builtins` and are importable from here too.
"""

from __future__ import annotations

import logging
import os
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from cnntrain.data.decode import TEXT_LIMIT, ImageDecodeError, decode_image
from cnntrain.data.imagecache import ImageCache
from cnntrain.errors import DataError, UsageError, first_line

logger = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
VAL_FOLDER_NAMES = ("val", "valid", "validation", "test")
_LAYOUT_HINT = "expected one sub-folder per class, e.g. DIR/daisy/*.jpg"


def is_hidden(name: str) -> bool:
    """Dot entries (``.ipynb_checkpoints``, ``.DS_Store``, ``._x.jpg``) and ``__MACOSX``."""
    return name.startswith(".") or name == "__MACOSX"


def is_image_file(name: str) -> bool:
    return not is_hidden(name) and os.path.splitext(name)[1].lower() in IMG_EXTENSIONS


def _check_folder(path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"dataset folder {path} does not exist; check the path ({_LAYOUT_HINT})")
    if not path.is_dir():
        raise DataError(f"{path} is a file, not a folder; pass the dataset folder ({_LAYOUT_HINT})")
    return path


def _subfolders(path: Path) -> list[str]:
    try:
        with os.scandir(path) as entries:
            return sorted(e.name for e in entries if not is_hidden(e.name) and e.is_dir())
    except OSError as e:
        raise DataError(f"cannot read folder {path}: {e.strerror or e}; check its permissions") from e


def _walk_images(top: Path, root: Path) -> list[str]:
    """Image files under ``top``, recursively, following symlinks but refusing loops.

    A directory whose real path is already on the current chain (``root``, ``top`` and the
    ancestors walked so far) is a loop. Two links to the same folder elsewhere are not a loop;
    their images simply appear twice, as the tree says.
    """

    def onerror(e: OSError) -> None:
        raise DataError(f"cannot read folder {e.filename}: {e.strerror or e}; check its permissions")

    chains = {str(top): frozenset({os.path.realpath(root), os.path.realpath(top)})}
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(top, onerror=onerror, followlinks=True):
        chain = chains.pop(dirpath)
        keep = []
        for d in sorted(dirnames):
            if is_hidden(d):
                continue
            sub = os.path.join(dirpath, d)
            real = os.path.realpath(sub)
            if real in chain:
                raise DataError(
                    f"symlink loop at {sub} (it leads back to {real}); remove the link and retry"
                )
            chains[sub] = chain | {real}
            keep.append(d)
        dirnames[:] = keep
        found.extend(os.path.join(dirpath, f) for f in filenames if is_image_file(f))
    found.sort(key=lambda p: os.path.relpath(p, top).replace(os.sep, "/"))
    return found


def scan_classes(root: str | os.PathLike) -> tuple[list[str], list[tuple[str, int]]]:
    """Scan an ImageFolder tree: ``(sorted class names, sorted (path, label) samples)``.

    Hidden entries are never classes or samples; files at the top level are ignored; each class
    folder is walked recursively. Raises :class:`DataError` for a missing path, a file, a folder
    without class sub-folders, no images at all, or class folders without images.
    """
    root = _check_folder(root)
    classes = _subfolders(root)
    if not classes:
        raise DataError(f"no class folders in {root}: {_LAYOUT_HINT}")
    per_class = [_walk_images(root / name, root) for name in classes]
    if not any(per_class):
        raise DataError(
            f"no images in {root} (looked for {', '.join(IMG_EXTENSIONS)}); {_LAYOUT_HINT}"
        )
    empty = [name for name, files in zip(classes, per_class) if not files]
    if empty:
        names = ", ".join(repr(n) for n in empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise DataError(
            f"class folder{'s' if len(empty) > 1 else ''} {names} in {root} "
            f"{'have' if len(empty) > 1 else 'has'} no images; add images or remove the folder"
        )
    samples = [(path, label) for label, files in enumerate(per_class) for path in files]
    return classes, samples


@dataclass
class DatasetSplits:
    """Classes and the ``(path, label)`` lists of each split, plus where they came from."""

    classes: list[str]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    root: str
    description: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def summary(self) -> str:
        """A few lines: the source, the classes, and images and classes per split."""
        names = ", ".join(self.classes[:8]) + (", ..." if len(self.classes) > 8 else "")
        lines = [self.description, f"{len(self.classes)} classes: {names}"]
        for split, samples in (("train", self.train), ("val", self.val)):
            counts = Counter(label for _, label in samples)
            line = f"{split + ':':6} {len(samples):,} images, {len(counts)} classes"
            if counts:
                line += f" ({min(counts.values()):,} to {max(counts.values()):,} per class)"
            missing = [name for label, name in enumerate(self.classes) if label not in counts]
            if samples and missing:
                names = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
                line += f"; no {split} images of class{'es' if len(missing) > 1 else ''} {names}"
            if split == "val" and not samples:
                line += " (nothing held out: val_split=0 or one image per class; runs are judged on train accuracy)"
            lines.append(line)
        return "\n".join(lines)


def _check_val_split(val_split: float) -> float:
    if isinstance(val_split, bool) or not isinstance(val_split, (int, float)) or not 0 <= val_split < 1:
        raise UsageError(
            f"val_split must be in [0, 1), got {val_split!r}; e.g. 0.1 holds out 10% of each class"
        )
    return float(val_split)


def split_samples(
    classes: Sequence[str], samples: Sequence[tuple[str, int]], val_split: float, seed: int = 0
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Stratified, deterministic split: per class, shuffle with ``Random(f"{seed}:{class}")``.

    ``round(n * val_split)`` images of a class go to val, but at least one stays in train and a
    class with two or more images gives at least one to val when ``val_split > 0``. Seeding per
    class name means adding a class leaves the split of the others unchanged.
    """
    val_split = _check_val_split(val_split)
    by_label: dict[int, list[tuple[str, int]]] = {}
    for path, label in samples:
        by_label.setdefault(label, []).append((path, label))
    train: list[tuple[str, int]] = []
    val: list[tuple[str, int]] = []
    for label, items in sorted(by_label.items()):
        items = sorted(items)
        n = len(items)
        n_val = round(n * val_split)
        if val_split > 0 and n >= 2:
            n_val = max(1, n_val)
        n_val = min(n_val, n - 1)
        random.Random(f"{seed}:{classes[label]}").shuffle(items)
        val.extend(sorted(items[:n_val]))
        train.extend(sorted(items[n_val:]))
    return train, val


def _percent(x: float) -> str:
    return f"{round(x * 100, 2):g}"


def find_presplit(path: str | os.PathLike) -> tuple[Path, Path] | None:
    """``(train_dir, val_dir)`` when ``path`` has ``train/`` and a val/valid/validation/test folder."""
    path = Path(path)
    if not (path / "train").is_dir():
        return None
    for name in VAL_FOLDER_NAMES:
        if (path / name).is_dir():
            return path / "train", path / name
    return None


def load_folder(path: str | os.PathLike, val_split: float = 0.1, seed: int = 0) -> DatasetSplits:
    """Load an image folder, pre-split (``train/`` + ``val/``-like) or split here by class.

    With ``train/`` and one of ``val/``, ``valid/``, ``validation/``, ``test/`` (first found, in
    that order) those are the splits and ``val_split``/``seed`` are unused; their class sets must
    match. A folder holding only ``train/`` is split from ``train/``. Otherwise ``path`` itself is
    the class folder and is split with :func:`split_samples`; ``val_split=0`` gives no val set.
    """
    val_split = _check_val_split(val_split)
    path = _check_folder(path)
    presplit = find_presplit(path)
    if presplit is not None:
        train_dir, val_dir = presplit
        classes, train = scan_classes(train_dir)
        val_classes, val = scan_classes(val_dir)
        if classes != val_classes:
            only_train = sorted(set(classes) - set(val_classes))
            only_val = sorted(set(val_classes) - set(classes))
            diff = "; ".join(
                f"only in {where}/: {', '.join(names[:10])}{' ...' if len(names) > 10 else ''}"
                for where, names in (("train", only_train), (val_dir.name, only_val)) if names
            )
            raise DataError(
                f"train/ and {val_dir.name}/ in {path} have different classes ({diff}); "
                "give both the same class folders"
            )
        return DatasetSplits(classes, train, val, str(path),
                             f"folder {path} (pre-split train/ and {val_dir.name}/)")
    source = path
    if _subfolders(path) == ["train"]:
        source = path / "train"
    classes, samples = scan_classes(source)
    train, val = split_samples(classes, samples, val_split, seed)
    if val_split == 0:
        description = f"folder {source}, no validation split (val_split=0)"
    else:
        description = (f"folder {source} split {_percent(1 - val_split)}/{_percent(val_split)} "
                       f"by class, seed {seed}")
    return DatasetSplits(classes, train, val, str(path), description)


@dataclass(frozen=True)
class Unreadable:
    """What :class:`ImageDataset` yields, with ``skip_unreadable=True``, for a file it cannot read.

    A plain picklable value, so it crosses DataLoader workers and ``SeededDataset`` unchanged;
    :func:`cnntrain.data.loader.collate_skipping` drops it from the batch and reports ``path``.
    """

    label: int
    path: str
    reason: str


class ImageDataset(torch.utils.data.Dataset):
    """``(path, label)`` samples -> ``(uint8 3xHxW tensor, label)``, ``transform`` applied.

    With ``skip_unreadable=True`` a file that cannot be decoded (deleted, truncated or replaced
    after the scan) yields an :class:`Unreadable` marker and one warning line instead of
    raising, so one bad file cannot end an epoch; pair it with ``collate_skipping``.

    With ``cache`` (built by :func:`~cnntrain.data.imagecache.build_image_cache` for exactly
    these samples, in this order) images come from the cache instead of their files; a file
    that could not be decoded when the cache was built is unreadable here just the same.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        *,
        skip_unreadable: bool = False,
        cache: ImageCache | None = None,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.skip_unreadable = skip_unreadable
        if cache is not None and len(cache) != len(self.samples):
            raise UsageError(f"the image cache holds {len(cache)} images but the dataset has {len(self.samples)}; "
                             "build the cache for exactly this sample list")
        self.cache = cache

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | Unreadable:
        path, label = self.samples[index]
        try:
            image = self.cache.get(index, path) if self.cache is not None else None
            if image is None:
                image = decode_image(path)
        except DataError as e:
            if not self.skip_unreadable:
                raise
            reason = e.reason if isinstance(e, ImageDecodeError) else str(e)
            reason = first_line(reason, TEXT_LIMIT)
            logger.warning("skipping unreadable image %s: %s", first_line(path, TEXT_LIMIT), reason)
            return Unreadable(label, str(path), reason)
        if self.transform is not None:
            image = self.transform(image)
        return image, label

    def __repr__(self) -> str:
        skip = ", skip_unreadable=True" if self.skip_unreadable else ""
        cache = f", cache={self.cache!r}" if self.cache is not None else ""
        return f"{type(self).__name__}({len(self)} images, transform={self.transform!r}{skip}{cache})"
