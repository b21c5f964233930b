"""Label files: a CSV of ``path,label[,split]`` rows instead of one folder per class.

Kaggle-style datasets ship their images in one folder and the classes in a table. Such a file
becomes the same :class:`~cnntrain.data.datasets.DatasetSplits` a folder gives, so the scan,
the caches, the splits, the class order (sorted names, as folders sort) and the checkpoints are
the folder ones, unchanged.

Paths are relative to the file's own folder, or to ``--data-path`` when it is given (the images
and the table often live apart); absolute paths are kept. A ``split`` column, when there is one,
says ``train``, ``val`` or ``test`` per row: ``val`` rows are the validation split, or ``test``
rows when there are no ``val`` ones (as a folder's ``val/`` comes before its ``test/``); with no
held-out rows at all the train rows are split by class like a folder.

A listed file that does not exist is left to the scan, which skips it with the unreadable-image
warning (or fails under ``--strict``), as it does for a file deleted from a folder. When none
exists the paths are taken from the wrong place, and that is an error naming the base folder.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from cnntrain.data.datasets import DatasetSplits, split_samples
from cnntrain.errors import DataError, first_line

SPLIT_VALUES = ("train", "val", "test")
#: Rows quoted in an error that lists several.
_SHOWN = 3


@dataclass(frozen=True)
class _Row:
    line: int  # in the file, counting the header as line 1, for error messages
    path: str
    label: str
    split: str | None


def _open_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    """The header and the data rows; blank lines are skipped."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [row for row in csv.reader(f) if any(cell.strip() for cell in row)]
    except FileNotFoundError:
        raise DataError(f"label file {path} does not exist; check the path given to --labels") from None
    except IsADirectoryError:
        raise DataError(f"--labels takes a CSV file, and {path} is a folder; give the folder as --data-path "
                        "and the CSV as --labels") from None
    except UnicodeDecodeError:
        raise DataError(f"label file {path} is not UTF-8 text; save it as a UTF-8 CSV") from None
    except csv.Error as e:
        raise DataError(f"label file {path} is not a readable CSV ({e}); save it as a comma-separated table") from None
    except OSError as e:
        raise DataError(f"cannot read label file {path}: {e.strerror or e}") from None
    if not rows:
        raise DataError(f"label file {path} is empty; it needs a header row 'path,label' and one row per image")
    return [cell.strip().lower() for cell in rows[0]], rows[1:]


def _columns(path: Path, header: list[str]) -> tuple[int, int, int | None]:
    """The indices of the path, label and (optional) split columns, by header name."""
    missing = [name for name in ("path", "label") if name not in header]
    if missing:
        found = ", ".join(repr(h) for h in header if h) or "none"
        raise DataError(f"label file {path} has no {' or '.join(repr(m) for m in missing)} column (its header has "
                        f"{first_line(found, 200)}); its first row must name the columns path and label, and "
                        "optionally split")
    return header.index("path"), header.index("label"), header.index("split") if "split" in header else None


def _cell(cells: list[str], i: int | None) -> str:
    """Column ``i`` of a row, stripped; empty where the row is short."""
    return cells[i].strip() if i is not None and i < len(cells) else ""


def _read_rows(path: Path) -> list[_Row]:
    header, data = _open_rows(path)
    at_path, at_label, at_split = _columns(path, header)
    rows = []
    for line, cells in enumerate(data, start=2):
        split = _cell(cells, at_split).lower() if at_split is not None else None
        row = _Row(line, _cell(cells, at_path), _cell(cells, at_label), split)
        if not row.path:
            raise DataError(f"{path}, line {line}: empty path; every row needs the image's path")
        if not row.label:
            raise DataError(f"{path}, line {line}: {first_line(row.path, 80)} has an empty label; give every image "
                            "its class, or leave the row out")
        if row.split is not None and row.split not in SPLIT_VALUES:
            shown = repr(first_line(row.split, 40)) if row.split else "an empty split"
            raise DataError(f"{path}, line {line}: split {shown} is not one of {', '.join(SPLIT_VALUES)}; write "
                            "train, val or test in the split column")
        rows.append(row)
    if not rows:
        raise DataError(f"label file {path} has a header but no rows; add one row per image")
    return rows


def _resolved(rows: list[_Row], base: Path, path: Path) -> list[str]:
    """Each row's file, relative paths joined to ``base``; an error when none of them exists."""
    files = [os.path.join(base, os.path.expanduser(r.path)) for r in rows]
    if not any(os.path.exists(f) for f in files):  # stops at the first that exists
        shown = ", ".join(first_line(r.path, 60) for r in rows[:_SHOWN])
        raise DataError(f"none of the {len(rows):,} images listed in {path} exists under {base} (e.g. {shown}); "
                        "paths are taken relative to the label file's folder, or to --data-path DIR when given")
    return files


def _held_out(rows: list[_Row]) -> str | None:
    """Which split value the val set is: ``val``, else ``test``, else none (split here)."""
    present = {r.split for r in rows}
    return next((s for s in ("val", "test") if s in present), None)


def load_label_file(labels: str | os.PathLike, data_path: str | os.PathLike | None = None, *,
                    val_split: float = 0.1, seed: int = 0) -> DatasetSplits:
    """The splits of a label file; see the module docstring for its layout and rules."""
    path = Path(labels).expanduser()
    rows = _read_rows(path)
    base = Path(data_path).expanduser() if data_path is not None else path.parent
    if data_path is not None and not base.is_dir():
        raise DataError(f"--data-path {base} is not a folder; with --labels it is the folder the listed paths "
                        "are relative to")
    files = _resolved(rows, base, path)
    classes = sorted({r.label for r in rows})
    index = {name: i for i, name in enumerate(classes)}
    held_out = _held_out(rows)
    if held_out is None:
        samples = [(f, index[r.label]) for f, r in zip(files, rows) if r.split in (None, "train")]
        train, val = split_samples(classes, samples, val_split, seed)
        how = (f"split {round((1 - val_split) * 100, 2):g}/{round(val_split * 100, 2):g} by class, seed {seed}"
               if val_split else "no validation split (val_split=0)")
    else:
        train = [(f, index[r.label]) for f, r in zip(files, rows) if r.split == "train"]
        val = [(f, index[r.label]) for f, r in zip(files, rows) if r.split == held_out]
        how = f"split column: train and {held_out} rows"
        if held_out == "val" and any(r.split == "test" for r in rows):
            how += " (test rows left out)"
    _check_train_classes(path, classes, train, val)
    relative = "" if data_path is None else f", paths under {base}"
    return DatasetSplits(classes, sorted(train), sorted(val), str(base),
                         f"label file {path} ({len(rows):,} rows{relative}), {how}")


def _check_train_classes(path: Path, classes: list[str], train: list[tuple[str, int]],
                         val: list[tuple[str, int]]) -> None:
    """Every class needs training rows: a class seen only in val could never be predicted."""
    if not train:
        raise DataError(f"label file {path} has no training rows (every row's split is val or test); mark the "
                        "training images train")
    counts = Counter(label for _, label in train)
    unseen = sorted({classes[label] for _, label in val if label not in counts})
    if unseen:
        names = ", ".join(repr(n) for n in unseen[:5]) + (f" and {len(unseen) - 5} more" if len(unseen) > 5 else "")
        raise DataError(f"label file {path}: class{'es' if len(unseen) > 1 else ''} {names} "
                        f"{'have' if len(unseen) > 1 else 'has'} validation rows but no training rows; add "
                        "training images of it or leave its rows out")
