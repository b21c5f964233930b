"""The ``cnntrain`` command line: one thin function per command.

Each command parses its options, makes one call into the library and prints the result.
Expected failures arrive as ``CnnTrainError`` and leave, through the one ``command`` wrapper,
as one red line and an exit code (2 for usage errors); only genuine bugs show a traceback.

Defaults in the help of ``train`` are read from ``TrainConfig`` and every list of choices from
``cnntrain.choices``, so the help cannot drift from the code. Nothing here imports torch until
a command runs: ``cnntrain --help`` stays fast.
"""

# One option per line: the signatures read as tables of options.
# ruff: noqa: E501

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from cnntrain import __version__
from cnntrain.choices import (
    AUGMENTATIONS,
    BENCH_FORMATS,
    CACHE_MODES,
    EVAL_FORMATS,
    EVAL_SPLITS,
    EXPORT_FORMATS,
    LR_FIND_FORMATS,
    LR_SCALES,
    MODELS_FORMATS,
    OPTIMIZERS,
    PREDICT_FORMATS,
    SAMPLERS,
    SCHEDULES,
)
from cnntrain.cli_group import CnnTrainGroup
from cnntrain.config import TrainConfig
from cnntrain.errors import CnnTrainError, UsageError, first_line

app = typer.Typer(
    name="cnntrain",
    help="Train, fine-tune, evaluate and run CNN image classifiers (PyTorch + torchvision).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    cls=CnnTrainGroup,
)
# Off a terminal (pipes, CI logs) rich would wrap tables at 80 columns; logs can be wider.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])
Opt = typer.Option


# --------------------------------------------------------------------------- errors and help texts


def fail(exc: CnnTrainError) -> NoReturn:
    """One line, whatever the message carries (DataLoader workers append their traceback).

    Under torchrun other ranks name themselves, and stay silent when stopped by a signal
    (rank 0 already says where the run was saved)."""
    from cnntrain.train.distributed import rank
    from cnntrain.train.signals import Interrupted

    line = first_line(exc)
    if rank() == 0:
        err.print(f"[bold red]error:[/] {escape(line)}", markup=True, highlight=False)
    elif not isinstance(exc, Interrupted):
        err.print(f"[bold red]error (rank {rank()}):[/] {escape(line)}", markup=True, highlight=False)
    raise typer.Exit(exc.exit_code)


def command(name: str | None = None, **kwargs: Any) -> Callable[[F], F]:
    """``app.command``, with every ``CnnTrainError`` of the command leaving through ``fail``."""

    def register(func: F) -> F:
        @functools.wraps(func)  # Typer reads the options from the wrapped signature
        def run(*args: Any, **kw: Any) -> Any:
            try:
                return func(*args, **kw)
            except CnnTrainError as exc:
                fail(exc)

        app.command(name, **kwargs)(run)
        return run  # type: ignore[return-value]

    return register


