"""``cnntrain train`` and ``cnntrain lr-find``: the commands that build a run from options."""

# One option per line: the signatures read as tables of options.
# ruff: noqa: E501

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from cnntrain.choices import (
    AUGMENTATIONS,
    CACHE_MODES,
    LR_FIND_FORMATS,
    LR_SCALES,
    OPTIMIZERS,
    SAMPLERS,
    SCHEDULES,
)
from cnntrain.cli.app import check_choice, command, default, err, one_of, out

# --------------------------------------------------------------------------- train


def _panel(title: str) -> Callable[..., Any]:
    return functools.partial(typer.Option, rich_help_panel=title)


Data, Model, Optim, Hardware, Output = map(_panel, ("Data", "Model", "Optimisation", "Hardware", "Output"))
_AUGS = ", ".join(a for a in AUGMENTATIONS if a != "none")

# Options train and lr-find share (lr-find measures the loss the training it is for will see).
DataPath = Annotated[Path | None, Data("--data-path", "--data", help="ImageFolder root: one sub-folder per class (or train/ + val/).")]
Labels = Annotated[Path | None, Data(help="CSV of path,label rows (optional third column split: train, val or test) instead of class folders; paths relative to the CSV's folder, or to --data-path DIR when given.")]
ImgSize = Annotated[int | None, Data(help=f"Training crop size {default('img_size')}.")]
Workers = Annotated[int | None, Data(help=f"DataLoader worker processes {default('workers', 'min(8, CPUs)')}.")]
Arch = Annotated[str | None, Model(help=f"Architecture name (see `cnntrain models`) {default('arch')}.")]
Pretrained = Annotated[bool | None, Model("--pretrained/--no-pretrained", help=f"Start from ImageNet weights {default('pretrained', 'on where they exist')}.")]
Weights = Annotated[Path | None, Model(help="Start from a cnntrain checkpoint or a plain state dict.")]
FreezeLayers = Annotated[bool | None, Model("--freeze-layers/--no-freeze-layers", help=f"Train only the classifier head {default('freeze_layers')}.")]
Optimizer = Annotated[str | None, Optim(help=f"{one_of(OPTIMIZERS)} {default('opt')}.")]
Momentum = Annotated[float | None, Optim(help=f"SGD momentum {default('momentum')}.")]
WeightDecay = Annotated[float | None, Optim(help=f"L2 penalty on the weights {default('weight_decay')}.")]
Device = Annotated[str | None, Hardware(help=f"auto, cpu, cuda, cuda:N or mps {default('device')}.")]
Seed = Annotated[int | None, Hardware(help=f"Random seed {default('seed')}.")]
BuiltinDataset = Annotated[str | None, Data(help="Built-in dataset: shapes (offline; the default), flowers, cifar10, cifar100.")]
ValSplit = Annotated[float | None, Data(help=f"Held-out fraction per class when DIR is not pre-split {default('val_split')}.")]
AugPreset = Annotated[str | None, Data(help=f"Augmentation that fits the data: photo (mirrors and 8-100% crops), no-mirror (digits, text, signs: no flips, 60-100% crops, +-10 deg), light (few images: gentle); the options below change one value each {default('aug_preset')}.")]
HFlip = Annotated[float | None, Data(help=f"Probability of a left-right mirror; 0 where a mirror image is another class {default('hflip')}.")]
VFlip = Annotated[float | None, Data(help=f"Probability of an upside-down flip (aerial or microscope images) {default('vflip')}.")]
CropScale = Annotated[str | None, Data(help="MIN,MAX share of the image's area a training crop keeps (default: 0.08,1).")]
CropRatio = Annotated[str | None, Data(help="MIN,MAX aspect ratio of a training crop (default: 0.75,1.33).")]
Rotate = Annotated[float | None, Data(help=f"Random rotation, up to this many degrees either way {default('rotate')}.")]
ColorJitter = Annotated[float | None, Data(help=f"Brightness, contrast and saturation changed by up to this fraction {default('color_jitter')}.")]


