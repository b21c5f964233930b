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

import dataclasses
import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from cnntrain import checkpoint, distributed, fileio
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
from cnntrain.data.gpu_decode import EncodedImageDataset, collate_encoded, use_gpu_decode
from cnntrain.data.imagecache import build_image_cache, default_budget
from cnntrain.data.sampler import EpochSampler, SeededDataset, ShardSampler
from cnntrain.data.transforms import CROP_RATIO
from cnntrain.distributed import DistContext
from cnntrain.engine import Batcher, EpochTotals, evaluate, train_one_epoch
from cnntrain.errors import CheckpointError, CnnTrainError, DataError, UsageError
from cnntrain.features import cached_features
from cnntrain.models import build_model, find_head, freeze_backbone, get_spec
from cnntrain.models.heads import keep_frozen_bn_eval, unfreeze
from cnntrain.optim import build_optimizer, build_scheduler
from cnntrain.progress import Reporter, format_epoch
from cnntrain.runfiles import finish, write_metrics_csv, write_text
from cnntrain.runtime import (amp_dtype_for, resolve_device, rng_state, seed_everything, set_rng_state,
                              use_channels_last)
from cnntrain.signals import Interrupted, StopRequest

# On a GPU, reading the loss every step stalls the queue of kernels; read it every so many steps.
GPU_SYNC_EVERY = 20

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


# ------------------------------------------------------------------------------ fit


