"""The run's data: a folder, a label file or a built-in dataset, split, with unreadable images left out."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from cnntrain.config import DATASET_DEFAULTS, describe_defaults
from cnntrain.data import DatasetSplits, load_data, scan_samples
from cnntrain.data.scan import Reader
from cnntrain.errors import DataError

Log = Callable[[str], None]


def load_splits(data_path: str | None, dataset: str | None, *, val_split: float, seed: int, strict: bool,
                labels: str | None = None, info: Log = lambda s: None, warn: Log = lambda s: None,
                progress: bool = False, reader: Reader | None = None) -> DatasetSplits:
    """Train and val samples, every image decoded once first (cached) so one bad file cannot end a run.

    ``info`` gets what is being done, ``warn`` what went wrong but was survived (shown even with --quiet).
    ``reader``: the pass that decodes every image anyway (the image cache, ``pipeline.FirstPass``),
    which the scan then takes its verdicts from instead of decoding each file a second time."""
    if not data_path and not labels and dataset is None:
        own = describe_defaults(DATASET_DEFAULTS["shapes"])
        info("no --data-path or --dataset given: training on the built-in offline dataset `shapes`, "
             f"with its own defaults where no option says otherwise ({own})")
    splits = load_data(data_path or None, dataset, labels, val_split=val_split, seed=seed)
    return drop_unreadable(splits, strict, warn, progress, reader)


def check_trainable(splits: DatasetSplits) -> None:
    """Checked by every rank after the splits are loaded (rank 0 alone loads them first)."""
    if len(splits.train) < 2:
        raise DataError(f"only {len(splits.train)} training image(s) found; training needs at least 2")


def drop_unreadable(splits: DatasetSplits, strict: bool, warn: Log, progress: bool = False,
                    reader: Reader | None = None) -> DatasetSplits:
    scan = scan_samples(splits.train + splits.val, strict=strict, progress=progress, reader=reader)
    warning = scan.warning()
    if warning is None:
        return splits
    warn(f"warning: {warning}")
    good = {path for path, _ in scan.good}
    train = [s for s in splits.train if s[0] in good]
    empty = sorted(set(splits.classes) - {splits.classes[label] for _, label in train})
    if empty:
        raise DataError(f"class {', '.join(empty)} has no readable training images left; add images or remove "
                        "the folder")
    return dataclasses.replace(splits, train=train, val=[s for s in splits.val if s[0] in good])
