"""DataLoader construction: workers, pinning and seeding in one place.

Reproducibility: shuffling draws from a ``torch.Generator`` seeded with ``seed``. Each worker's
torch seed is ``base_seed + worker_id``, where PyTorch draws ``base_seed`` from that same
generator every epoch; :func:`seed_worker` copies it into Python's ``random`` and NumPy. So a
run with a given seed sees the same order and the same augmentations, and each epoch still
gets fresh ones. With ``workers=0`` augmentation uses the main process's global RNGs, which
the trainer seeds.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cnntrain.data.datasets import Unreadable
from cnntrain.errors import UsageError


def default_workers() -> int:
    """Loader worker processes by default: ``min(8, os.cpu_count() or 1)``."""
    return min(8, os.cpu_count() or 1)


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed ``random``, NumPy and torch from the worker's base seed + id."""
    seed = torch.initial_seed() % 2**32  # base_seed (from the loader's generator) + worker_id
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    workers: int,
    device: torch.device | str = "cpu",
    seed: int = 0,
    drop_last: bool = False,
    sampler: Sampler | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader:
    """Build a DataLoader yielding uint8 batches, reproducible for a given ``seed``.

    Memory is pinned when ``device`` is CUDA (so ``.to(device, non_blocking=True)`` overlaps);
    workers persist across epochs when ``workers > 0``. ``drop_last`` defaults to False: the
    last partial batch is never dropped unless asked. ``sampler`` (e.g. DistributedSampler) is
    passed through and requires ``shuffle=False``. A batch size larger than the dataset is fine.
    ``collate_fn`` replaces PyTorch's default, e.g. :func:`collate_skipping` for a dataset built
    with ``skip_unreadable=True``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch size must be a positive integer, got {batch_size!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise UsageError(f"workers must be 0 or more, got {workers!r}; 0 loads in the main process")
    if sampler is not None and shuffle:
        raise UsageError("shuffle and a sampler cannot be combined; let the sampler shuffle")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UsageError(f"unknown device {device!r}; use e.g. cpu, cuda or cuda:0") from e
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=drop_last,
        persistent_workers=workers > 0,
        worker_init_fn=seed_worker,
        generator=generator,
        collate_fn=collate_fn,
    )


def collate_skipping(batch: list[Any]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Collate ``(image, label)`` items, dropping :class:`Unreadable` markers.

    Returns ``(uint8 NCHW images, int64 targets, skipped paths)``. When every item failed the
    images are an empty ``(0, 3, 0, 0)`` tensor and the targets empty, so a loop can skip the
    batch instead of crashing; an epoch goes on with the files that can still be read.
    """
    good = [item for item in batch if not isinstance(item, Unreadable)]
    skipped = [item.path for item in batch if isinstance(item, Unreadable)]
    if not good:
        return torch.empty((0, 3, 0, 0), dtype=torch.uint8), torch.empty(0, dtype=torch.long), skipped
    images = torch.stack([image for image, _ in good])
    targets = torch.as_tensor([int(label) for _, label in good], dtype=torch.long)
    return images, targets, skipped