def fit(cfg: TrainConfig, reporter: Reporter | None = None) -> TrainResult:
    """Train ``cfg.arch`` as configured; returns where the run was written and how it went.

    Expected failures mid-run (out of memory, a dead loader worker, a full disk) become
    ``CnnTrainError``s; the checkpoints already on disk are never the casualty.
    """
    reporter = reporter or Reporter(quiet=cfg.quiet)
    try:
        ctx, device = distributed.setup(resolve_device(cfg.device))
        if not ctx.is_main:
            reporter = Reporter(quiet=True, enabled=False)
        with StopRequest(escalate=not ctx.enabled) as stop:
            return _fit(cfg, reporter, stop, ctx, device)
    except torch.OutOfMemoryError:
        half = max(cfg.batch_size // 2, 1)
        raise CnnTrainError(f"out of memory on {cfg.device} at --batch-size {cfg.batch_size}; "
                            f"try --batch-size {half} (or a smaller --img-size)") from None
    except RuntimeError as exc:
        if distributed.under_torchrun() and distributed.is_peer_failure(exc):
            first = str(exc).strip().splitlines()[0][:200]
            raise CnnTrainError(f"lost contact with another training process ({first}); the job stops, see that "
                                "process's error") from None
        if "DataLoader worker" in str(exc):
            first = str(exc).strip().splitlines()[0]
            raise DataError(f"a data loading worker died ({first}); rerun with --workers 0 to see the "
                            "underlying error") from None
        raise
    finally:
        distributed.cleanup()


def _fit(cfg: TrainConfig, reporter: Reporter, stop: StopRequest, ctx: DistContext,
         device: torch.device) -> TrainResult:
    started = time.perf_counter()
    resume_path = resolve_resume(cfg.resume, cfg.project) if cfg.resume else None
    resumed = checkpoint.load(resume_path) if resume_path else None
    if resumed is not None and "optimizer" not in resumed:
        raise CheckpointError(f"{resume_path} holds no training state; resume from a run's last.pt")
    if resume_path is None and ctx.is_main:
        checkpoint.check_project(cfg.project)  # an unusable output folder fails before any work
    if ctx.enabled:
        distributed.check_sync_bn(cfg.sync_bn, device)

    seed_everything(cfg.seed, cfg.deterministic)
    with ctx.main_first():  # rank 0 scans (and downloads); the others then read its caches
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
    with ctx.main_first():
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
        if ctx.is_main:
            fileio.clean_stale_temps(run_dir, older_than=0)  # leftovers of a killed run
    else:
        made = checkpoint.new_run_dir(cfg.project, cfg.name, cfg.exist_ok) if ctx.is_main else None
        run_dir = Path(ctx.broadcast(str(made) if made else None))
    reporter.info(f"run folder: {run_dir}")
    if ctx.enabled:
        reporter.info(f"distributed: {ctx.world_size} processes ({'NCCL' if device.type == 'cuda' else 'gloo'}), "
                      f"batch {cfg.batch_size} each = {cfg.batch_size * ctx.world_size} per step")

    start_epoch = resumed["epoch"] if resumed is not None else 0  # epochs completed
    partial = resumed.get("partial_epoch") if resumed is not None else None  # stopped mid-epoch
    if partial and resumed.get("world_size", 1) != ctx.world_size:
        # Each rank's place in the epoch depends on the world size: replay the epoch whole.
        reporter.info(f"{resume_path} stopped mid-epoch with {resumed.get('world_size', 1)} process(es); "
                      f"restarting epoch {start_epoch + 1} from its start with {ctx.world_size}")
        partial = None
    elif partial and not ctx.is_main:
        partial = {**partial, "loss_sum": 0.0, "correct": 0, "seen": 0, "skipped": []}  # rank 0 holds the sums
    frozen = cfg.freeze_layers and (cfg.unfreeze_epoch is None or start_epoch + 1 < cfg.unfreeze_epoch)
    if frozen:
        freeze_backbone(model, head)

    amp_dtype = amp_dtype_for(device, cfg.amp)
    channels_last = use_channels_last(device, cfg.img_size)
    if cfg.sync_bn and ctx.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)

    def wrap(module: nn.Module) -> nn.Module:
        """DDP (when distributed) around what trains, then torch.compile when asked. Built
        again after unfreezing: DDP only syncs parameters that required grad when wrapped."""
        if ctx.enabled:
            module = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
        return torch.compile(module) if cfg.compile else module

    train_model = wrap(model)
    # Evaluation never goes through DDP: ranks hold shards of different lengths.
    eval_model = lambda: model if ctx.enabled else train_model  # noqa: E731

    lr_cfg = cfg
    if cfg.lr_scale == "linear" and ctx.world_size > 1:
        lr_cfg = dataclasses.replace(cfg, lr=cfg.lr * ctx.world_size)
        reporter.info(f"--lr-scale linear: learning rate {cfg.lr:g} x {ctx.world_size} processes = {lr_cfg.lr:g}")
    optimizer = build_optimizer(model, lr_cfg)
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

    workers = max(1, default_workers() // ctx.local_world_size) if cfg.workers is None else cfg.workers
    deterministic_train = "none" in cfg.aug
    train_tf = eval_transform(cfg.img_size) if deterministic_train else train_transform(cfg.img_size, cfg.aug)
    sampler = EpochSampler(splits.train, shuffle=True, seed=cfg.seed, num_replicas=ctx.world_size, rank=ctx.rank)
    # BatchNorm cannot train on a batch of one: skip that lone last sample (a different one
    # each epoch, as the order is shuffled) rather than crash at the end of the epoch.
    drop_last = sampler.num_samples % cfg.batch_size == 1
    # --gpu-decode (CUDA only): workers pass JPEG bytes, the Batcher decodes and augments them on the device.
    gpu_decode = use_gpu_decode(cfg.gpu_decode, device, reporter.info)
    dataset_type, collate = (EncodedImageDataset, collate_encoded) if gpu_decode else (ImageDataset, collate_skipping)
    # Every image decoded once, resized to the eval size, for all epochs (train and val in one cache).
    # Frozen to the end with cached features: the backbone reads each image once, nothing to cache.
    features_only = frozen and cfg.feature_cache and deterministic_train and cfg.unfreeze_epoch is None
    # Under torchrun each rank holds its own RAM copy: the machine's budget is shared between them.
    budget_gb = (cfg.cache_max_gb if cfg.cache_max_gb is not None else default_budget() / 1e9) / ctx.local_world_size
    image_cache = build_image_cache(splits.train + splits.val, short_side=int(cfg.img_size / CROP_RATIO),
                                    mode="none" if gpu_decode or features_only else cfg.cache, max_gb=budget_gb,
                                    workers=workers, log=reporter.info, progress=reporter.interactive)
    train_cache, val_cache = image_cache.split(len(splits.train)) if image_cache is not None else (None, None)
    # Files that break after the scan are skipped and counted, never fatal (collate_skipping).
    train_loader = make_loader(SeededDataset(dataset_type(splits.train, train_tf, skip_unreadable=True,
                                                          cache=train_cache)),
                               batch_size=cfg.batch_size, shuffle=False, sampler=sampler, workers=workers,
                               device=device, seed=cfg.seed, drop_last=drop_last, collate_fn=collate)
    val_loader = None
    if splits.val:
        val_loader = make_loader(dataset_type(splits.val, eval_transform(cfg.img_size), skip_unreadable=True,
                                              cache=val_cache),
                                 batch_size=cfg.batch_size, shuffle=False, workers=workers, device=device,
                                 seed=cfg.seed, collate_fn=collate,
                                 sampler=ShardSampler(splits.val, num_replicas=ctx.world_size, rank=ctx.rank))
    batcher = Batcher(device, Normalize(mean, std).to(device), channels_last, amp_dtype)
    features = None
    if frozen and cfg.feature_cache and deterministic_train:
        features = cached_features(model, head, splits, batcher, cfg, workers, device, reporter, ctx,
                                   train_cache=train_cache, val_cache=val_cache)
    head_model = wrap(features.head) if features is not None else None

    if ctx.is_main:
        write_text(run_dir / "config.yaml", save_yaml(cfg))
        write_text(run_dir / "class_indices.json", json.dumps({str(i): c for i, c in enumerate(classes)}, indent=2))
    describe = dict(arch=cfg.arch, classes=classes, img_size=cfg.img_size, mean=mean, std=std, config=cfg.to_dict())

    def training_state(**extra: Any) -> dict[str, Any]:
        return dict(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                    scaler=scaler.state_dict() if scaler is not None else None, best_metric=best_metric,
                    best_epoch=best_epoch, history=history, rng=rng_state(), world_size=ctx.world_size, **extra)

    stopped_early = False
    for epoch in range(start_epoch, cfg.epochs):
        shown = epoch + 1
        if frozen and cfg.unfreeze_epoch is not None and shown >= cfg.unfreeze_epoch:
            unfreeze(model)
            frozen = False
            train_model = wrap(model)
            reporter.info(f"epoch {shown}: unfreezing all layers")
        totals = EpochTotals(**partial) if partial else EpochTotals()
        partial = None
        lr = optimizer.param_groups[0]["lr"]
        # While the backbone is frozen and its features are cached, only the head runs.
        phase = features if (frozen and features is not None) else None
        net, loader, batch_to = (head_model, phase.train, phase.batcher) if phase else (train_model, train_loader, batcher)
        phase_sampler = phase.sampler if phase else sampler
        phase_sampler.set_epoch(epoch, skip=totals.batches * cfg.batch_size)
        with reporter.bar(f"train epoch[{shown}/{cfg.epochs}]", len(splits.train)) as on_step:
            totals = train_one_epoch(
                net, loader, optimizer, criterion, batch_to, epoch=shown, scaler=scaler,
                clip_grad=cfg.clip_grad,
                prepare_model=(lambda m: keep_frozen_bn_eval(model, head)) if frozen and not phase else None,
                on_step=on_step, totals=totals, should_stop=lambda: ctx.any(bool(stop)),
                sync_every=1 if device.type == "cpu" else GPU_SYNC_EVERY,
            )
        totals = reduce_totals(totals, ctx)
        if totals.interrupted:
            if ctx.is_main:
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
                    val = evaluate(phase.head, phase.val, criterion, phase.batcher, len(classes), on_step=on_step,
                                   reduce=ctx.sum)
                else:
                    val = evaluate(eval_model(), val_loader, criterion, batcher, len(classes), on_step=on_step,
                                   reduce=ctx.sum)
        scheduler.step()
        row = {
            "epoch": shown, "train_loss": train["loss"], "train_acc": train["acc"],
            "val_loss": val.get("loss"), "val_acc": val.get("acc"), "val_top5": val.get("top5"),
            "lr": lr, "seconds": train["seconds"] + val.get("seconds", 0.0), "images_per_s": train["images_per_s"],
        }
        history.append(row)
        metric = row[monitor]
        improved = metric > best_metric
        if improved:
            best_metric, best_epoch = metric, shown
        metrics = {k: v for k, v in row.items() if k != "epoch"}
        if ctx.is_main:
            write_metrics_csv(run_dir / "metrics.csv", history)
            if improved:
                checkpoint.save(run_dir / "best.pt", checkpoint.make_checkpoint(
                    model, epoch=shown, metrics=metrics, **describe))
            checkpoint.save(run_dir / "last.pt", checkpoint.make_checkpoint(
                model, epoch=shown, metrics=metrics, **describe, **training_state()))
        reporter.info(format_epoch(shown, cfg.epochs, row))
        if ctx.any(bool(stop)):
            raise Interrupted(f"stopped after epoch {shown}; saved {run_dir / 'last.pt'}. "
                              f"Resume with: cnntrain train --resume {run_dir}", stop.signum or signal.SIGINT)
        if cfg.patience and shown - best_epoch >= cfg.patience and shown < cfg.epochs:
            reporter.info(f"early stop: {monitor} has not improved for {cfg.patience} epochs (best {best_metric:.4f} at epoch {best_epoch})")
            stopped_early = True
            break

    if ctx.is_main:
        checkpoint.point_latest(run_dir)
    result = TrainResult(run_dir=run_dir, best_epoch=best_epoch, best_metric=best_metric, monitor=monitor,
                         epochs_run=len(history), seconds=time.perf_counter() - started,
                         stopped_early=stopped_early, history=history)
    # Still frozen with cached features: the best head scores on them exactly as through the model.
    scorer = (features.head, features.val, features.batcher) if frozen and features is not None else (
        model, val_loader, batcher)
    finish(result, model, scorer, criterion, classes, splits, cfg, ctx)
    return result


def reduce_totals(totals: EpochTotals, ctx: DistContext) -> EpochTotals:
    """An epoch's sums over all ranks (steps and batches are the same on every rank)."""
    if not ctx.enabled:
        return totals
    sums = ctx.sum(torch.tensor([totals.loss_sum, totals.correct, totals.seen], dtype=torch.float64))
    return dataclasses.replace(totals, loss_sum=float(sums[0]), correct=int(sums[1]), seen=int(sums[2]))


