"""Data: image folders and built-in datasets, uint8 transforms, on-device normalisation, loaders.

Datasets yield ``(uint8 3xHxW tensor, int label)``, decoded from their files or read from an
:class:`ImageCache`; batches travel to the device as uint8 and :class:`Normalize` makes them
float there (see DESIGN.md, "The input path").
"""

from cnntrain.data.builtins import BUILTIN_DATASETS, load_builtin
from cnntrain.data.dataset_download import download_verified, extract_tar, verify_file
from cnntrain.data.datasets import (
    IMG_EXTENSIONS,
    DatasetSplits,
    ImageDataset,
    Unreadable,
    decode_image,
    load_folder,
    scan_classes,
    split_samples,
)
from cnntrain.data.decode import ImageDecodeError
from cnntrain.data.imagecache import ImageCache, build_image_cache
from cnntrain.data.labelfile import load_label_file
from cnntrain.data.loader import collate_skipping, default_workers, make_loader, seed_worker
from cnntrain.data.scan import ScanResult, scan_samples
from cnntrain.data.shapes import SHAPE_CLASSES, generate_shapes
from cnntrain.data.source import load_data
from cnntrain.data.transforms import (
    AUGMENTATIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Normalize,
    eval_transform,
    train_transform,
)

__all__ = [
    "AUGMENTATIONS",
    "BUILTIN_DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMG_EXTENSIONS",
    "SHAPE_CLASSES",
    "DatasetSplits",
    "ImageCache",
    "ImageDataset",
    "ImageDecodeError",
    "Normalize",
    "ScanResult",
    "Unreadable",
    "collate_skipping",
    "decode_image",
    "build_image_cache",
    "default_workers",
    "download_verified",
    "eval_transform",
    "extract_tar",
    "generate_shapes",
    "load_builtin",
    "load_data",
    "load_folder",
    "load_label_file",
    "make_loader",
    "scan_samples",
    "scan_classes",
    "seed_worker",
    "split_samples",
    "train_transform",
    "verify_file",
]
