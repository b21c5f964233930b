"""``cnntrain models``, ``bench`` and ``download-weights``: architectures, speed and weights."""

# One option per line: the signatures read as tables of options.
# ruff: noqa: E501

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from cnntrain.choices import (
    BENCH_FORMATS,
    CACHE_MODES,
    MODEL_SOURCES,
    MODELS_FORMATS,
)
from cnntrain.cli.app import Opt, check_choice, command, err, one_of, out
from cnntrain.errors import UsageError, first_line

# --------------------------------------------------------------------------- models


@command()
def models(
    pattern: Annotated[str | None, typer.Argument(metavar="PATTERN", help="Glob or substring, e.g. 'resnet*' or 'shuffle'.")] = None,
    fmt: Annotated[str, typer.Option("--format", help=f"{one_of(MODELS_FORMATS)}.")] = "table",
    source: Annotated[str | None, typer.Option("--source", help=f"Only the architectures of {one_of(MODEL_SOURCES)} (default: torchvision's and cnntrain's). timm's (pip install 'cnntrain[timm]', train them as --arch timm/NAME) are counted when PATTERN leaves at most 30.")] = None,
) -> None:
    """List architectures: family, parameters, GMACs at 224x224, ImageNet weights and top-1."""
    check_choice("--format", fmt, MODELS_FORMATS)
    if source is not None:
        check_choice("--source", source, MODEL_SOURCES)
    from cnntrain.models import model_rows

    rows = model_rows(pattern, log=lambda s: err.print(escape(s)), source=source)  # stderr: json/csv stay parseable
    if fmt != "table":
        from cnntrain.rows import format_rows

        print(format_rows(rows, fmt), end="")
        return
    from rich.table import Table

    table = Table(title=f"{len(rows)} {source + ' ' if source else ''}architectures")
    for col, justify in (("name", "left"), ("family", "left"), ("params (M)", "right"), ("GMACs", "right"),
                         ("ImageNet weights", "left"), ("top-1", "right"), ("source", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        weights = _weights_cell(r)
        table.add_row(r["name"], r["family"], _count_cell(r["params_m"]), _count_cell(r["gmacs"]), weights,
                      f"{r['top1']:.2f}" if r["top1"] is not None else "-", r["source"])
    out.print(table)


def _weights_cell(row: dict) -> str:
    """torchvision's weights are ImageNet's; ours start from a torchvision backbone; timm's by their
    tag (``in12k_ft_in1k`` of timm/convnext_nano.in12k_ft_in1k), as there are several kinds."""
    if not row["pretrained"]:
        return "-"
    return {"torchvision": "yes", "cnntrain": "backbone"}.get(row["source"], (row["weights"] or "yes").rpartition(".")[2])


def _count_cell(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "-"


# --------------------------------------------------------------------------- bench


@command()
def bench(
    arch: Annotated[str | None, Opt(help="Architectures, comma-separated, e.g. resnet18,mobilenet_v3_small (default: resnet18).")] = None,
    weights: Annotated[list[Path] | None, Opt(help="Time this file as predict runs it instead: an export (.onnx, e.g. int8, or TorchScript) or a checkpoint; latency at batch 1 and images/s at --batch-size. Repeat to compare files.")] = None,
    img_size: Annotated[int | None, Opt(help="Input size in pixels (default: 224).")] = None,
    batch_size: Annotated[int, Opt(help="Batch size for throughput (latency is at batch 1).")] = 32,
    device: Annotated[str, Opt(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    amp: Annotated[bool | None, Opt("--amp/--no-amp", help="Mixed precision (default: on for CUDA, bf16 where supported).")] = None,
    channels_last: Annotated[bool | None, Opt("--channels-last/--no-channels-last", help="channels_last memory format (default: on for CUDA, and on the CPU from 96 px).")] = None,
    runs: Annotated[int, Opt(help="Timed runs per measurement (the median is reported).")] = 5,
    fmt: Annotated[str, Opt("--format", help=f"{one_of(BENCH_FORMATS)}.")] = "table",
    plot: Annotated[Path | None, Opt(help="Also write GMACs vs training images/s as a PNG here.")] = None,
    pipeline: Annotated[bool, Opt("--pipeline", help="Also time the real input pipeline and whole training epochs.")] = False,
    data_path: Annotated[Path | None, Opt("--data-path", "--data", help="ImageFolder root for --pipeline.")] = None,
    workers: Annotated[int | None, Opt(help="DataLoader workers for --pipeline (default: min(8, CPUs)).")] = None,
    epochs: Annotated[int, Opt(help="Epochs for --pipeline (epoch 1 includes worker start-up).")] = 2,
    cache: Annotated[str, Opt(help=f"Decoded-image cache for --pipeline, as in train: {one_of(CACHE_MODES)}.")] = "auto",
    cache_max_gb: Annotated[float | None, Opt(help="RAM budget of --cache in GB (default: a quarter of the available memory).")] = None,
    gpu_decode: Annotated[bool, Opt("--gpu-decode/--no-gpu-decode", help="For --pipeline on CUDA: decode and augment JPEGs on the GPU, as train --gpu-decode.")] = False,
) -> None:
    """Parameters, GMACs, inference/training images/s and latency per architecture; --pipeline adds data timings."""
    from cnntrain.bench import bench_table, parse_archs, plot_bench, run_bench
    from cnntrain.rows import format_rows

    check_choice("--format", fmt, BENCH_FORMATS)
    if weights:
        _bench_files(weights, batch_size=batch_size, device=device, runs=runs, fmt=fmt, unused={
            "--arch": arch, "--img-size": img_size, "--amp/--no-amp": amp, "--channels-last": channels_last,
            "--plot": plot, "--pipeline": pipeline or None, "--data-path": data_path, "--workers": workers,
            "--cache-max-gb": cache_max_gb, "--gpu-decode": gpu_decode or None})
        return
    rows = run_bench(parse_archs(arch or "resnet18"), img_size=224 if img_size is None else img_size,
                     batch_size=batch_size, device=device, amp=amp, channels_last=channels_last, runs=runs,
                     data_path=data_path, pipeline=pipeline, workers=workers, epochs=epochs, cache=cache,
                     cache_max_gb=cache_max_gb, gpu_decode=gpu_decode, log=lambda s: err.print(escape(s)))
    if plot is not None:
        err.print(f"plot: {plot_bench(rows, plot)}")
    if fmt == "table":
        out.print(bench_table(rows))
    else:
        print(format_rows(rows, fmt), end="")


def _bench_files(weights: list[Path], *, batch_size: int, device: str, runs: int, fmt: str, unused: dict) -> None:
    """``bench --weights``: the file decides the architecture, size and precision; options about those are errors."""
    from cnntrain.bench_files import bench_files, files_table
    from cnntrain.rows import format_rows

    given = [name for name, value in unused.items() if value is not None]
    if given:
        raise UsageError(f"{', '.join(given)} {'do' if len(given) > 1 else 'does'} not apply to --weights (the file "
                         "sets the architecture, image size and precision); give --batch-size, --runs, --device, --format")
    rows = bench_files(weights, batch_size=batch_size, runs=runs, device=device, log=lambda s: err.print(escape(s)))
    if fmt == "table":
        out.print(files_table(rows))
    else:
        print(format_rows(rows, fmt), end="")


# --------------------------------------------------------------------------- download-weights


@command("download-weights")
def download_weights(
    archs: Annotated[list[str] | None, typer.Argument(metavar="ARCH", help="Architectures whose ImageNet weights to fetch.")] = None,
    all_: Annotated[bool, Opt("--all", help="Fetch the weights of every architecture that has them; goes on past failures and sums up.")] = False,
    list_: Annotated[bool, Opt("--list", help="Show what is cached (name, size, path) and exit.")] = False,
    mirror: Annotated[str | None, Opt(envvar="CNNTRAIN_WEIGHTS_MIRROR", help="Base URL of a mirror holding the same file names.")] = None,
    url: Annotated[str | None, Opt(help="Fetch this URL (file name must carry -<sha256 prefix>.).")] = None,
    from_: Annotated[Path | None, Opt("--from", help="Import a local weights file into the cache (fetched elsewhere, or your own: then with --arch).")] = None,
    arch: Annotated[str | None, Opt(help="With --from: the architecture FILE holds ImageNet weights for; it is checked to load into it and stored under the file name that architecture's weights are looked up by.")] = None,
    timeout: Annotated[float, Opt(help="Connect/read timeout in seconds.")] = 30.0,
) -> None:
    """Download pretrained weights into torchvision's cache ($TORCH_HOME/hub/checkpoints)."""
    from cnntrain import weights as weights_mod

    if arch is not None and from_ is None:
        raise UsageError("--arch goes with --from FILE; to download weights, name the architectures: `cnntrain download-weights resnet50`")
    if list_:
        _print_cached(weights_mod.list_cached())
    elif url is not None:
        out.print(f"cached {weights_mod.download(url, timeout=timeout)}")
    elif from_ is not None:
        if archs and (len(archs) > 1 or arch not in (None, archs[0])):
            raise UsageError("--from imports one file for one architecture: name it once, e.g. --arch resnet18")
        from cnntrain.weights_import import import_weights

        imported = import_weights(from_, arch=arch or (archs[0] if archs else None))
        out.print(escape(imported.summary()), soft_wrap=True)
    elif not archs and not all_:
        raise UsageError("name at least one architecture (e.g. `cnntrain download-weights resnet50`), or use --all / --list")
    else:
        weights_mod.download_for(
            archs or [], all_=all_, mirror=mirror, timeout=timeout,
            on_cached=lambda name, path: out.print(f"{name}: {path}" + (" (imported)" if weights_mod.imported_record(path) else "")),
            on_failed=lambda name, exc: err.print(f"{name}: {escape(first_line(exc))}", soft_wrap=True))


def _print_cached(rows: list[dict]) -> None:
    from rich.table import Table

    if not rows:
        out.print("no weights cached yet; fetch some with `cnntrain download-weights ARCH`")
        return
    table = Table(title="cached weights")
    for col in ("name", "size (MB)", "path"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], f"{r['size'] / 1e6:.1f}", str(r["path"]))
    out.print(table)
