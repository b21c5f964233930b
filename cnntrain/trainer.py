"""``fit(config)``: data, model and optimiser in, a complete run folder out.

The epoch loop itself lives in ``engine``; this module decides what to build, when to
unfreeze, what to save and when to stop. Epochs are 0-based inside and 1-based on screen.

Resuming: last.pt is written at the end of every epoch and, on Ctrl-C/SIGTERM, after the
current step (with the epoch's running sums). A run stopped by a signal continues at the
batch where it stopped; a run killed outright restarts the epoch after its last completed
one. Either way the state (weights, optimiser, schedule, RNG) is exact, and the sampler's
per-(epoch, sample) seeding replays the same batches.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from cnntrain import checkpoint, fileio
from cnntrain.config import TrainConfig, save_yaml
from cnntrain.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetSplits,
    ImageDataset,
    Normalize,
    collate_skipping,
    default_workers,
    eval_transform,
    load_builtin,
    load_folder,
    make_loader,
    scan_samples,
    train_transform,
)
from cnntrain.data.sampler import EpochSampler, SeededDataset
from cnntrain.engine import Batcher, EpochTotals, evaluate, train_one_epoch
from cnntrain.errors import CheckpointError, CnnTrainError, DataError, UsageError
from cnntrain.features import cached_features
from cnntrain.models import build_model, find_head, freeze_backbone, get_spec
from cnntrain.models.heads import keep_frozen_bn_eval, unfreeze
from cnntrain.optim import build_optimizer, build_scheduler
from cnntrain.progress import Reporter, format_epoch
from cnntrain.signals import Interrupted, StopRequest

METRIC_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_top5", "lr", "seconds", "images_per_s"]


@dataclass
class TrainResult:
    run_dir: Path
    best_epoch: int
    best_metric: float
    monitor: str
    epochs_run: int
    seconds: float
    stopped_early: bool
    history: list[dict[str, Any]] = field(default_factory=list)


# ------------------------------------------------------------------------------ set-up


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown --device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("--device mps: Apple's MPS backend is not available here; use --device cpu")
    return device


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.backends.cudnn.benchmark = True


def amp_dtype_for(device: torch.device, amp: bool | None) -> torch.dtype | None:
    """bf16 where the GPU supports it, else fp16 (which needs a GradScaler); off on CPU/MPS."""
    if device.type != "cuda" or amp is False:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_splits(cfg: TrainConfig, reporter: Reporter) -> DatasetSplits:
    if cfg.data_path:
        splits = load_folder(cfg.data_path, val_split=cfg.val_split, seed=cfg.seed)
    else:
        if cfg.dataset is None:
            reporter.info("no --data-path or --dataset given: training on the built-in offline dataset `shapes`")
        splits = load_builtin(cfg.dataset or "shapes", val_split=cfg.val_split, seed=cfg.seed)
    return drop_unreadable(splits, cfg.strict, reporter)


def drop_unreadable(splits: DatasetSplits, strict: bool, reporter: Reporter) -> DatasetSplits:
    """Decode every image once before training (cached), so one bad file cannot end a run."""
    scan = scan_samples(splits.train + splits.val, strict=strict, progress=reporter.interactive)
    warning = scan.warning()
    if warning is None:
        return splits
    reporter.always(f"warning: {warning}")
    good = {path for path, _ in scan.good}
    train = [s for s in splits.train if s[0] in good]
    empty = sorted(set(splits.classes) - {splits.classes[label] for _, label in train})
    if empty:
        raise DataError(f"class {', '.join(empty)} has no readable training images left; add images or remove "
                        "the folder")
    return dataclasses.replace(splits, train=train, val=[s for s in splits.val if s[0] in good])


def normalisation(arch: str) -> tuple[list[float], list[float]]:
    """Mean/std from the architecture's ImageNet weights metadata (ImageNet's by default)."""
    weights = get_spec(arch).weights
    if weights is not None:
        preset = weights.transforms()
        return list(preset.mean), list(preset.std)
    return list(IMAGENET_MEAN), list(IMAGENET_STD)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resolve_resume(value: str, project: str) -> Path:
    """``auto`` -> the latest run's last.pt; a run folder -> its last.pt; else the file."""
    if value == "auto":
        run = checkpoint.latest_run(project)
        if run is None:
            raise UsageError(f"--resume auto: no runs in {project}/ to resume; start one with `cnntrain train`")
        path = run / "last.pt"
    else:
        path = Path(value)
        if path.is_dir():
            path = path / "last.pt"
    if not path.is_file():
        raise UsageError(f"--resume {value}: {path} does not exist")
    return path


