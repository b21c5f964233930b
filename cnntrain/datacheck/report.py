"""check-data's outputs: rich tables for a terminal, a JSON object for scripts, a bar chart PNG.

The tables list at most :data:`LIST_LIMIT` pairs per kind of problem, with paths relative to
the dataset folder; ``--format json`` (``DataCheck.to_dict``) lists every one with full paths.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cnntrain.datacheck.findings import DataCheck, ImageRef, Match, Spread
from cnntrain.errors import CnnTrainError, first_line, missing_extra

LIST_LIMIT = 20
#: Said once when imagehash is missing: a notice, not an error, since the exact checks still run.
NEAR_NOTICE = f"{missing_extra('the near-duplicate search', 'imagehash', 'check')}; only exact duplicates were checked"
MAX_LABELLED_CLASSES = 60  # above this, class names under the bars overlap whatever the font


def relative(path: str, root: str) -> str:
    """``path`` relative to the dataset folder when it lies inside it."""
    try:
        rel = os.path.relpath(path, root)
    except ValueError:  # another drive (Windows)
        return path
    return path if rel.startswith("..") else rel


def to_json(check: DataCheck, plot: Path | None) -> str:
    return json.dumps({**check.to_dict(), "plot": str(plot) if plot else None})


def _class_table(check: DataCheck) -> Table:
    table = Table(title="readable images per class")
    table.add_column("class")
    for split in check.splits:
        table.add_column(split.name, justify="right")
    table.add_column("total", justify="right")
    for name in check.classes:
        counts = [split.per_class[name] for split in check.splits]
        cells = [f"[red]{n}[/]" if n == 0 and split.images else str(n) for n, split in zip(counts, check.splits)]
        table.add_row(escape(name), *cells, str(sum(counts)))
    table.add_row("[bold]all[/]", *(f"[bold]{s.images:,}[/]" for s in check.splits),
                  f"[bold]{sum(s.images for s in check.splits):,}[/]")
    return table


def _spread(spread: Spread | None, digits: int = 0) -> str:
    if spread is None:
        return "-"
    return " / ".join(f"{v:.{digits}f}" for v in (spread.low, spread.median, spread.high))


def _size_table(check: DataCheck) -> Table:
    table = Table(title="image sizes in pixels, as training reads them (min / median / max)")
    for column in ("split", "images", "width", "height", "aspect (w/h)"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for split in check.splits:
        table.add_row(split.name, f"{split.images:,}", _spread(split.width), _spread(split.height),
                      _spread(split.aspect, 2))
    return table


def _summary_table(check: DataCheck) -> Table:
    counts = check.counts()
    near = check.near_threshold is not None
    table = Table(title="findings", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("unreadable files (training skips them)", str(counts["unreadable"]))
    for what, key in (("duplicates within a split", "duplicates"), ("train/val leaks", "leaks"),
                      ("label conflicts (one image, two classes)", "conflicts")):
        table.add_row(f"{what}, exact", str(counts[f"exact_{key}"]))
        table.add_row(f"{what}, near", str(counts[f"near_{key}"]) if near else "not checked")
    return table


def _ref(ref: ImageRef, root: str) -> str:
    """``split: path``; the class is the path's class folder."""
    return f"{ref.split}: {escape(relative(ref.path, root))}"


def _match_table(title: str, matches: Sequence[Match], root: str, limit: int) -> Table:
    shown = f", first {limit}" if len(matches) > limit else ""
    table = Table(title=f"{title} ({len(matches):,} pair{'s' if len(matches) != 1 else ''}{shown})")
    for column in ("kind", "bits", "image", "same picture"):
        table.add_column(column, justify="right" if column == "bits" else "left", overflow="fold")
    for m in matches[:limit]:
        table.add_row(m.kind, str(m.distance), _ref(m.a, root), _ref(m.b, root))
    return table


