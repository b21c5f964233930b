"""Built-in datasets by name: fetched or generated once into the cache, then plain folders.

``shapes`` is drawn locally (offline demo); ``flowers`` is TensorFlow's flower_photos archive
(downloaded, hash-checked, extracted safely); ``cifar10``/``cifar100`` come through torchvision's
downloaders and are exported once to PNG folders. After that, every built-in is read by
:func:`load_folder` like any user folder.
"""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import sys
import tempfile
import urllib.error
from pathlib import Path

from PIL import Image

from cnntrain.data.dataset_download import download_verified, extract_tar, publish_dir, verify_file
from cnntrain.data.datasets import DatasetSplits, _check_val_split, load_folder
from cnntrain.data.shapes import SHAPES_VERSION, generate_shapes
from cnntrain.errors import DataError, UsageError, first_line
from cnntrain.http_download import describe_failure
from cnntrain.paths import datasets_dir

BUILTIN_DATASETS = ("shapes", "flowers", "cifar10", "cifar100")

FLOWERS_URL = "https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz"
FLOWERS_SIZE = 228_813_984
FLOWERS_SHA256 = "4c54ace7911aaffe13a365c34f650e71dd5bf1be0a58b464e5a7183e3e595d9c"
FLOWERS_DIR = "flower_photos"
# Where torchvision fetches CIFAR from and the folder its archive holds (read from torchvision's
# classes; these are for a class that does not say).
_CIFAR = {
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-batches-py"),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "cifar-100-python"),
}


def load_builtin(
    name: str,
    val_split: float = 0.1,
    seed: int = 0,
    root: str | os.PathLike | None = None,
    download: bool = True,
) -> DatasetSplits:
    """Load a built-in dataset, fetching or generating it on first use.

    ``shapes`` and ``cifar10``/``cifar100`` come pre-split (``val_split``/``seed`` unused; CIFAR's
    val is its test split); ``flowers`` is split by class with ``val_split`` and ``seed``.
    ``download=False`` refuses network access (shapes is generated locally either way).
    """
    key = str(name).strip().lower()
    if key not in BUILTIN_DATASETS:
        raise UsageError(
            f"unknown built-in dataset {name!r}; choose one of {', '.join(BUILTIN_DATASETS)} "
            "or pass --data-path DIR"
        )
    _check_val_split(val_split)
    base = datasets_dir(root)
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(
            f"cannot create the dataset cache {base}: {e.strerror or e}; set CNNTRAIN_HOME to a writable folder"
        ) from e
    if key == "shapes":
        splits = load_folder(generate_shapes(base / SHAPES_VERSION), val_split, seed)
        splits.description = f"shapes (generated, 64x64) in {splits.root}, pre-split train/ and val/"
        return splits
    if key == "flowers":
        return _load_flowers(base, val_split, seed, download)
    return _load_cifar(key, base, download)


def _load_flowers(base: Path, val_split: float, seed: int, download: bool) -> DatasetSplits:
    final = base / FLOWERS_DIR
    by_hand = (f"download {FLOWERS_URL} by hand, extract it and pass "
               f"--data-path {final} (or any folder holding it)")
    if not final.is_dir():
        archive = base / "flower_photos.tgz"
        if download:
            download_verified(FLOWERS_URL, archive, FLOWERS_SHA256, FLOWERS_SIZE,
                              hint=f"check the network, or {by_hand}")
        elif not verify_file(archive, FLOWERS_SHA256, FLOWERS_SIZE):
            raise DataError(f"flowers is not in {base} and downloading is off; allow downloads, or {by_hand}")
        extract_tar(archive, base, FLOWERS_DIR)
        archive.unlink(missing_ok=True)  # 229 MB that is no longer needed
    splits = load_folder(final, val_split, seed)
    splits.description = f"flowers (TensorFlow flower_photos): {splits.description}"
    return splits


def _load_cifar(key: str, base: Path, download: bool) -> DatasetSplits:
    final = base / f"{key}-png"
    if not final.is_dir():
        import torchvision

        cls = torchvision.datasets.CIFAR10 if key == "cifar10" else torchvision.datasets.CIFAR100
        url, folder = getattr(cls, "url", _CIFAR[key][0]), getattr(cls, "base_folder", _CIFAR[key][1])
        by_hand = (f"download {url} by hand and extract it in {base}, so that {base / folder} holds its files, "
                   "or pass --data-path with a folder of images")
        failed = f"download of {key} from {url} failed"
        try:
            train = cls(str(base), train=True, download=download)
            test = cls(str(base), train=False, download=download)
        except RuntimeError as e:  # "Dataset not found or corrupted ...", or a download that failed its checksum
            if not download:
                raise DataError(f"{key} is not in {base} and downloading is off; allow downloads, or {by_hand}") from e
            raise DataError(f"{failed}: {first_line(e)}; check the network, or {by_hand}") from e
        except (urllib.error.URLError, ConnectionError, TimeoutError, socket.gaierror, http.client.HTTPException) as e:
            raise DataError(f"{failed}: {describe_failure(e, url)}; check the network, or {by_hand}") from e
        except OSError as e:  # our side: a full disk, a read-only folder
            raise DataError(f"cannot fetch {key} into {base}: {e.strerror or e}; set CNNTRAIN_HOME to a writable "
                            f"folder, or {by_hand}") from e
        export_png_folders(final, train.classes, {"train": (train.data, train.targets),
                                                  "test": (test.data, test.targets)})
    splits = load_folder(final)
    splits.description = f"{key} (PNG export) in {final}, val = the test split"
    return splits


def export_png_folders(dest: Path, classes, splits: dict) -> Path:
    """Write ``dest/<split>/<class>/NNNNN.png`` from ``{split: (NHWC uint8 array, labels)}``.

    Written to a hidden temporary sibling and renamed into place.
    """
    from tqdm.auto import tqdm

    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        for split, (images, labels) in splits.items():
            for name in classes:
                (tmp / split / name).mkdir(parents=True)
            for i, (image, label) in enumerate(tqdm(zip(images, labels), total=len(labels), leave=False, disable=None,
                                                    desc=f"exporting {dest.name}/{split}", file=sys.stderr)):
                Image.fromarray(image).save(tmp / split / classes[label] / f"{i:05d}.png")
        return publish_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
