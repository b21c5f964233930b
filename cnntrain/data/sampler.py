"""Epoch-seeded sampling: every shuffle and every random augmentation is a pure function of
(seed, epoch, sample), so a run gives the same batches whatever the number of workers, and a
resumed run continues exactly as if it had never stopped.

Under torchrun the same order is split between ranks the way ``DistributedSampler`` does it
(padded to a multiple of the world size, then every ``world_size``-th item), so N ranks with
batch B draw, step by step, exactly the samples one process with batch N x B would draw.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence, Sized

import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

from cnntrain.runtime import seed_cpu


def balanced_weights(labels: Sequence[int]) -> torch.Tensor:
    """Per-sample weights under which every class present is drawn equally often."""
    labels_t = torch.as_tensor(list(labels), dtype=torch.long)
    counts = torch.bincount(labels_t).double()
    return (1.0 / counts)[labels_t]


class EpochSampler(DistributedSampler):
    """Yields ``(sample_seed, index)`` for this rank; call ``set_epoch`` before each epoch.

    ``weights`` (one per sample): draw the epoch's ``len(data)`` items with replacement in
    proportion to them, as ``WeightedRandomSampler`` does (e.g. ``balanced_weights``), from the
    same per-(seed, epoch) generator, so resumed and same-seed runs draw the same items, and
    every rank agrees on the draw before taking its share."""

    def __init__(self, data: Sized, *, shuffle: bool, seed: int = 0, num_replicas: int = 1, rank: int = 0,
                 weights: torch.Tensor | None = None) -> None:
        super().__init__(data, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)  # type: ignore[arg-type]
        self.size = len(data)
        self.skip = 0
        if weights is not None and len(weights) != self.size:
            raise ValueError(f"{len(weights)} sampling weights for {self.size} samples")
        self.weights = weights

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """``skip`` this rank's first samples of the epoch (resuming a run stopped mid-epoch)."""
        super().set_epoch(epoch)
        self.skip = min(max(skip, 0), self.num_samples)

    def __len__(self) -> int:
        return self.num_samples - self.skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.size, replacement=True, generator=gen)
        else:
            order = torch.randperm(self.size, generator=gen) if self.shuffle else torch.arange(self.size)
        # One 63-bit seed per sample, drawn from the same epoch generator.
        seeds = torch.randint(0, 2**62, (self.size,), generator=gen)
        items = list(zip(seeds.tolist(), order.tolist()))
        if self.total_size > self.size:  # pad with the first items so every rank takes as many steps
            items += (items * math.ceil(self.total_size / self.size))[: self.total_size - self.size]
        return iter(items[self.rank:self.total_size:self.num_replicas][self.skip:])


class ShardSampler(Sampler[int]):
    """Every ``num_replicas``-th index from ``rank``, no padding: evaluation sees each sample
    exactly once across ranks, so summed metrics are over the whole set."""

    def __init__(self, data: Sized, *, num_replicas: int = 1, rank: int = 0) -> None:
        self.indices = range(rank, len(data), num_replicas)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


class SeededDataset(Dataset):
    """Runs the wrapped dataset's random transforms under the seed the sampler chose."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]):
        sample_seed, index = key
        with torch.random.fork_rng(devices=[]):
            seed_cpu(sample_seed)  # only the CPU's: fork_rng(devices=[]) restores no CUDA generator
            return self.dataset[index]
