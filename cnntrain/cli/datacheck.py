"""``cnntrain check-data``: what is wrong with a dataset, before a training run spends hours on it."""

# One option per line: the signature reads as a table of options.
# ruff: noqa: E501

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from cnntrain.choices import CHECK_DATA_FORMATS
from cnntrain.cli.app import check_choice, command, err, one_of, out
from cnntrain.cli.training import BuiltinDataset, Data, DataPath, Labels, Output, Seed, ValSplit
from cnntrain.datacheck import NEAR_THRESHOLD


@command("check-data", no_args_is_help=False)
def check_data(
    data_path: DataPath = None,
    labels: Labels = None,
    dataset: BuiltinDataset = None,
    val_split: ValSplit = None,
    seed: Seed = None,
    workers: Annotated[int | None, Data(help="Processes that decode and hash images (default: none below 512 files to read, else one per CPU, up to 8).")] = None,
    near_threshold: Annotated[int, Data(help="Two images are near-duplicates when their perceptual hashes (pHash + dHash, 128 bits) differ in at most this many bits; 0 = identical hashes.")] = NEAR_THRESHOLD,
    strict: Annotated[bool, Output("--strict", help="Exit with code 1 when anything is found (unreadable files, duplicates, leaks, conflicts), so a CI step can gate on it.")] = False,
    plot: Annotated[Path, Output(help="Where to write the images-per-class bar chart (PNG).")] = Path("class_counts.png"),
    no_plot: Annotated[bool, Output("--no-plot", help="Write no bar chart.")] = False,
    fmt: Annotated[str, Output("--format", help=f"{one_of(CHECK_DATA_FORMATS)}; json is one object (splits, counts, unreadable, duplicates, leaks, conflicts) on stdout.")] = "table",
    config: Annotated[Path | None, Output("--config", help="YAML file of train options: its data options are used; command-line flags win.")] = None,
) -> None:
    """Check a dataset as `cnntrain train` would split it: images per class, sizes, unreadable files, exact and near-duplicates, train/val leaks, label conflicts."""
    check_choice("--format", fmt, CHECK_DATA_FORMATS)
    from cnntrain.config import build_config, load_yaml
    from cnntrain.data import load_data
    from cnntrain.datacheck import findings, report
    from cnntrain.datacheck.hashing import imagehash_version

    findings.check_threshold(near_threshold)
    options = dict(data_path=str(data_path) if data_path else None, labels=str(labels) if labels else None,
                   dataset=dataset, val_split=val_split, seed=seed)
    cfg = build_config(load_yaml(config) if config else {}, {k: v for k, v in options.items() if v is not None},
                       source=str(config))
    if not cfg.data_path and not cfg.dataset and not cfg.labels:
        err.print("no --data-path or --dataset given: checking the built-in offline dataset `shapes`, as "
                  "`cnntrain train` would train on it")
    splits = load_data(cfg.data_path, cfg.dataset, cfg.labels, val_split=cfg.val_split, seed=cfg.seed)
    if imagehash_version() is None:
        err.print(escape(report.NEAR_NOTICE))
    result = findings.check_data(splits, near_threshold=near_threshold, workers=workers,
                                 progress=sys.stderr.isatty())
    written = None if no_plot else report.plot_class_counts(result, plot)
    if fmt == "json":
        print(report.to_json(result, written))
    else:
        report.print_tables(result, out)
        if written is not None:
            out.print(f"plot: {escape(str(written))}", soft_wrap=True)
    if strict and result.found:
        raise typer.Exit(1)
