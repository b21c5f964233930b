"""The ``cnntrain`` command line: one thin function per command.

Each command parses its options, makes one call into the library and prints the result.
Expected failures arrive as ``CnnTrainError`` and leave as one red line and an exit code
(2 for usage errors); only genuine bugs show a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from cnntrain import __version__
from cnntrain.errors import CnnTrainError

app = typer.Typer(
    name="cnntrain",
    help="Train, fine-tune, evaluate and run CNN image classifiers (PyTorch + torchvision).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
# Off a terminal (pipes, CI logs) rich would wrap tables at 80 columns; logs can be wider.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])


def fail(exc: CnnTrainError) -> None:
    """One line, whatever the message carries (DataLoader workers append their traceback).

    Under torchrun other ranks name themselves, and stay silent when stopped by a signal
    (rank 0 already says where the run was saved)."""
    from cnntrain.distributed import rank
    from cnntrain.signals import Interrupted

    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    if rank() == 0:
        err.print(f"[bold red]error:[/] {escape(lines[0])}", markup=True, highlight=False)
    elif not isinstance(exc, Interrupted):
        err.print(f"[bold red]error (rank {rank()}):[/] {escape(lines[0])}", markup=True, highlight=False)
    raise typer.Exit(exc.exit_code)


def _version(value: bool) -> None:
    if value:
        print(f"cnntrain {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
) -> None:
    """cnntrain: transfer learning for image classifiers from the command line."""


# --------------------------------------------------------------------------- models


@app.command()
def models(
    pattern: Annotated[Optional[str], typer.Argument(help="Glob or substring, e.g. 'resnet*' or 'shuffle'.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
) -> None:
    """List architectures: family, parameters, GMACs at 224x224, ImageNet weights and top-1."""
    from cnntrain.models import list_models, model_info
    from cnntrain.models.stats import model_stats_cached

    try:
        _check_choice("--format", fmt, ("table", "json"))
        names = list_models(pattern)
        if not names:
            raise CnnTrainError(f"no architecture matches {pattern!r}; run `cnntrain models` for the full list")
        rows = []
        all_stats = model_stats_cached(names, 224)
        for name in names:
            info = model_info(name)
            stats = all_stats[name]
            rows.append({**info, "params_m": round(stats["params_m"], 3), "gmacs": round(stats["gmacs"], 3),
                         "macs_img_size": stats["img_size"]})
    except CnnTrainError as exc:
        fail(exc)
    if fmt == "json":
        print(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"{len(rows)} architectures")
    for col, justify in (("name", "left"), ("family", "left"), ("params (M)", "right"), ("GMACs", "right"),
                         ("ImageNet weights", "left"), ("top-1", "right"), ("source", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        weights = "yes" if r["pretrained"] and r["source"] == "torchvision" else (
            "backbone" if r["pretrained"] else "-")
        table.add_row(r["name"], r["family"], f"{r['params_m']:.2f}", f"{r['gmacs']:.2f}", weights,
                      f"{r['top1']:.2f}" if r["top1"] is not None else "-", r["source"])
    out.print(table)


# --------------------------------------------------------------------------- train

Opt = typer.Option


@app.command(no_args_is_help=False)
def train(
    data_path: Annotated[Optional[Path], Opt("--data-path", "--data", help="ImageFolder root: one sub-folder per class (or train/ + val/).", rich_help_panel="Data")] = None,
    dataset: Annotated[Optional[str], Opt(help="Built-in dataset: shapes (offline), flowers, cifar10, cifar100.", rich_help_panel="Data")] = None,
    val_split: Annotated[Optional[float], Opt(help="Held-out fraction per class when DIR is not pre-split (default: 0.1).", rich_help_panel="Data")] = None,
    img_size: Annotated[Optional[int], Opt(help="Training crop size (default: 224).", rich_help_panel="Data")] = None,
    aug: Annotated[Optional[str], Opt(help="Extra augmentation, comma-separated: trivialaugment, randaugment, erasing; 'none' = deterministic.", rich_help_panel="Data")] = None,
    workers: Annotated[Optional[int], Opt(help="DataLoader worker processes (default: min(8, CPUs)).", rich_help_panel="Data")] = None,
    strict: Annotated[Optional[bool], Opt("--strict/--no-strict", help="Any unreadable image is an error (default: skip them with a warning).", rich_help_panel="Data")] = None,
    cache: Annotated[Optional[str], Opt(help="Decode each image once and keep it, resized, for every epoch: auto (RAM if it fits --cache-max-gb, else disk), ram, disk or none (default: auto).", rich_help_panel="Data")] = None,
    cache_max_gb: Annotated[Optional[float], Opt(help="RAM budget of --cache in GB (default: a quarter of the available memory).", rich_help_panel="Data")] = None,
    gpu_decode: Annotated[Optional[bool], Opt("--gpu-decode/--no-gpu-decode", help="On CUDA, decode and augment JPEGs on the GPU (nvjpeg) instead of in the loader workers; turns the image cache off (default: off).", rich_help_panel="Data")] = None,
    arch: Annotated[Optional[str], Opt(help="Architecture name (see `cnntrain models`) (default: resnet18).", rich_help_panel="Model")] = None,
    pretrained: Annotated[Optional[bool], Opt("--pretrained/--no-pretrained", help="Start from ImageNet weights (default: on where they exist).", rich_help_panel="Model")] = None,
    weights: Annotated[Optional[Path], Opt(help="Start from a cnntrain checkpoint or a plain state dict.", rich_help_panel="Model")] = None,
    freeze_layers: Annotated[Optional[bool], Opt("--freeze-layers/--no-freeze-layers", help="Train only the classifier head.", rich_help_panel="Model")] = None,
    unfreeze_epoch: Annotated[Optional[int], Opt(help="With --freeze-layers: unfreeze everything from this epoch on (1-based).", rich_help_panel="Model")] = None,
    feature_cache: Annotated[Optional[bool], Opt("--feature-cache/--no-feature-cache", help="With --freeze-layers and --aug none, run the backbone once and train the head on cached features (default: on).", rich_help_panel="Model")] = None,
    epochs: Annotated[Optional[int], Opt(help="(default: 10)", rich_help_panel="Optimisation")] = None,
    batch_size: Annotated[Optional[int], Opt(help="(default: 32)", rich_help_panel="Optimisation")] = None,
    opt: Annotated[Optional[str], Opt(help="sgd, adamw or adam (default: sgd).", rich_help_panel="Optimisation")] = None,
    lr: Annotated[Optional[float], Opt(help="Base learning rate (default: 0.01).", rich_help_panel="Optimisation")] = None,
    momentum: Annotated[Optional[float], Opt(help="SGD momentum (default: 0.9).", rich_help_panel="Optimisation")] = None,
    nesterov: Annotated[Optional[bool], Opt("--nesterov/--no-nesterov", help="Nesterov momentum for SGD (default: on).", rich_help_panel="Optimisation")] = None,
    weight_decay: Annotated[Optional[float], Opt(help="(default: 1e-4)", rich_help_panel="Optimisation")] = None,
    sched: Annotated[Optional[str], Opt(help="step, multistep, cosine or none (default: cosine).", rich_help_panel="Optimisation")] = None,
    step_size: Annotated[Optional[int], Opt(help="Epochs per step for --sched step (default: 10).", rich_help_panel="Optimisation")] = None,
    gamma: Annotated[Optional[float], Opt(help="Decay factor for step/multistep (default: 0.1).", rich_help_panel="Optimisation")] = None,
    milestones: Annotated[Optional[str], Opt(help="Epochs for --sched multistep, e.g. 10,20.", rich_help_panel="Optimisation")] = None,
    lrf: Annotated[Optional[float], Opt(help="Cosine floor as a fraction of --lr (default: 0.01).", rich_help_panel="Optimisation")] = None,
    warmup_epochs: Annotated[Optional[int], Opt(help="Linear warm-up epochs (default: 0).", rich_help_panel="Optimisation")] = None,
    label_smoothing: Annotated[Optional[float], Opt(help="(default: 0)", rich_help_panel="Optimisation")] = None,
    clip_grad: Annotated[Optional[float], Opt(help="Clip the gradient norm to this value.", rich_help_panel="Optimisation")] = None,
    patience: Annotated[Optional[int], Opt(help="Stop after this many epochs without improvement.", rich_help_panel="Optimisation")] = None,
    device: Annotated[Optional[str], Opt(help="auto, cpu, cuda, cuda:N or mps (default: auto).", rich_help_panel="Hardware")] = None,
    amp: Annotated[Optional[bool], Opt("--amp/--no-amp", help="Mixed precision on CUDA (default: on).", rich_help_panel="Hardware")] = None,
    compile: Annotated[Optional[bool], Opt("--compile/--no-compile", help="torch.compile the model.", rich_help_panel="Hardware")] = None,
    nproc: Annotated[Optional[int], Opt(help="Train data-parallel with this many processes on this machine (one per GPU), launched through torchrun; --batch-size is per process.", rich_help_panel="Hardware")] = None,
    sync_bn: Annotated[Optional[bool], Opt("--sync-bn/--no-sync-bn", help="Distributed: BatchNorm statistics over all processes (CUDA only).", rich_help_panel="Hardware")] = None,
    lr_scale: Annotated[Optional[str], Opt(help="Distributed: none keeps --lr as given; linear multiplies it by the number of processes (default: none).", rich_help_panel="Hardware")] = None,
    seed: Annotated[Optional[int], Opt(help="(default: 0)", rich_help_panel="Hardware")] = None,
    deterministic: Annotated[Optional[bool], Opt("--deterministic/--no-deterministic", help="Deterministic algorithms (reproducible, slower).", rich_help_panel="Hardware")] = None,
    project: Annotated[Optional[str], Opt(help="Folder for runs (default: runs).", rich_help_panel="Output")] = None,
    name: Annotated[Optional[str], Opt(help="Run name; taken names get 2, 3, ... (default: exp).", rich_help_panel="Output")] = None,
    exist_ok: Annotated[Optional[bool], Opt("--exist-ok", help="Reuse project/name instead of numbering.", rich_help_panel="Output")] = None,
    resume: Annotated[Optional[str], Opt(help="Continue a run: its last.pt, its folder, or 'auto' for the latest.", rich_help_panel="Output")] = None,
    quiet: Annotated[Optional[bool], Opt("--quiet", "-q", help="Print only the final summary.", rich_help_panel="Output")] = None,
    config: Annotated[Optional[Path], Opt("--config", help="YAML file of options; command-line flags win.", rich_help_panel="Output")] = None,
) -> None:
    """Train or fine-tune an architecture on an image folder or a built-in dataset."""
    given = {k: v for k, v in locals().items() if v is not None and k not in ("config", "nproc")}
    from cnntrain import distributed, trainer
    from cnntrain.runtime import resolve_device
    from cnntrain.checkpoint import load as load_checkpoint
    from cnntrain.config import build_config, load_yaml

    for key in ("data_path", "weights"):
        if key in given:
            given[key] = str(given[key])
    try:
        file_values, source = {}, "config"
        if resume is not None:
            # A resumed run keeps its own configuration; flags given now (e.g. --epochs) still win.
            path = trainer.resolve_resume(resume, given.get("project", "runs"))
            file_values, source = dict(load_checkpoint(path).get("config") or {}), str(path)
            file_values.pop("resume", None)
            given["resume"] = str(path)
        elif config is not None:
            file_values, source = load_yaml(config), str(config)
        cfg = build_config(file_values, given, source=source)
        if nproc is not None and nproc != 1 and not distributed.under_torchrun():
            distributed.check_sync_bn(cfg.sync_bn, resolve_device(cfg.device))
            # The ranks rerun this very command line, minus --nproc, under torchrun.
            raise typer.Exit(distributed.launch(nproc, distributed.strip_option(sys.argv[1:], "--nproc")))
        result = trainer.fit(cfg)
    except CnnTrainError as exc:
        fail(exc)
    if distributed.rank() == 0:
        _print_train_summary(result)


def _print_train_summary(result: Any) -> None:
    from rich.table import Table

    table = Table(title="training finished", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("best epoch", str(result.best_epoch))
    table.add_row(f"best {result.monitor}", f"{result.best_metric:.4f}")
    table.add_row("epochs run", f"{result.epochs_run}" + (" (early stop)" if result.stopped_early else ""))
    table.add_row("time", f"{result.seconds:.1f}s")
    table.add_row("run folder", str(result.run_dir))
    table.add_row("best weights", str(result.run_dir / "best.pt"))
    out.print(table)


# --------------------------------------------------------------------------- predict


@app.command()
def predict(
    inputs: Annotated[list[str], typer.Argument(help="Images, folders or globs (quote globs: 'imgs/*.jpg').")],
    weights: Annotated[Optional[Path], Opt(help="Checkpoint, or an export from `cnntrain export` (.onnx, or TorchScript) with its .json sidecar (default: best.pt of runs/latest).")] = None,
    topk: Annotated[int, Opt(help="Classes to show per image.")] = 5,
    fmt: Annotated[str, Opt("--format", help="table, json or csv.")] = "table",
    batch_size: Annotated[int, Opt(help="Images per forward pass.")] = 32,
    device: Annotated[str, Opt(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    project: Annotated[str, Opt(help="Where runs live (for the default weights).")] = "runs",
) -> None:
    """Classify images with a trained checkpoint; exit code 1 if any image could not be read."""
    from cnntrain.checkpoint import resolve_weights
    from cnntrain.predict import format_predictions, predict_files

    try:
        _check_choice("--format", fmt, ("table", "json", "csv"))
        path, was_default = resolve_weights(weights, project)
        if was_default:
            err.print(f"using {path} (the latest run); pass --weights to choose another")
        rows = predict_files(inputs, path, topk=topk, batch_size=batch_size, device=device)
    except CnnTrainError as exc:
        fail(exc)
    if fmt == "table":
        _print_prediction_table(rows)
    else:
        print(format_predictions(rows, fmt), end="")
    if any(r.get("error") for r in rows):
        raise typer.Exit(1)


def _print_prediction_table(rows: list[dict]) -> None:
    from rich.table import Table

    table = Table(show_lines=False)
    table.add_column("image", overflow="fold")
    table.add_column("prediction")
    table.add_column("prob", justify="right")
    table.add_column("next", overflow="fold")
    for r in rows:
        if r["error"]:
            table.add_row(r["path"], "[red]error[/]", "", escape(r["error"]))
            continue
        top, rest = r["predictions"][0], r["predictions"][1:]
        table.add_row(r["path"], top["class"], f"{top['prob']:.3f}",
                      ", ".join(f"{p['class']} {p['prob']:.3f}" for p in rest))
    out.print(table)


# --------------------------------------------------------------------------- eval


@app.command("eval")
def eval_(
    weights: Annotated[Optional[Path], Opt(help="Checkpoint (default: best.pt of runs/latest).")] = None,
    data_path: Annotated[Optional[Path], Opt("--data-path", "--data", help="ImageFolder root (or train/ + val/).")] = None,
    dataset: Annotated[Optional[str], Opt(help="Built-in dataset: shapes, flowers, cifar10, cifar100.")] = None,
    split: Annotated[str, Opt(help="val, train or all.")] = "val",
    fmt: Annotated[str, Opt("--format", help="table or json.")] = "table",
    plot: Annotated[Optional[Path], Opt(help="Also write the confusion matrix as a PNG here.")] = None,
    batch_size: Annotated[int, Opt(help="Images per forward pass.")] = 64,
    workers: Annotated[Optional[int], Opt(help="DataLoader worker processes.")] = None,
    device: Annotated[str, Opt(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    project: Annotated[str, Opt(help="Where runs live (for the default weights).")] = "runs",
) -> None:
    """Loss, top-1/top-5, per-class precision/recall/F1 and the confusion matrix of a checkpoint."""
    from cnntrain.checkpoint import resolve_weights
    from cnntrain.evaluation import evaluate_checkpoint, format_report

    try:
        _check_choice("--format", fmt, ("table", "json"))
        _check_choice("--split", split, ("val", "train", "all"))
        path, was_default = resolve_weights(weights, project)
        if was_default:
            err.print(f"using {path} (the latest run); pass --weights to choose another")
        report = evaluate_checkpoint(path, data_path=data_path, dataset=dataset, split=split,
                                     batch_size=batch_size, workers=workers, device=device, plot=plot)
    except CnnTrainError as exc:
        fail(exc)
    if fmt == "json":
        print(json.dumps(report, indent=2))
    else:
        format_report(report, out)


# --------------------------------------------------------------------------- bench


@app.command()
def bench(
    arch: Annotated[str, Opt(help="Architectures, comma-separated, e.g. resnet18,mobilenet_v3_small.")] = "resnet18",
    img_size: Annotated[int, Opt(help="Input size in pixels.")] = 224,
    batch_size: Annotated[int, Opt(help="Batch size for throughput (latency is at batch 1).")] = 32,
    device: Annotated[str, Opt(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    amp: Annotated[Optional[bool], Opt("--amp/--no-amp", help="Mixed precision (default: on for CUDA, bf16 where supported).")] = None,
    channels_last: Annotated[Optional[bool], Opt("--channels-last/--no-channels-last", help="channels_last memory format (default: on for CUDA, and on the CPU from 96 px).")] = None,
    runs: Annotated[int, Opt(help="Timed runs per measurement (the median is reported).")] = 5,
    fmt: Annotated[str, Opt("--format", help="table, json or csv.")] = "table",
    plot: Annotated[Optional[Path], Opt(help="Also write GMACs vs training images/s as a PNG here.")] = None,
    pipeline: Annotated[bool, Opt("--pipeline", help="Also time the real input pipeline and whole training epochs.")] = False,
    data_path: Annotated[Optional[Path], Opt("--data-path", "--data", help="ImageFolder root for --pipeline.")] = None,
    workers: Annotated[Optional[int], Opt(help="DataLoader workers for --pipeline (default: min(8, CPUs)).")] = None,
    epochs: Annotated[int, Opt(help="Epochs for --pipeline (epoch 1 includes worker start-up).")] = 2,
    cache: Annotated[str, Opt(help="Decoded-image cache for --pipeline, as in train: auto, ram, disk or none.")] = "auto",
    cache_max_gb: Annotated[Optional[float], Opt(help="RAM budget of --cache in GB (default: a quarter of the available memory).")] = None,
) -> None:
    """Parameters, GMACs, inference/training images/s and latency per architecture; --pipeline adds data timings."""
    from cnntrain.bench import bench_table, format_rows, parse_archs, plot_bench, run_bench

    try:
        _check_choice("--format", fmt, ("table", "json", "csv"))
        rows = run_bench(parse_archs(arch), img_size=img_size, batch_size=batch_size, device=device, amp=amp,
                         channels_last=channels_last, runs=runs, data_path=data_path, pipeline=pipeline,
                         workers=workers, epochs=epochs, cache=cache, cache_max_gb=cache_max_gb,
                         log=lambda s: err.print(escape(s)))
        if plot is not None:
            err.print(f"plot: {plot_bench(rows, plot)}")
    except CnnTrainError as exc:
        fail(exc)
    if fmt == "table":
        out.print(bench_table(rows))
    else:
        print(format_rows(rows, fmt), end="")


# --------------------------------------------------------------------------- export


@app.command()
def export(
    weights: Annotated[Optional[Path], Opt(help="Checkpoint to export (default: best.pt of runs/latest).")] = None,
    fmt: Annotated[str, Opt("--format", help="onnx or torchscript.")] = "onnx",
    output: Annotated[Optional[Path], Opt("--output", "-o", help="Exported file (default: beside the checkpoint, best.onnx / best.torchscript.pt); the sidecar is this name + .json.")] = None,
    dynamic_batch: Annotated[bool, Opt("--dynamic-batch", help="Accept any batch size (default: exactly 1 image per call).")] = False,
    opset: Annotated[Optional[int], Opt(help="ONNX opset version (default: 17).")] = None,
    project: Annotated[str, Opt(help="Where runs live (for the default weights).")] = "runs",
) -> None:
    """Export a checkpoint to ONNX or TorchScript (uint8 RGB in, logits out) plus a JSON sidecar; verified against PyTorch."""
    from cnntrain.checkpoint import resolve_weights
    from cnntrain.export import FORMATS, export_checkpoint

    try:
        _check_choice("--format", fmt, FORMATS)
        path, was_default = resolve_weights(weights, project)
        if was_default:
            err.print(f"using {path} (the latest run); pass --weights to choose another")
        result = export_checkpoint(path, fmt, output, dynamic_batch=dynamic_batch, opset=opset)
    except CnnTrainError as exc:
        fail(exc)
    size_mb = result.path.stat().st_size / 1e6
    out.print(f"exported {result.path} ({size_mb:.1f} MB, {result.seconds:.1f}s), sidecar {result.sidecar}")
    out.print(f"verified against PyTorch on batch sizes {', '.join(map(str, result.batch_sizes))}: "
              f"max |logit difference| {result.max_abs_diff:.2e} (allowed {result.allowed:.1e})")


# --------------------------------------------------------------------------- download-weights


@app.command("download-weights")
def download_weights(
    archs: Annotated[Optional[list[str]], typer.Argument(help="Architectures whose ImageNet weights to fetch.")] = None,
    all_: Annotated[bool, Opt("--all", help="Fetch the weights of every architecture that has them.")] = False,
    list_: Annotated[bool, Opt("--list", help="Show what is cached (name, size, path) and exit.")] = False,
    mirror: Annotated[Optional[str], Opt(envvar="CNNTRAIN_WEIGHTS_MIRROR", help="Base URL of a mirror holding the same file names.")] = None,
    url: Annotated[Optional[str], Opt(help="Fetch this URL (file name must carry -<sha256 prefix>.).")] = None,
    from_: Annotated[Optional[Path], Opt("--from", help="Import a local weights file into the cache.")] = None,
    timeout: Annotated[float, Opt(help="Connect/read timeout in seconds.")] = 30.0,
) -> None:
    """Download pretrained weights into torchvision's cache ($TORCH_HOME/hub/checkpoints)."""
    from cnntrain import weights as weights_mod
    from cnntrain.errors import UsageError
    from cnntrain.models import get_spec, list_models

    try:
        if list_:
            _print_cached(weights_mod.list_cached())
            return
        if url is not None:
            path = weights_mod.download(url, timeout=timeout)
            out.print(f"cached {path}")
            return
        if from_ is not None:
            path = weights_mod.import_file(from_)
            out.print(f"cached {path}")
            return
        names = list_models() if all_ else (archs or [])
        if not names:
            raise UsageError("name at least one architecture (e.g. `cnntrain download-weights resnet50`), or use --all / --list")
        specs = [get_spec(n) for n in names]  # unknown names fail before anything is fetched
        todo: dict[str, str] = {}
        for spec in specs:
            if spec.weights is None:
                if not all_:
                    raise UsageError(f"{spec.name} has no pretrained weights (train it with --no-pretrained)")
                continue
            todo.setdefault(spec.weights.url, spec.name)
        for weights_url, name in todo.items():
            spec = get_spec(name)
            path = weights_mod.ensure_cached(spec.weights, arch=name, mirror=mirror, timeout=timeout)
            out.print(f"{name}: {path}")
    except CnnTrainError as exc:
        fail(exc)


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


def _check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        from cnntrain.errors import UsageError

        raise UsageError(f"{option} must be one of {', '.join(choices)}, not {value!r}")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