@command(no_args_is_help=False)
def train(
    data_path: DataPath = None,
    labels: Labels = None,
    dataset: Annotated[str | None, Data(help="Built-in dataset: shapes (offline; the default, trained from scratch at its own 64 px unless options say otherwise), flowers, cifar10, cifar100.")] = None,
    val_split: ValSplit = None,
    img_size: ImgSize = None,
    aug: Annotated[str | None, Data(help=f"Extra augmentation, comma-separated: {_AUGS}; 'none' = deterministic.")] = None,
    aug_preset: AugPreset = None,
    hflip: HFlip = None,
    vflip: VFlip = None,
    crop_scale: CropScale = None,
    crop_ratio: CropRatio = None,
    rotate: Rotate = None,
    color_jitter: ColorJitter = None,
    workers: Workers = None,
    strict: Annotated[bool | None, Data("--strict/--no-strict", help=f"Any unreadable image is an error, instead of being skipped with a warning {default('strict')}.")] = None,
    cache: Annotated[str | None, Data(help=f"Decode each image once and keep it, resized, for every epoch: {one_of(CACHE_MODES)}; auto = RAM if it fits --cache-max-gb, else disk {default('cache')}.")] = None,
    cache_max_gb: Annotated[float | None, Data(help=f"RAM budget of --cache in GB {default('cache_max_gb', 'a quarter of the available memory')}.")] = None,
    sampler: Annotated[str | None, Data(help=f"{one_of(SAMPLERS)}: every image once per epoch, or classes drawn equally often (with replacement; for imbalanced folders) {default('sampler')}.")] = None,
    gpu_decode: Annotated[bool | None, Data("--gpu-decode/--no-gpu-decode", help=f"On CUDA, decode and augment JPEGs on the GPU (nvjpeg) instead of in the loader workers; turns the image cache off {default('gpu_decode')}.")] = None,
    arch: Arch = None,
    pretrained: Pretrained = None,
    weights: Weights = None,
    freeze_layers: FreezeLayers = None,
    unfreeze_epoch: Annotated[int | None, Model(help="With --freeze-layers: unfreeze everything from this epoch on (1-based).")] = None,
    feature_cache: Annotated[bool | None, Model("--feature-cache/--no-feature-cache", help=f"With --freeze-layers and --aug none, run the backbone once and train the head on cached features {default('feature_cache')}.")] = None,
    epochs: Annotated[int | None, Optim(help=f"Passes over the training data {default('epochs')}.")] = None,
    batch_size: Annotated[str | None, Optim(help=f"Images per step, per process, or auto: on CUDA the largest batch that fits 85% of the GPU's memory, verified by a real step (config.yaml keeps the number) {default('batch_size')}.")] = None,
    opt: Optimizer = None,
    lr: Annotated[str | None, Optim(help=f"Base learning rate, or auto: run the range test of `cnntrain lr-find` first and train at the rate it suggests (config.yaml keeps the number) {default('lr')}.")] = None,
    momentum: Momentum = None,
    nesterov: Annotated[bool | None, Optim("--nesterov/--no-nesterov", help=f"Nesterov momentum for SGD {default('nesterov')}.")] = None,
    weight_decay: WeightDecay = None,
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
    device: Device = None,
    amp: Annotated[bool | None, Hardware("--amp/--no-amp", help=f"Mixed precision on CUDA {default('amp', 'on')}.")] = None,
    compile: Annotated[bool | None, Hardware("--compile/--no-compile", help=f"torch.compile the model {default('compile')}.")] = None,
    nproc: Annotated[int | None, Hardware(help="Train data-parallel with this many processes on this machine (one per GPU), launched through torchrun; --batch-size is per process.")] = None,
    sync_bn: Annotated[bool | None, Hardware("--sync-bn/--no-sync-bn", help=f"Distributed, CUDA only: BatchNorm statistics over all processes {default('sync_bn')}.")] = None,
    lr_scale: Annotated[str | None, Hardware(help=f"Distributed: {one_of(LR_SCALES)}; none keeps --lr as given, linear multiplies it by the number of processes {default('lr_scale')}.")] = None,
    seed: Seed = None,
    deterministic: Annotated[bool | None, Hardware("--deterministic/--no-deterministic", help=f"Deterministic algorithms: reproducible on the CPU, slower; on CUDA an operation with no deterministic kernel still runs, with a warning {default('deterministic')}.")] = None,
    project: Annotated[str | None, Output(help=f"Folder for runs {default('project')}.")] = None,
    name: Annotated[str | None, Output(help=f"Run name; taken names get 2, 3, ... {default('name')}.")] = None,
    exist_ok: Annotated[bool | None, Output("--exist-ok", help=f"Reuse project/name instead of numbering {default('exist_ok')}.")] = None,
    resume: Annotated[str | None, Output(help="Continue a run: its last.pt, its folder, or 'auto' for the latest.")] = None,
    quiet: Annotated[bool | None, Output("--quiet/--no-quiet", "-q", help=f"Print only the final summary; --no-quiet overrides a recipe's quiet: true {default('quiet')}.")] = None,
    tensorboard: Annotated[bool | None, Output("--tensorboard/--no-tensorboard", help=f"Also log each epoch's losses, accuracies, learning rate and confusion matrix to RUN/tensorboard; view with `tensorboard --logdir runs`; needs pip install 'cnntrain\\[tensorboard]' {default('tensorboard')}.")] = None,
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
    if (result.run_dir / "report.html").is_file():
        table.add_row("report", str(result.run_dir / "report.html"))
    out.print(table)



# --------------------------------------------------------------------------- lr-find


@command("lr-find", no_args_is_help=False)
def lr_find(
    data_path: DataPath = None,
    labels: Labels = None,
    dataset: BuiltinDataset = None,
    img_size: ImgSize = None,
    aug_preset: AugPreset = None,
    hflip: HFlip = None,
    vflip: VFlip = None,
    crop_scale: CropScale = None,
    crop_ratio: CropRatio = None,
    rotate: Rotate = None,
    color_jitter: ColorJitter = None,
    workers: Workers = None,
    arch: Arch = None,
    pretrained: Pretrained = None,
    weights: Weights = None,
    freeze_layers: FreezeLayers = None,
    batch_size: Annotated[int | None, Optim(help=f"Images per step {default('batch_size')}.")] = None,
    opt: Optimizer = None,
    momentum: Momentum = None,
    weight_decay: WeightDecay = None,
    start_lr: Annotated[float, Optim(help="The rate of the first step.")] = 1e-7,
    end_lr: Annotated[float, Optim(help="The rate of the last step; the test stops sooner if the loss diverges.")] = 10.0,
    steps: Annotated[int, Optim(help="Optimiser steps, the rate rising exponentially from --start-lr to --end-lr (the data is cycled if it has fewer batches).")] = 100,
    device: Device = None,
    seed: Seed = None,
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

    options = dict(data_path=data_path, labels=labels, dataset=dataset, img_size=img_size, aug_preset=aug_preset, hflip=hflip,
                   vflip=vflip, crop_scale=crop_scale, crop_ratio=crop_ratio, rotate=rotate, color_jitter=color_jitter,
                   workers=workers, arch=arch, pretrained=pretrained, weights=weights, freeze_layers=freeze_layers,
                   batch_size=batch_size, opt=opt, momentum=momentum, weight_decay=weight_decay, device=device,
                   seed=seed)
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
