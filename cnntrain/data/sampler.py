"""Epoch-seeded sampling: every shuffle and every random augmentation is a pure function of
(seed, epoch, sample), so a run gives the same batches whatever the number of workers, and a
resumed run continues exactly as if it had never stopped.
"""

from __future__ import annotations

from typing import Iterator, Sized

import torch
from torch.utils.data import Dataset, Sampler


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields ``(sample_seed, index)``; call ``set_epoch`` before each epoch."""

    def __init__(self, data: Sized, *, shuffle: bool, seed: int = 0) -> None:
        self.size = len(data)
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """``skip`` the first samples of this epoch's order (resuming a run stopped mid-epoch)."""
        self.epoch = epoch
        self.skip = min(max(skip, 0), self.size)

    def __len__(self) -> int:
        return self.size - self.skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=gen) if self.shuffle else torch.arange(self.size)
        # One 63-bit seed per sample, drawn from the same epoch generator.
        seeds = torch.randint(0, 2**62, (self.size,), generator=gen)
        return iter(list(zip(seeds.tolist(), order.tolist()))[self.skip:])


class SeededDataset(Dataset):
    """Runs the wrapped dataset's random transforms under the seed the sampler chose."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]):
        sample_seed, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            return self.dataset[index]