def _unreadable_table(check: DataCheck, limit: int) -> Table:
    shown = f", first {limit}" if len(check.unreadable) > limit else ""
    table = Table(title=f"unreadable files ({len(check.unreadable):,}{shown})")
    table.add_column("file", overflow="fold")
    table.add_column("reason", overflow="fold")
    for u in check.unreadable[:limit]:
        table.add_row(f"{u.split}: {escape(relative(u.path, check.root))}", escape(u.reason))
    return table


def verdict(check: DataCheck) -> str:
    """The closing line: nothing found, or how much of each kind."""
    if not check.found:
        near = "" if check.near_threshold is not None else " (exact duplicates only)"
        return f"nothing found{near} in {sum(s.images for s in check.splits):,} images ({check.seconds:.1f}s)"
    parts = [f"{n:,} {what}{'s' if n != 1 and what != 'unreadable' else ''}"
             for n, what in ((len(check.unreadable), "unreadable"), (len(check.duplicates), "duplicate pair"),
                             (len(check.leaks), "train/val leak"), (len(check.conflicts), "label conflict")) if n]
    return f"found {', '.join(parts)} ({check.seconds:.1f}s)"


def print_tables(check: DataCheck, console: Console, limit: int = LIST_LIMIT) -> None:
    """Everything, for a person at a terminal: counts, sizes, a summary, then each problem pair."""
    console.print(escape(check.description))
    for table in (_class_table(check), _size_table(check), _summary_table(check)):
        console.print(table)
    if check.unreadable:
        console.print(_unreadable_table(check, limit))
    for title, matches in (("duplicates within a split", check.duplicates), ("train/val leaks", check.leaks),
                           ("label conflicts", check.conflicts)):
        if matches:
            console.print(_match_table(title, matches, check.root, limit))
    more = any(len(x) > limit for x in (check.unreadable, check.duplicates, check.leaks, check.conflicts))
    if more:
        console.print("--format json lists every pair, with full paths")
    console.print(verdict(check))


def plot_class_counts(check: DataCheck, path: str | os.PathLike[str]) -> Path:
    """Images per class, one bar per split side by side (counts on the bars up to 20 classes); returns the PNG path.

    A split with no images (``--val-split 0``) gets no bars."""
    import numpy as np

    from cnntrain.plots import ANNOTATE_MAX_CLASSES, new_figure, save_png

    n = len(check.classes)
    splits = [s for s in check.splits if s.images] or check.splits[:1]
    fig = new_figure(min(max(6.0, 0.3 * n * len(splits) + 2.0), 30.0), 4.8)
    ax = fig.subplots()
    x = np.arange(n)
    width = 0.8 / len(splits)
    tallest = 0
    for k, (split, colour) in enumerate(zip(splits, ("tab:blue", "tab:orange"))):
        counts = [split.per_class[name] for name in check.classes]
        tallest = max([tallest, *counts])
        bars = ax.bar(x + (k - (len(splits) - 1) / 2) * width, counts, width, color=colour,
                      label=f"{split.name} ({split.images:,} images)")
        if n <= ANNOTATE_MAX_CLASSES:
            ax.bar_label(bars, fontsize=8)
    if n <= MAX_LABELLED_CLASSES:
        ax.set_xticks(x)
        ax.set_xticklabels(check.classes, rotation=45 if n > 8 else 0, ha="right" if n > 8 else "center",
                           rotation_mode="anchor")
    else:
        ax.set_xticks([])
        ax.set_xlabel(f"{n} classes, in folder order")
    ax.set_ylim(0, max(tallest, 1) * 1.2)  # room for the counts and the legend above the bars
    ax.set_ylabel("images")
    ax.set_title(f"Images per class and split ({n} classes, readable images only)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="upper right", ncols=len(splits))
    try:
        return save_png(fig, path)
    except OSError as e:
        raise CnnTrainError(f"cannot write the bar chart to {first_line(path)}: {first_line(e.strerror or e)}; "
                            "pass --plot FILE somewhere writable, or --no-plot") from e