def check_choice(option: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise UsageError(f"{option} must be one of {', '.join(choices)}, not {value!r}")


def one_of(choices: Sequence[str]) -> str:
    """``('a', 'b', 'c')`` -> ``'a, b or c'``, for help texts."""
    return f"{', '.join(choices[:-1])} or {choices[-1]}" if len(choices) > 1 else "".join(choices)


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def default(name: str, when_none: str = "none") -> str:
    """``(default: X)`` with X read from ``TrainConfig``; ``when_none`` says what None means."""
    value = _DEFAULTS[name]
    if value is None:
        text = when_none
    elif isinstance(value, bool):
        text = "on" if value else "off"
    elif isinstance(value, float):
        text = f"{value:g}"
    else:
        text = str(value)
    return f"(default: {text})"


def _version(value: bool) -> None:
    if value:
        print(f"cnntrain {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool | None, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
) -> None:
    """cnntrain: transfer learning for image classifiers from the command line."""


# --------------------------------------------------------------------------- models


@command()
def models(
    pattern: Annotated[str | None, typer.Argument(metavar="PATTERN", help="Glob or substring, e.g. 'resnet*' or 'shuffle'.")] = None,
    fmt: Annotated[str, typer.Option("--format", help=f"{one_of(MODELS_FORMATS)}.")] = "table",
) -> None:
    """List architectures: family, parameters, GMACs at 224x224, ImageNet weights and top-1."""
    check_choice("--format", fmt, MODELS_FORMATS)
    from cnntrain.models import model_rows

    rows = model_rows(pattern, log=lambda s: err.print(escape(s)))  # stderr: --format json/csv stay parseable
    if fmt != "table":
        from cnntrain.rows import format_rows

        print(format_rows(rows, fmt), end="")
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


def _panel(title: str) -> Callable[..., Any]:
    return functools.partial(typer.Option, rich_help_panel=title)


Data, Model, Optim, Hardware, Output = map(_panel, ("Data", "Model", "Optimisation", "Hardware", "Output"))
_AUGS = ", ".join(a for a in AUGMENTATIONS if a != "none")

# The augmentation options, shared by train and lr-find (which measures the loss training will see).
AugPreset = Annotated[str | None, Data(help=f"Augmentation that fits the data: photo (mirrors and 8-100% crops), no-mirror (digits, text, signs: no flips, 60-100% crops, +-10 deg), light (few images: gentle); the options below change one value each {default('aug_preset')}.")]
HFlip = Annotated[float | None, Data(help=f"Probability of a left-right mirror; 0 where a mirror image is another class {default('hflip')}.")]
VFlip = Annotated[float | None, Data(help=f"Probability of an upside-down flip (aerial or microscope images) {default('vflip')}.")]
CropScale = Annotated[str | None, Data(help="MIN,MAX share of the image's area a training crop keeps (default: 0.08,1).")]
CropRatio = Annotated[str | None, Data(help="MIN,MAX aspect ratio of a training crop (default: 0.75,1.33).")]
Rotate = Annotated[float | None, Data(help=f"Random rotation, up to this many degrees either way {default('rotate')}.")]
ColorJitter = Annotated[float | None, Data(help=f"Brightness, contrast and saturation changed by up to this fraction {default('color_jitter')}.")]


@command(no_args_is_help=False)
def train(
    data_path: Annotated[Path | None, Data("--data-path", "--data", help="ImageFolder root: one sub-folder per class (or train/ + val/).")] = None,
    dataset: Annotated[str | None, Data(help="Built-in dataset: shapes (offline; the default, trained from scratch at its own 64 px unless options say otherwise), flowers, cifar10, cifar100.")] = None,
    val_split: Annotated[float | None, Data(help=f"Held-out fraction per class when DIR is not pre-split {default('val_split')}.")] = None,
    img_size: Annotated[int | None, Data(help=f"Training crop size {default('img_size')}.")] = None,
    aug: Annotated[str | None, Data(help=f"Extra augmentation, comma-separated: {_AUGS}; 'none' = deterministic.")] = None,
    aug_preset: AugPreset = None,
    hflip: HFlip = None,
    vflip: VFlip = None,
    crop_scale: CropScale = None,
    crop_ratio: CropRatio = None,
    rotate: Rotate = None,
    color_jitter: ColorJitter = None,
    workers: Annotated[int | None, Data(help=f"DataLoader worker processes {default('workers', 'min(8, CPUs)')}.")] = None,
    strict: Annotated[bool | None, Data("--strict/--no-strict", help=f"Any unreadable image is an error, instead of being skipped with a warning {default('strict')}.")] = None,
    cache: Annotated[str | None, Data(help=f"Decode each image once and keep it, resized, for every epoch: {one_of(CACHE_MODES)}; auto = RAM if it fits --cache-max-gb, else disk {default('cache')}.")] = None,
    cache_max_gb: Annotated[float | None, Data(help=f"RAM budget of --cache in GB {default('cache_max_gb', 'a quarter of the available memory')}.")] = None,
    sampler: Annotated[str | None, Data(help=f"{one_of(SAMPLERS)}: every image once per epoch, or classes drawn equally often (with replacement; for imbalanced folders) {default('sampler')}.")] = None,
    gpu_decode: Annotated[bool | None, Data("--gpu-decode/--no-gpu-decode", help=f"On CUDA, decode and augment JPEGs on the GPU (nvjpeg) instead of in the loader workers; turns the image cache off {default('gpu_decode')}.")] = None,
    arch: Annotated[str | None, Model(help=f"Architecture name (see `cnntrain models`) {default('arch')}.")] = None,
    pretrained: Annotated[bool | None, Model("--pretrained/--no-pretrained", help=f"Start from ImageNet weights {default('pretrained', 'on where they exist')}.")] = None,
    weights: Annotated[Path | None, Model(help="Start from a cnntrain checkpoint or a plain state dict.")] = None,
    freeze_layers: Annotated[bool | None, Model("--freeze-layers/--no-freeze-layers", help=f"Train only the classifier head {default('freeze_layers')}.")] = None,
    unfreeze_epoch: Annotated[int | None, Model(help="With --freeze-layers: unfreeze everything from this epoch on (1-based).")] = None,
    feature_cache: Annotated[bool | None, Model("--feature-cache/--no-feature-cache", help=f"With --freeze-layers and --aug none, run the backbone once and train the head on cached features {default('feature_cache')}.")] = None,
    epochs: Annotated[int | None, Optim(help=f"Passes over the training data {default('epochs')}.")] = None,
    batch_size: Annotated[str | None, Optim(help=f"Images per step, per process, or auto: on CUDA the largest batch that fits 85% of the GPU's memory, verified by a real step (config.yaml keeps the number) {default('batch_size')}.")] = None,
    opt: Annotated[str | None, Optim(help=f"{one_of(OPTIMIZERS)} {default('opt')}.")] = None,
    lr: Annotated[str | None, Optim(help=f"Base learning rate, or auto: run the range test of `cnntrain lr-find` first and train at the rate it suggests (config.yaml keeps the number) {default('lr')}.")] = None,
    momentum: Annotated[float | None, Optim(help=f"SGD momentum {default('momentum')}.")] = None,
    nesterov: Annotated[bool | None, Optim("--nesterov/--no-nesterov", help=f"Nesterov momentum for SGD {default('nesterov')}.")] = None,
    weight_decay: Annotated[float | None, Optim(help=f"L2 penalty on the weights {default('weight_decay')}.")] = None,
    sched: Annotated[str | None, Optim(help=f"{one_of(SCHEDULES)} {default('sched')}.")] = None,
    step_size: Annotated[int | None, Optim(help=f"Epochs per step for --sched step {default('step_size')}.")] = None,
    gamma: Annotated[float | None, Optim(help=f"Decay factor for step/multistep {default('gamma')}.")] = None,
    milestones: Annotated[str | None, Optim(help="Epochs for --sched multistep, e.g. 10,20.")] = None,
    lrf: Annotated[float | None, Optim(help=f"Cosine floor as a fraction of --lr {default('lrf')}.")] = None,
    warmup_epochs: Annotated[int | None, Optim(help=f"Linear warm-up epochs {default('warmup_epochs')}.")] = None,
    label_smoothing: Annotated[float | None, Optim(help=f"Label smoothing of the loss {default('label_smoothing')}.")] = None,
    class_weights: Annotated[str | None, Optim(help=f"Weigh each class's share of the loss: none, auto (inverse class frequency, mean 1, capped at 10) or a YAML/JSON file of class: weight {default('class_weights')}.")] = None,
    mixup: Annotated[float | None, Optim(help=f"Mixup: blend pairs of training images, Beta(ALPHA, ALPHA), e.g. 0.2; 0 = off {default('mixup')}.")] = None,
    cutmix: Annotated[float | None, Optim(help=f"CutMix: paste a patch of one training image into another, Beta(ALPHA, ALPHA), e.g. 1.0; 0 = off {default('cutmix')}.")] = None,
    mix_switch_prob: Annotated[float | None, Optim(help=f"With --mixup and --cutmix: the chance a batch gets cutmix {default('mix_switch_prob')}.")] = None,
    ema: Annotated[bool | None, Optim("--ema/--no-ema", help=f"Also validate an exponential moving average of the weights; best.pt keeps whichever scores higher {default('ema')}.")] = None,
    ema_decay: Annotated[float | None, Optim(help=f"Decay of --ema per step, warmed up from short memory {default('ema_decay')}.")] = None,
    backbone_lr_mult: Annotated[float | None, Optim(help=f"The backbone learns at --lr x this, the new head at --lr, e.g. 0.1 for pretrained weights {default('backbone_lr_mult')}.")] = None,
    clip_grad: Annotated[float | None, Optim(help="Clip the gradient norm to this value.")] = None,
    patience: Annotated[int | None, Optim(help="Stop after this many epochs without improvement.")] = None,
    device: Annotated[str | None, Hardware(help=f"auto, cpu, cuda, cuda:N or mps {default('device')}.")] = None,
    amp: Annotated[bool | None, Hardware("--amp/--no-amp", help=f"Mixed precision on CUDA {default('amp', 'on')}.")] = None,
    compile: Annotated[bool | None, Hardware("--compile/--no-compile", help=f"torch.compile the model {default('compile')}.")] = None,
    nproc: Annotated[int | None, Hardware(help="Train data-parallel with this many processes on this machine (one per GPU), launched through torchrun; --batch-size is per process.")] = None,
    sync_bn: Annotated[bool | None, Hardware("--sync-bn/--no-sync-bn", help=f"Distributed, CUDA only: BatchNorm statistics over all processes {default('sync_bn')}.")] = None,
    lr_scale: Annotated[str | None, Hardware(help=f"Distributed: {one_of(LR_SCALES)}; none keeps --lr as given, linear multiplies it by the number of processes {default('lr_scale')}.")] = None,
    seed: Annotated[int | None, Hardware(help=f"Random seed {default('seed')}.")] = None,
    deterministic: Annotated[bool | None, Hardware("--deterministic/--no-deterministic", help=f"Deterministic algorithms: reproducible, slower {default('deterministic')}.")] = None,
    project: Annotated[str | None, Output(help=f"Folder for runs {default('project')}.")] = None,
    name: Annotated[str | None, Output(help=f"Run name; taken names get 2, 3, ... {default('name')}.")] = None,
    exist_ok: Annotated[bool | None, Output("--exist-ok", help=f"Reuse project/name instead of numbering {default('exist_ok')}.")] = None,
    resume: Annotated[str | None, Output(help="Continue a run: its last.pt, its folder, or 'auto' for the latest.")] = None,
    quiet: Annotated[bool | None, Output("--quiet/--no-quiet", "-q", help=f"Print only the final summary; --no-quiet overrides a recipe's quiet: true {default('quiet')}.")] = None,
    config: Annotated[Path | None, Output("--config", help="YAML file of options; command-line flags win.")] = None,
) -> None:
    """Train or fine-tune an architecture on an image folder or a built-in dataset."""
    given = {k: str(v) if isinstance(v, Path) else v for k, v in locals().items()
             if v is not None and k not in ("config", "nproc")}
    from cnntrain.runtime import resolve_device
    from cnntrain.train import distributed, fit, train_config

    # Flags given now win over the --config file, or over the configuration of a --resume'd run.
    cfg, plan = train_config(given, config)
    if nproc is not None and nproc != 1 and not distributed.under_torchrun():
        distributed.check_sync_bn(cfg.sync_bn, resolve_device(cfg.device))
        # The ranks rerun this very command line, minus --nproc, under torchrun.
        raise typer.Exit(distributed.launch(nproc, distributed.strip_option(sys.argv[1:], "--nproc")))
    result = fit(cfg, resume=plan)
    if distributed.rank() == 0:
        _print_train_summary(result)


def _print_train_summary(result: Any) -> None:
    from rich.table import Table

    table = Table(title="training finished", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("best epoch", str(result.best_epoch))
    table.add_row(f"best {result.monitor}", f"{result.best_metric:.4f}")
    if result.best_scores:
        table.add_row("balanced acc / macro-F1", f"{result.best_scores['balanced_acc']:.4f} / "
                                                 f"{result.best_scores['macro_f1']:.4f}")
    table.add_row("epochs run", f"{result.epochs_run}" + (" (early stop)" if result.stopped_early else ""))
    table.add_row("time", f"{result.seconds:.1f}s")
    table.add_row("run folder", str(result.run_dir))
    table.add_row("best weights", str(result.run_dir / "best.pt"))
    out.print(table)


def _weights_or_latest(weights: Path | None, project: str) -> Path:
    """``--weights``, or best.pt of the latest run, saying so on stderr."""
    from cnntrain.checkpoint import resolve_weights

    path, was_default = resolve_weights(weights, project)
    if was_default:
        err.print(f"using {path} (the latest run); pass --weights to choose another")
    return path


# --------------------------------------------------------------------------- predict


@command()
def predict(
    inputs: Annotated[list[str], typer.Argument(metavar="IMAGE", help="Images, folders or globs (quote globs: 'imgs/*.jpg').")],
    weights: Annotated[Path | None, Opt(help="Checkpoint, or an export from `cnntrain export` (.onnx, or TorchScript) with its .json sidecar (default: best.pt of runs/latest).")] = None,
    topk: Annotated[int, Opt(help="Classes to show per image.")] = 5,
    fmt: Annotated[str, Opt("--format", help=f"{one_of(PREDICT_FORMATS)}.")] = "table",
    batch_size: Annotated[int, Opt(help="Images per forward pass.")] = 32,
    tta: Annotated[bool, Opt("--tta", help="Test-time augmentation: average the probabilities of each image and its mirror image (two forward passes).")] = False,
    device: Annotated[str, Opt(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    project: Annotated[str, Opt(help="Where runs live (for the default weights).")] = "runs",
) -> None:
    """Classify images with a trained checkpoint; exit code 1 if any image could not be read."""
    from cnntrain.predict import format_predictions, predict_files

    check_choice("--format", fmt, PREDICT_FORMATS)
    rows = predict_files(inputs, _weights_or_latest(weights, project), topk=topk, batch_size=batch_size,
                         device=device, tta=tta)
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


@command("eval")
def eval_(
    weights: Annotated[Path | None, Opt(help="Checkpoint (default: best.pt of runs/latest).")] = None,
    data_path: Annotated[Path | None, Opt("--data-path", "--data", help="ImageFolder root (or train/ + val/) (default: the data the checkpoint was trained on).")] = None,
    dataset: Annotated[str | None, Opt(help="Built-in dataset: shapes, flowers, cifar10, cifar100.")] = None,
    split: Annotated[str, Opt(help=f"{one_of(EVAL_SPLITS)}.")] = "val",
    fmt: Annotated[str, Opt("--format", help=f"{one_of(EVAL_FORMATS)}.")] = "table",
    plot: Annotated[Path | None, Opt(help="Also write the confusion matrix as a PNG here.")] = None,
    batch_size: Annotated[int, Opt(help="Images per forward pass.")] = 64,
    tta: Annotated[bool, Opt("--tta", help="Also score with test-time augmentation (each image and its mirror image, probabilities averaged) and show what it changes; the plain figures stay as they are.")] = False,
    workers: Annotated[int | None, Opt(help="DataLoader worker processes.")] = None,
    device: Annotated[str, Opt(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    project: Annotated[str, Opt(help="Where runs live (for the default weights).")] = "runs",
) -> None:
    """Loss, top-1/top-5, per-class precision/recall/F1 and the confusion matrix of a checkpoint."""
    from cnntrain.evaluation import evaluate_checkpoint, format_report, report_csv

    check_choice("--format", fmt, EVAL_FORMATS)
    check_choice("--split", split, EVAL_SPLITS)
    report = evaluate_checkpoint(_weights_or_latest(weights, project), data_path=data_path, dataset=dataset,
                                 split=split, batch_size=batch_size, workers=workers, device=device, plot=plot,
                                 tta=tta, log=lambda s: err.print(escape(s)))
    if fmt == "json":
        print(json.dumps(report, indent=2))
    elif fmt == "csv":
        print(report_csv(report), end="")
    else:
        format_report(report, out)


# --------------------------------------------------------------------------- bench


@command()
def bench(
    arch: Annotated[str, Opt(help="Architectures, comma-separated, e.g. resnet18,mobilenet_v3_small.")] = "resnet18",
    img_size: Annotated[int, Opt(help="Input size in pixels.")] = 224,
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
    rows = run_bench(parse_archs(arch), img_size=img_size, batch_size=batch_size, device=device, amp=amp,
                     channels_last=channels_last, runs=runs, data_path=data_path, pipeline=pipeline,
                     workers=workers, epochs=epochs, cache=cache, cache_max_gb=cache_max_gb, gpu_decode=gpu_decode,
                     log=lambda s: err.print(escape(s)))
    if plot is not None:
        err.print(f"plot: {plot_bench(rows, plot)}")
    if fmt == "table":
        out.print(bench_table(rows))
    else:
        print(format_rows(rows, fmt), end="")


# --------------------------------------------------------------------------- export


@command()
def export(
    weights: Annotated[Path | None, Opt(help="Checkpoint to export (default: best.pt of runs/latest).")] = None,
    fmt: Annotated[str, Opt("--format", help=f"{one_of(EXPORT_FORMATS)}.")] = "onnx",
    output: Annotated[Path | None, Opt("--output", "-o", help="Exported file (default: beside the checkpoint, best.onnx / best.torchscript.pt); the sidecar is this name + .json.")] = None,
    dynamic_batch: Annotated[bool, Opt("--dynamic-batch", help="Accept any batch size (default: exactly 1 image per call).")] = False,
    opset: Annotated[int | None, Opt(help="ONNX opset version (default: 17).")] = None,
    project: Annotated[str, Opt(help="Where runs live (for the default weights).")] = "runs",
) -> None:
    """Export a checkpoint to ONNX or TorchScript (uint8 RGB in, logits out) plus a JSON sidecar; verified against PyTorch."""
    from cnntrain.export import export_checkpoint

    check_choice("--format", fmt, EXPORT_FORMATS)
    result = export_checkpoint(_weights_or_latest(weights, project), fmt, output, dynamic_batch=dynamic_batch,
                               opset=opset)
    size_mb = result.path.stat().st_size / 1e6
    out.print(f"exported {result.path} ({size_mb:.1f} MB, {result.seconds:.1f}s), sidecar {result.sidecar}")
    out.print(f"verified against PyTorch on batch sizes {', '.join(map(str, result.batch_sizes))}: "
              f"max |logit difference| {result.max_abs_diff:.2e} (allowed {result.allowed:.1e})")


# --------------------------------------------------------------------------- lr-find


@command("lr-find", no_args_is_help=False)
def lr_find(
    data_path: Annotated[Path | None, Data("--data-path", "--data", help="ImageFolder root: one sub-folder per class (or train/ + val/).")] = None,
    dataset: Annotated[str | None, Data(help="Built-in dataset: shapes (offline; the default), flowers, cifar10, cifar100.")] = None,
    img_size: Annotated[int | None, Data(help=f"Training crop size {default('img_size')}.")] = None,
    aug_preset: AugPreset = None,
    hflip: HFlip = None,
    vflip: VFlip = None,
    crop_scale: CropScale = None,
    crop_ratio: CropRatio = None,
    rotate: Rotate = None,
    color_jitter: ColorJitter = None,
    workers: Annotated[int | None, Data(help=f"DataLoader worker processes {default('workers', 'min(8, CPUs)')}.")] = None,
    arch: Annotated[str | None, Model(help=f"Architecture name (see `cnntrain models`) {default('arch')}.")] = None,
    pretrained: Annotated[bool | None, Model("--pretrained/--no-pretrained", help=f"Start from ImageNet weights {default('pretrained', 'on where they exist')}.")] = None,
    weights: Annotated[Path | None, Model(help="Start from a cnntrain checkpoint or a plain state dict.")] = None,
    freeze_layers: Annotated[bool | None, Model("--freeze-layers/--no-freeze-layers", help=f"Train only the classifier head {default('freeze_layers')}.")] = None,
    batch_size: Annotated[int | None, Optim(help=f"Images per step {default('batch_size')}.")] = None,
    opt: Annotated[str | None, Optim(help=f"{one_of(OPTIMIZERS)} {default('opt')}.")] = None,
    momentum: Annotated[float | None, Optim(help=f"SGD momentum {default('momentum')}.")] = None,
    weight_decay: Annotated[float | None, Optim(help=f"L2 penalty on the weights {default('weight_decay')}.")] = None,
    start_lr: Annotated[float, Optim(help="The rate of the first step.")] = 1e-7,
    end_lr: Annotated[float, Optim(help="The rate of the last step; the test stops sooner if the loss diverges.")] = 10.0,
    steps: Annotated[int, Optim(help="Optimiser steps, the rate rising exponentially from --start-lr to --end-lr (the data is cycled if it has fewer batches).")] = 100,
    device: Annotated[str | None, Hardware(help=f"auto, cpu, cuda, cuda:N or mps {default('device')}.")] = None,
    seed: Annotated[int | None, Hardware(help=f"Random seed {default('seed')}.")] = None,
    plot: Annotated[Path, Output(help="Where to write the loss-against-lr plot (PNG).")] = Path("lr_find.png"),
    fmt: Annotated[str, Output("--format", help=f"{one_of(LR_FIND_FORMATS)}; json is one object (lrs, losses, smoothed, suggestion, method, diverged) on stdout.")] = "table",
    config: Annotated[Path | None, Output("--config", help="YAML file of train options; command-line flags win.")] = None,
) -> None:
    """Learning-rate range test: raise the rate step by step, plot the loss, suggest a --lr for `cnntrain train`."""
    check_choice("--format", fmt, LR_FIND_FORMATS)
    from cnntrain.train.lr_find import check_range, lr_find_for_config

    check_range(start_lr, end_lr, steps)  # before any recipe or data is read
    from cnntrain.plots import plot_lr_find
    from cnntrain.train import train_config

    options = dict(data_path=data_path, dataset=dataset, img_size=img_size, workers=workers, arch=arch,
                   pretrained=pretrained, weights=weights, freeze_layers=freeze_layers, batch_size=batch_size, opt=opt,
                   momentum=momentum, weight_decay=weight_decay, device=device, seed=seed)
    given = {k: str(v) if isinstance(v, Path) else v for k, v in options.items() if v is not None}
    cfg, _ = train_config(given, config)
    say = lambda s: err.print(escape(s))  # noqa: E731 - stderr: --format json stays parseable
    result = lr_find_for_config(cfg, start_lr=start_lr, end_lr=end_lr, steps=steps, log=(lambda s: None) if cfg.quiet else say, warn=say)
    written = plot_lr_find(result, plot)
    if fmt == "json":
        print(json.dumps(result.to_dict()))
        err.print(f"plot: {escape(str(written))}")
        return
    out.print(escape(result.summary()), soft_wrap=True)
    out.print(f"use it: {escape(_train_command(given, config, result.suggestion))}", soft_wrap=True)
    out.print(f"plot: {escape(str(written))}", soft_wrap=True)


def _train_command(given: dict[str, Any], config: Path | None, lr: float) -> str:
    """``cnntrain train`` with the options lr-find was given and ``--lr``, ready to paste."""
    import shlex

    words = ["cnntrain", "train"] + (["--config", str(config)] if config is not None else [])
    for key, value in given.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else flag.replace("--", "--no-", 1))
        else:
            words += [flag, str(value)]
    return shlex.join([*words, "--lr", f"{lr:.2g}"])


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


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
