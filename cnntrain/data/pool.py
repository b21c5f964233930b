"""Run a Dataset's items in worker processes, in order: the pool behind the scan and the image cache.

Checking every image (:mod:`cnntrain.data.scan`) and decoding every image into the cache
(:mod:`cnntrain.data.imagecache`) are the same job: a pure function of each file, thousands of
times. A DataLoader over a tiny Dataset does it in processes without a pool of our own: it
starts and joins the workers, reports a worker that crashed or was killed instead of hanging,
keeps the order, and is the machinery training already depends on (fork or spawn alike).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, Dataset

#: Below this many files, worker processes cost more to start than they save.
POOL_THRESHOLD = 512


def _as_list(batch: list[Any]) -> list[Any]:
    """The DataLoader's collate: keep a batch as the list of items (module level, so spawn can pickle it)."""
    return batch


def run_in_workers(dataset: Dataset, workers: int, *, batch_size: int = 8) -> Iterator[Any]:
    """Items of ``dataset`` in index order, computed in ``workers`` processes (0: in this one).

    ``batch_size`` items travel to this process at a time: small for big items (decoded
    images), larger for small ones (verdicts) to cut the per-batch overhead.
    """
    workers = min(workers, len(dataset))  # type: ignore[arg-type]  # no process without an item to compute
    if workers == 0:
        yield from (dataset[i] for i in range(len(dataset)))  # type: ignore[arg-type]
        return
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_as_list)
    for batch in loader:
        yield from batch