def write_metrics_csv(path: Path, history: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in METRIC_COLUMNS})
    write_text(path, buf.getvalue())


# ------------------------------------------------------------------------------ fit


def fit(cfg: TrainConfig, reporter: Reporter | None = None) -> TrainResult:
    """Train ``cfg.arch`` as configured; returns where the run was written and how it went.

    Expected failures mid-run (out of memory, a dead loader worker, a full disk) become
    ``CnnTrainError``s; the checkpoints already on disk are never the casualty.
    """
    reporter = reporter or Reporter(quiet=cfg.quiet)
    try:
        with StopRequest() as stop:
            return _fit(cfg, reporter, stop)
    except torch.OutOfMemoryError:
        half = max(cfg.batch_size // 2, 1)
        raise CnnTrainError(f"out of memory on {cfg.device} at --batch-size {cfg.batch_size}; "
                            f"try --batch-size {half} (or a smaller --img-size)") from None
    except RuntimeError as exc:
        if "DataLoader worker" in str(exc):
            first = str(exc).strip().splitlines()[0]
            raise DataError(f"a data loading worker died ({first}); rerun with --workers 0 to see the "
                            "underlying error") from None
        raise


def _fit(cfg: TrainConfig, reporter: Reporter, stop: StopRequest) -> TrainResult:
    started = time.perf_counter()
    resume_path = resolve_resume(cfg.resume, cfg.project) if cfg.resume else None
    resumed = checkpoint.load(resume_path) if resume_path else None
    if resumed is not None and "optimizer" not in resumed:
        raise CheckpointError(f"{resume_path} holds no training state; resume from a run's last.pt")
    if resume_path is None:
        checkpoint.check_project(cfg.project)  # an unusable output folder fails before any work

    device = resolve_device(cfg.device)
    seed_everything(cfg.seed, cfg.deterministic)
    splits = load_splits(cfg, reporter)
    classes = splits.classes
    if len(splits.train) < 2:
        raise DataError(f"only {len(splits.train)} training image(s) found; training needs at least 2")
    if resumed is not None and resumed["classes"] != classes:
        raise UsageError(f"{resume_path} was trained on classes {resumed['classes']}, the data has {classes}")
    reporter.info(splits.summary())

    spec = get_spec(cfg.arch)
    pretrained = cfg.pretrained
    if pretrained is None:
        pretrained = spec.weights is not None and cfg.weights is None and resumed is None
        if spec.weights is None and cfg.weights is None:
            reporter.info(f"{cfg.arch} has no ImageNet weights: training from scratch")
    model, load_report = build_model(cfg.arch, len(classes), pretrained=pretrained)
    if load_report is not None:
        reporter.info(load_report.summary())
    head = find_head(model, len(classes))
    if cfg.weights and resumed is None:
        start = checkpoint.load(cfg.weights)
        reporter.info(checkpoint.load_weights_into(model, start["model"], head, cfg.weights).summary(cfg.weights))
    if resumed is not None:
        model.load_state_dict(resumed["model"])
    mean, std = normalisation(cfg.arch)

    if resume_path is not None:
        run_dir = resume_path.parent
        fileio.clean_stale_temps(run_dir, older_than=0)  # leftovers of a killed run
    else:
        run_dir = checkpoint.new_run_dir(cfg.project, cfg.name, cfg.exist_ok)
    reporter.info(f"run folder: {run_dir}")

    start_epoch = resumed["epoch"] if resumed is not None else 0  # epochs completed
    partial = resumed.get("partial_epoch") if resumed is not None else None  # stopped mid-epoch
    frozen = cfg.freeze_layers and (cfg.unfreeze_epoch is None or start_epoch + 1 < cfg.unfreeze_epoch)
    if frozen:
        freeze_backbone(model, head)

    amp_dtype = amp_dtype_for(device, cfg.amp)
    channels_last = device.type == "cuda"
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    train_model: nn.Module = torch.compile(model) if cfg.compile else model

    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    monitor = "val_acc" if splits.val else "train_acc"
    best_metric, best_epoch, history = -math.inf, 0, []
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        if scaler is not None and resumed.get("scaler"):
            scaler.load_state_dict(resumed["scaler"])
        best_metric, best_epoch = resumed["best_metric"], resumed["best_epoch"]
        history = list(resumed["history"])
        set_rng_state(resumed["rng"])
        where = f"epoch {start_epoch + 1}, step {partial['steps']}" if partial else f"the end of epoch {start_epoch}"
        reporter.info(f"resuming {resume_path} from {where} of {cfg.epochs}")

    workers = default_workers() if cfg.workers is None else cfg.workers
    deterministic_train = "none" in cfg.aug
    train_tf = eval_transform(cfg.img_size) if deterministic_train else train_transform(cfg.img_size, cfg.aug)
    sampler = EpochSampler(splits.train, shuffle=True, seed=cfg.seed)
    # BatchNorm cannot train on a batch of one: skip that lone last sample (a different one
    # each epoch, as the order is shuffled) rather than crash at the end of the epoch.
    drop_last = len(splits.train) % cfg.batch_size == 1
    # Files that break after the scan are skipped and counted, never fatal (collate_skipping).
    train_loader = make_loader(SeededDataset(ImageDataset(splits.train, train_tf, skip_unreadable=True)),
                               batch_size=cfg.batch_size, shuffle=False, sampler=sampler, workers=workers,
                               device=device, seed=cfg.seed, drop_last=drop_last, collate_fn=collate_skipping)
    val_loader = None
    if splits.val:
        val_loader = make_loader(ImageDataset(splits.val, eval_transform(cfg.img_size), skip_unreadable=True),
                                 batch_size=cfg.batch_size, shuffle=False, workers=workers, device=device,
                                 seed=cfg.seed, collate_fn=collate_skipping)
    batcher = Batcher(device, Normalize(mean, std).to(device), channels_last, amp_dtype)
    features = None
    if frozen and cfg.feature_cache and deterministic_train:
        features = cached_features(model, head, splits, val_loader, batcher, cfg, workers, device, reporter)

    write_text(run_dir / "config.yaml", save_yaml(cfg))
    write_text(run_dir / "class_indices.json", json.dumps({str(i): c for i, c in enumerate(classes)}, indent=2))
    describe = dict(arch=cfg.arch, classes=classes, img_size=cfg.img_size, mean=mean, std=std, config=cfg.to_dict())

    def training_state(**extra: Any) -> dict[str, Any]:
        return dict(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                    scaler=scaler.state_dict() if scaler is not None else None, best_metric=best_metric,
                    best_epoch=best_epoch, history=history, rng=rng_state(), **extra)

    stopped_early = False
    for epoch in range(start_epoch, cfg.epochs):
        shown = epoch + 1
        if frozen and cfg.unfreeze_epoch is not None and shown >= cfg.unfreeze_epoch:
            unfreeze(model)
            frozen = False
            reporter.info(f"epoch {shown}: unfreezing all layers")
        totals = EpochTotals(**partial) if partial else EpochTotals()
        partial = None
        lr = optimizer.param_groups[0]["lr"]
        # While the backbone is frozen and its features are cached, only the head runs.
        phase = features if (frozen and features is not None) else None
        net, loader, batch_to = (phase.head, phase.train, phase.batcher) if phase else (train_model, train_loader, batcher)
        phase_sampler = phase.sampler if phase else sampler
        phase_sampler.set_epoch(epoch, skip=totals.batches * cfg.batch_size)
        with reporter.bar(f"train epoch[{shown}/{cfg.epochs}]", len(splits.train)) as on_step:
            totals = train_one_epoch(
                net, loader, optimizer, criterion, batch_to, epoch=shown, scaler=scaler,
                clip_grad=cfg.clip_grad,
                prepare_model=(lambda m: keep_frozen_bn_eval(m, head)) if frozen and not phase else None,
                on_step=on_step, totals=totals, should_stop=lambda: bool(stop),
            )
        if totals.interrupted:
            checkpoint.save(run_dir / "last.pt", checkpoint.make_checkpoint(
                model, epoch=epoch, metrics={}, **describe, **training_state(partial_epoch=totals.state())))
            raise Interrupted(f"stopped during epoch {shown} after step {totals.steps}; saved {run_dir / 'last.pt'}. "
                              f"Resume with: cnntrain train --resume {run_dir}", stop.signum or signal.SIGINT)
        if totals.skipped:
            reporter.always(f"warning: epoch {shown} skipped {len(totals.skipped)} unreadable image(s): "
                            + ", ".join(totals.skipped[:5]) + (" ..." if len(totals.skipped) > 5 else ""))
        train = totals.summary()
        val: dict[str, Any] = {}
        if val_loader is not None:
            with reporter.bar(f"valid epoch[{shown}/{cfg.epochs}]", len(splits.val)) as on_step:
                if phase:
                    val = evaluate(phase.head, phase.val, criterion, phase.batcher, len(classes), on_step=on_step)
                else:
                    val = evaluate(train_model, val_loader, criterion, batcher, len(classes), on_step=on_step)
        scheduler.step()
        row = {
            "epoch": shown, "train_loss": train["loss"], "train_acc": train["acc"],
            "val_loss": val.get("loss"), "val_acc": val.get("acc"), "val_top5": val.get("top5"),
            "lr": lr, "seconds": train["seconds"] + val.get("seconds", 0.0), "images_per_s": train["images_per_s"],
        }
        history.append(row)
        write_metrics_csv(run_dir / "metrics.csv", history)
        metric = row[monitor]
        improved = metric > best_metric
        if improved:
            best_metric, best_epoch = metric, shown
        metrics = {k: v for k, v in row.items() if k != "epoch"}
        if improved:
            checkpoint.save(run_dir / "best.pt", checkpoint.make_checkpoint(model, epoch=shown, metrics=metrics, **describe))
        checkpoint.save(run_dir / "last.pt", checkpoint.make_checkpoint(
            model, epoch=shown, metrics=metrics, **describe, **training_state()))
        reporter.info(format_epoch(shown, cfg.epochs, row))
        if stop:
            raise Interrupted(f"stopped after epoch {shown}; saved {run_dir / 'last.pt'}. "
                              f"Resume with: cnntrain train --resume {run_dir}", stop.signum or signal.SIGINT)
        if cfg.patience and shown - best_epoch >= cfg.patience and shown < cfg.epochs:
            reporter.info(f"early stop: {monitor} has not improved for {cfg.patience} epochs (best {best_metric:.4f} at epoch {best_epoch})")
            stopped_early = True
            break

    checkpoint.point_latest(run_dir)
    result = TrainResult(run_dir=run_dir, best_epoch=best_epoch, best_metric=best_metric, monitor=monitor,
                         epochs_run=len(history), seconds=time.perf_counter() - started,
                         stopped_early=stopped_early, history=history)
    # Still frozen with cached features: the best head scores on them exactly as through the model.
    scorer = (features.head, features.val, features.batcher) if frozen and features is not None else (
        model, val_loader, batcher)
    _finish(result, model, scorer, criterion, classes, splits, cfg)
    return result


def write_text(path: Path, text: str) -> None:
    """Atomic write whose failure (disk full, I/O error) is a one-line error, not a traceback."""
    try:
        fileio.atomic_write_text(path, text)
    except OSError as exc:
        raise CheckpointError(f"could not write {path}: {exc.strerror or exc}; the previous file is unchanged") from None


def _finish(result: TrainResult, model: nn.Module, scorer: tuple[nn.Module, Any, Batcher], criterion: nn.Module,
            classes: list[str], splits: DatasetSplits, cfg: TrainConfig) -> None:
    """Plots and summary.json, from the best weights (``scorer``: network, val loader, batcher)."""
    net, val_loader, batcher = scorer
    from cnntrain.plots import plot_confusion_matrix, plot_learning_curves

    run_dir = result.run_dir
    plot_learning_curves(result.history, run_dir / "learning_curves.png")
    best_val: dict[str, Any] = {}
    if val_loader is not None and (run_dir / "best.pt").is_file():
        model.load_state_dict(checkpoint.load(run_dir / "best.pt")["model"])
        best_val = evaluate(net, val_loader, criterion, batcher, len(classes))
        plot_confusion_matrix(best_val["confusion"].matrix, classes, run_dir / "confusion_matrix.png")
    summary = {
        "arch": cfg.arch,
        "data": splits.description,
        "classes": classes,
        "train_images": len(splits.train),
        "val_images": len(splits.val),
        "monitor": result.monitor,
        "best_epoch": result.best_epoch,
        "best_metric": result.best_metric,
        "best_val_acc": best_val.get("acc"),
        "best_val_top5": best_val.get("top5"),
        "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early,
        "seconds": round(result.seconds, 2),
        "run_dir": str(run_dir),
        "files": sorted({p.name for p in run_dir.iterdir() if not p.name.startswith(".")} | {"summary.json"}),
    }
    write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
