"""Training configuration: defaults in code, then a YAML file, then the command line.

One flat dataclass keeps `config.yaml` in every run folder readable and rerunnable with
``cnntrain train --config runs/exp/config.yaml``; unknown keys are rejected by name so a
typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cnntrain.choices import (
    AUG_PRESETS,
    AUGMENTATIONS,
    CACHE_MODES,
    CLASS_WEIGHT_MODES,
    LR_SCALES,
    OPTIMIZERS,
    SAMPLERS,
    SCHEDULES,
)
from cnntrain.errors import UsageError, first_line, missing_extra

_S = TypeVar("_S")
#: The largest seed every generator a run seeds takes (NumPy's limit; torch's samplers scale it).
SEED_MAX = 2**32 - 1
#: Largest --lr, --backbone-lr-mult and --weight-decay: far above any useful value, and products of
#: them still fit the float32 an optimiser computes in (1e300 overflows there, mid-step).
RATE_MAX = 1e4
#: Largest --img-size: 16x what ImageNet models train at; a batch of 4096 px images is already 200 MB each.
IMG_SIZE_MAX = 4096
#: Largest --workers: each is a process holding a copy-on-write image of this one (a 2**64 asked for
#: forked until the machine ran out of memory).
WORKERS_MAX = 256


@dataclass
class TrainConfig:
    # data
    data_path: str | None = None
    dataset: str | None = None
    labels: str | None = None  # a CSV of path,label[,split]; its paths are relative to it, or to data_path
    val_split: float = 0.1
    img_size: int = 224
    aug: list[str] = field(default_factory=list)
    aug_preset: str = "photo"  # the values below that suit a kind of data; each can still be set alone
    hflip: float = 0.5
    vflip: float = 0.0
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    rotate: float = 0.0
    color_jitter: float = 0.0
    workers: int | None = None  # None: min(8, CPU count)
    strict: bool = False  # unreadable images are an error instead of being skipped
    cache: str = "auto"  # decoded-image cache: auto, ram, disk or none
    cache_max_gb: float | None = None  # RAM budget of the cache; None: a quarter of available memory
    gpu_decode: bool = False  # CUDA: decode and augment JPEGs on the GPU (the image cache is then off)
    sampler: str = "shuffle"  # shuffle: every image once per epoch; balanced: classes drawn equally often
    # model
    arch: str = "resnet18"
    pretrained: bool | None = None  # None: use ImageNet weights where they exist
    weights: str | None = None
    freeze_layers: bool = False
    unfreeze_epoch: int | None = None
    feature_cache: bool = True  # frozen backbone + --aug none: compute its features once
    # optimisation
    epochs: int = 10
    batch_size: int = 32
    batch_size_auto: bool = False  # --batch-size auto: the largest batch that fits the GPU, saved as batch_size
    opt: str = "sgd"
    lr: float = 0.01
    lr_auto: bool = False  # --lr auto: run the LR range test first; the rate found is then saved as lr
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    sched: str = "cosine"
    step_size: int = 10
    gamma: float = 0.1
    milestones: list[int] = field(default_factory=list)
    lrf: float = 0.01
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    class_weights: str = "none"  # none, auto (inverse class frequency) or a YAML/JSON file of class: weight
    mixup: float = 0.0  # Beta(alpha, alpha) of mixup on training batches; 0 = off
    cutmix: float = 0.0  # Beta(alpha, alpha) of cutmix; 0 = off
    mix_switch_prob: float = 0.5  # with both: the chance a batch gets cutmix instead of mixup
    ema: bool = False  # also keep an exponential moving average of the weights, validated beside them
    ema_decay: float = 0.999
    backbone_lr_mult: float = 1.0  # the backbone trains at lr x this, the new head at lr
    clip_grad: float | None = None
    patience: int | None = None
    # hardware and reproducibility
    device: str = "auto"
    amp: bool | None = None  # None: on for CUDA
    compile: bool = False
    sync_bn: bool = False  # distributed: BatchNorm statistics over all processes (CUDA)
    lr_scale: str = "none"  # distributed: "linear" multiplies --lr by the number of processes
    seed: int = 0
    deterministic: bool = False
    # output
    project: str = "runs"
    name: str = "exp"
    exist_ok: bool = False
    resume: str | None = None
    quiet: bool = False
    tensorboard: bool = False  # also log each epoch for TensorBoard in RUN/tensorboard (extra cnntrain[tensorboard])

    def validate(self) -> TrainConfig:
        """Reject values no run could use, before any data is read or model built."""
        for key, value in self.to_dict().items():
            numbers = value if isinstance(value, list) else [value]
            if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
                # NaN passes every comparison below (`nan <= 0` is False): refused here, by name
                raise UsageError(f"--{key.replace('_', '-')} must be a finite number, not {value}")
        checks = [
            (not 0 <= self.seed <= SEED_MAX, f"--seed must be between 0 and {SEED_MAX} (2**32 - 1)"),
            (self.data_path is not None and self.dataset is not None, "give --data-path or --dataset, not both"),
            (self.labels is not None and self.dataset is not None,
             "--labels lists your own images: give it with --data-path DIR or alone, not with --dataset"),
            (self.labels is not None and not self.labels.strip(), "--labels needs a CSV file of path,label rows"),
            (self.dataset is not None and not self.dataset.strip(),
             "--dataset needs a name, e.g. shapes (an empty one is not the default)"),
            (self.epochs < 1, "--epochs must be at least 1"),
            (self.batch_size < 1, "--batch-size must be at least 1"),
            (not 16 <= self.img_size <= IMG_SIZE_MAX,
             f"--img-size must be between 16 and {IMG_SIZE_MAX} pixels, e.g. 224"),
            (not 0.0 <= self.val_split < 1.0, "--val-split must be in [0, 1)"),
            (not 0 < self.lr <= RATE_MAX, f"--lr must be positive and at most {RATE_MAX:g}"),
            (not 0 <= self.momentum <= 1, "--momentum must be in [0, 1], e.g. 0.9"),
            (not 0 <= self.weight_decay <= RATE_MAX, f"--weight-decay must be in [0, {RATE_MAX:g}], e.g. 1e-4"),
            (self.step_size < 1, "--step-size must be at least 1 epoch"),
            (not 0 < self.gamma <= 1, "--gamma must be in (0, 1], e.g. 0.1 (the factor the rate is cut by)"),
            (not 0 <= self.lrf <= 1, "--lrf must be in [0, 1] (the cosine floor, as a fraction of --lr)"),
            (any(m < 1 for m in self.milestones), "--milestones are epochs, counted from 1"),
            (self.clip_grad is not None and not self.clip_grad > 0, "--clip-grad must be positive"),
            (self.opt not in OPTIMIZERS, f"--opt must be one of {', '.join(OPTIMIZERS)}"),
            (self.sched not in SCHEDULES, f"--sched must be one of {', '.join(SCHEDULES)}"),
            (self.sched == "multistep" and not self.milestones, "--sched multistep needs --milestones, e.g. 10,20"),
            (self.warmup_epochs < 0 or 0 < self.epochs <= self.warmup_epochs,
             "--warmup-epochs must be smaller than --epochs"),
            (not 0.0 <= self.label_smoothing < 1.0, "--label-smoothing must be in [0, 1)"),
            (self.workers is not None and not 0 <= self.workers <= WORKERS_MAX,
             f"--workers must be between 0 and {WORKERS_MAX} loader processes (default: one per CPU, up to 8)"),
            (self.cache not in CACHE_MODES, f"--cache must be one of {', '.join(CACHE_MODES)}"),
            (self.cache_max_gb is not None and not self.cache_max_gb > 0, "--cache-max-gb must be positive"),
            (self.unfreeze_epoch is not None and not self.freeze_layers, "--unfreeze-epoch needs --freeze-layers"),
            (self.unfreeze_epoch is not None and self.unfreeze_epoch < 1, "--unfreeze-epoch counts from 1"),
            (self.patience is not None and self.patience < 1, "--patience must be at least 1"),
            (self.weights is not None and self.pretrained is True, "--weights FILE and --pretrained conflict"),
            (self.lr_scale not in LR_SCALES, f"--lr-scale must be one of {', '.join(LR_SCALES)}"),
            (self.sampler not in SAMPLERS, f"--sampler must be one of {', '.join(SAMPLERS)}"),
            (self.mixup < 0 or self.cutmix < 0, "--mixup and --cutmix take an alpha of 0 (off) or more, e.g. 0.2"),
            (not 0.0 <= self.mix_switch_prob <= 1.0, "--mix-switch-prob must be in [0, 1]"),
            (not 0.0 < self.ema_decay < 1.0, "--ema-decay must be between 0 and 1, e.g. 0.999"),
            (not 0 < self.backbone_lr_mult <= RATE_MAX, f"--backbone-lr-mult must be positive and at most "
                                                       f"{RATE_MAX:g}, e.g. 0.1"),
            (self.class_weights not in CLASS_WEIGHT_MODES and not Path(self.class_weights).is_file(),
             f"--class-weights must be none, auto or a YAML/JSON file of class: weight; {self.class_weights!r} is "
             "neither"),
        ]
        for bad, message in checks:
            if bad:
                raise UsageError(message)
        name_problem = run_name_problem(self.name)
        if name_problem is not None:  # before any data is read, like every other output problem
            raise UsageError(f"--name {self.name!r}: {name_problem}")
        if len(self.crop_scale) != 2 or len(self.crop_ratio) != 2:
            raise UsageError("--crop-scale and --crop-ratio take two numbers, MIN,MAX, e.g. --crop-scale 0.5,1")
        unknown = [a for a in self.aug if a not in AUGMENTATIONS]
        if unknown:
            raise UsageError(f"unknown --aug {', '.join(unknown)}; choose from {', '.join(AUGMENTATIONS)}")
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:  # looked up, not imported
            raise missing_extra("--tensorboard", "the tensorboard package", "tensorboard")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def pick(self, settings: type[_S], **changes: Any) -> _S:
        """The sub-config ``settings`` (a dataclass whose fields are named as here) filled from
        this config: library functions receive what they use, not the whole TrainConfig."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(settings)}  # type: ignore[arg-type]
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return settings(**{**values, **changes})


FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}

#: ``project/latest`` points at the run last started, so no run may be named that.
LATEST = "latest"


def run_name_problem(name: object) -> str | None:
    """Why ``name`` cannot name a run folder inside ``--project``, or None when it can.

    A run is one folder directly in the project: a name with a separator or ``..`` would put it
    somewhere else (or nowhere), and ``latest`` is the link to the run last started."""
    if not isinstance(name, str) or not name.strip():
        return "a run needs a name, e.g. --name exp"
    if "/" in name or "\\" in name or "\0" in name or name in (".", ".."):
        return "a run name is one folder name, without / or \\ (use --project for where runs go)"
    if name == LATEST:
        return f"reserved: project/{LATEST} points at the run last started; choose another --name"
    return None

# What a built-in dataset trains well with, beneath the recipe and the flags. `shapes` (the data
# when none is named) is drawn at 64 px: ImageNet weights would need the network, and upsampling
# to 224 px would make the offline first run take ten minutes on a laptop instead of one.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "shapes": {"img_size": 64, "pretrained": False, "epochs": 6, "opt": "adamw", "lr": 0.002,
               "weight_decay": 0.05, "sched": "cosine"},
}


def dataset_defaults(values: Mapping[str, Any]) -> dict[str, Any]:
    """The defaults of the built-in dataset ``values`` train on (``shapes`` when no data is named)."""
    dataset = values.get("dataset") or (None if values.get("data_path") or values.get("labels") else "shapes")
    return dict(DATASET_DEFAULTS.get(dataset or "", {}))


