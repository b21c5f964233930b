"""The data options (``--data-path``, ``--labels``, ``--dataset``) turned into splits, in one place.

``train``, ``lr-find``, ``eval``, ``check-data`` and ``export --int8`` all read their data through
:func:`load_data`, so a label file, a folder and a built-in dataset give each of them the same
splits from the same options.
"""

from __future__ import annotations

import os

from cnntrain.data.builtins import load_builtin
from cnntrain.data.datasets import DatasetSplits, load_folder
from cnntrain.data.labelfile import load_label_file
from cnntrain.errors import UsageError


def load_data(data_path: str | os.PathLike | None, dataset: str | None, labels: str | os.PathLike | None = None,
              *, val_split: float = 0.1, seed: int = 0) -> DatasetSplits:
    """A label file (its paths under ``data_path`` when given), else a folder, else a built-in dataset
    (``shapes`` when nothing is named). Unreadable files are still in the splits: the scan finds them."""
    if labels is not None and dataset is not None:
        raise UsageError("--labels lists your own images; give it with --data-path DIR (the folder its paths are "
                         "relative to) or alone, not with --dataset")
    if labels is not None:
        return load_label_file(labels, data_path, val_split=val_split, seed=seed)
    if data_path is not None:
        return load_folder(data_path, val_split=val_split, seed=seed)
    return load_builtin(dataset or "shapes", val_split=val_split, seed=seed)