def describe_defaults(defaults: Mapping[str, Any]) -> str:
    """``img_size 64, pretrained false, ...`` for the line that says they are used."""
    return ", ".join(f"{k} {str(v).lower() if isinstance(v, bool) else v}" for k, v in defaults.items())


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML recipe; keys may use dashes like the CLI (``batch-size``)."""
    import yaml  # here, not at the top: `cnntrain --help` reads this module's defaults

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file {path} " + ("is a folder" if path.is_dir() else "does not exist"))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:  # an image or a checkpoint given as --config
        raise UsageError(f"config file {path} is not text; a recipe is a YAML file (UTF-8)") from None
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise UsageError(f"config file {path} is not valid YAML: {first_line(exc)}") from None
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must be a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_config(file_values: Mapping[str, Any] | None = None, overrides: Mapping[str, Any] | None = None,
                 source: str = "config") -> TrainConfig:
    """Defaults < file values < overrides (only options given on the command line).

    ``data_path``, ``labels`` and ``dataset`` are one choice, the data: any of them given on the command line
    replaces all three of the file's (a recipe naming ``dataset: flowers`` runs on ``--data-path DIR``).
    Both in one layer is still an error. Beneath both lie the built-in dataset's own defaults
    (``DATASET_DEFAULTS``)."""
    file_values, overrides = dict(file_values or {}), dict(overrides or {})
    if any(overrides.get(key) is not None for key in _DATA_KEYS):
        for key in _DATA_KEYS:
            file_values.pop(key, None)
    values: dict[str, Any] = {}
    for layer, where in ((file_values, source), (overrides, "command line")):
        unknown = sorted(set(layer) - FIELDS)
        if unknown:
            raise UsageError(f"unknown option {unknown[0]!r} in {where}; valid keys are listed by "
                             "`cnntrain train --help`")
        values.update(layer)
    preset = values.get("aug_preset", "photo")
    if preset not in AUG_PRESETS:
        raise UsageError(f"--aug-preset must be one of {', '.join(AUG_PRESETS)}, not {preset!r}")
    values = {**dataset_defaults(values), **AUG_PRESETS[preset], **values}
    for key, flag in AUTO_KEYS.items():
        if isinstance(values.get(key), str) and values[key].strip().lower() == "auto":
            values[flag] = True
            del values[key]
        elif key in values:
            values[flag] = False  # a number given now replaces a recipe's `lr: auto`
            values[key] = _number_or_auto(key, values[key])
    for key, kind in _LISTS.items():
        if isinstance(values.get(key), (str, int)):
            values[key] = _split_list(values[key], kind)
        elif isinstance(values.get(key), tuple):
            values[key] = list(values[key])
    return TrainConfig(**{k: _coerce(k, v) for k, v in values.items()}).validate()


#: Options that also take ``auto``: the run measures the value first and saves the number.
AUTO_KEYS = {"lr": "lr_auto", "batch_size": "batch_size_auto"}
_DATA_KEYS = ("data_path", "dataset", "labels")  # where the images come from: one choice, whichever layer makes it
_LISTS: dict[str, type] = {"aug": str, "milestones": int, "crop_scale": float, "crop_ratio": float}  # a,b on the CLI
_TYPES = typing.get_type_hints(TrainConfig)


def _number_or_auto(key: str, value: Any) -> Any:
    """The command line gives ``--lr``/``--batch-size`` as text (they also take ``auto``)."""
    if not isinstance(value, str):
        return value
    kind = int if key == "batch_size" else float
    try:
        return kind(value)
    except ValueError:
        raise UsageError(f"--{key.replace('_', '-')} must be a {_TYPE_NAMES[kind]} or auto, not {value!r}") from None


def _coerce(key: str, value: Any) -> Any:
    """Check a value against the field's type (YAML gives ``1e-4`` as a string, ``5`` for 5.0)."""
    kind = _TYPES[key]
    optional = typing.get_origin(kind) in (typing.Union, types.UnionType)
    if value is None:
        if optional:
            return None
        raise UsageError(f"option {key!r} needs a value")
    base = next(a for a in typing.get_args(kind) if a is not type(None)) if optional else kind
    origin = typing.get_origin(base)
    try:
        if origin is list:
            (item,) = typing.get_args(base)
            if not isinstance(value, list):
                raise ValueError
            return [_scalar(item, v) for v in value]
        return _scalar(base, value)
    except (TypeError, ValueError):
        expected = _TYPE_NAMES.get(base, "list")
        raise UsageError(f"option {key!r} has the wrong type: {value!r} ({expected} expected)") from None


_TYPE_NAMES = {bool: "true/false", int: "whole number", float: "number", str: "text"}


def _scalar(kind: type, value: Any) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ValueError
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError
        return value
    if kind is float:
        if isinstance(value, bool):
            raise ValueError
        return float(value)  # accepts ints and YAML 1.1's string form of 1e-4
    if kind is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError
        return str(value)
    raise TypeError(kind)


def _split_list(value: str | int, kind: type) -> list[Any]:
    if isinstance(value, int):
        return [value]
    try:
        return [kind(v.strip()) for v in value.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"cannot read {value!r} as a comma-separated list") from None


# Not part of what a run is: --resume says where to continue, --quiet how much to print. config.yaml
# leaves them out so that ``--config runs/exp/config.yaml`` reruns the run from scratch.
NOT_SAVED = ("resume", "quiet")


def save_yaml(config: TrainConfig) -> str:
    """config.yaml of a run: every option but ``NOT_SAVED`` (the checkpoint's own config has all)."""
    import yaml

    values = {k: v for k, v in config.to_dict().items() if k not in NOT_SAVED}
    return yaml.safe_dump(values, sort_keys=False)
