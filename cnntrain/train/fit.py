"""``fit(config)``: data, model and optimiser in, a complete run folder out.

``_fit`` is the table of contents of a run; each line hands one job to a named part:

- ``resume.py``      the resume plan: which last.pt, what it overrides, where to continue
- ``splits.py``      the data: folder or built-in dataset, split, unreadable images left out
- ``run_model.py``   the model: built by name, starting weights, head, placement, DDP/compile
- ``state.py``       the training state: optimiser, schedule, scaler, best metric, history
- ``pipeline.py``    the input pipeline: datasets, samplers, image cache, loaders, batcher
- ``phase.py``       what each epoch trains: the full model, or the head on cached features
- ``checkpointer.py`` best.pt, last.pt and the interrupted last.pt
- ``loop.py``        the epoch loop; ``cnntrain.engine`` holds the per-batch loops
- ``runfiles.py``    config.yaml, metrics.csv, plots and summary.json
- ``cnntrain.analysis`` after the last epoch: the temperature in best.pt, top_losses.png, calibration
- ``loss.py``        the objective: loss (label smoothing, ``imbalance.py``'s class weights), ``mixing.py``
- ``ema.py``         the average of the weights (a field of the training state)
- ``lr_find.py``     the learning-rate range test (``--lr auto``, ``cnntrain lr-find``)

Adding a training feature touches the part it concerns, not the loop:

- a loss (class weights, soft targets): ``loss.build_objective``;
- a transform of the device-side batch (mixup, cutmix): ``Objective.batch_transform``, which
  ``train_one_epoch`` applies after the Batcher, for training batches only;
- something updated after every optimiser step (an average of the weights): a field of
  ``TrainingState`` saved in ``state_dict()``, updated through ``EpochLoop.after_step``, as
  ``TrainingState.ema`` (``ema.WeightAverage``) is;
- something done at the end of each epoch (a plot, a TensorBoard write): an ``EpochReporter``
  in ``EpochLoop.reporters``, like ``runfiles.MetricsCsv``.

Resuming: last.pt is written at the end of every epoch and, on Ctrl-C/SIGTERM, after the
current step (with the epoch's running sums). A run stopped by a signal continues at the
batch where it stopped; a run killed outright restarts the epoch after its last completed
one. Either way the state (weights, optimiser, schedule, RNG) is exact, and the sampler's
per-(epoch, sample) seeding replays the same batches. Epochs are 0-based inside, 1-based on screen.
Another ``--epochs`` on resume extends or shortens the run: the schedule is built for the new
length and the loaded state takes its learning rate from it (``TrainingState.load_state_dict``).
``runs/latest`` is pointed at a run when its folder is claimed or resumed (``_open_run_dir``).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from cnntrain import checkpoint, fileio
from cnntrain.analysis.answers import AnswerCollector
from cnntrain.analysis.run_end import RunAnalysis, analyse_best, without_validation
from cnntrain.config import TrainConfig, save_yaml
from cnntrain.data import DatasetSplits
from cnntrain.datacheck.findings import exact_leaks, leak_line
from cnntrain.engine import EvalResult, evaluate, sync_every_for
from cnntrain.errors import CnnTrainError, DataError, UsageError, first_line
from cnntrain.models import freeze_backbone, get_spec
from cnntrain.runtime import amp_dtype_for, deterministic_note, resolve_device, seed_everything, use_channels_last
from cnntrain.train import distributed, loss
from cnntrain.train.autobatch import auto_batch_size
from cnntrain.train.checkpointer import Checkpointer
from cnntrain.train.distributed import DistContext
from cnntrain.train.features import cached_features
from cnntrain.train.imbalance import class_counts, imbalance_line
from cnntrain.train.loop import EpochLoop, EpochReporter
from cnntrain.train.lr_find import METHODS, lr_find_for_config
from cnntrain.train.optim import OptimizerSettings, ScheduleSettings, describe_groups
from cnntrain.train.phase import Phase, Phases
from cnntrain.train.pipeline import FirstPass, PipelineSettings, build_pipeline
from cnntrain.train.preview import write_train_batch
from cnntrain.train.progress import Reporter
from cnntrain.train.resume import ResumePlan, load_plan
from cnntrain.train.run_model import RunModel, build_run_model, place, wrapper
from cnntrain.train.runfiles import MetricsCsv, draw_plots, finish, write_run_description
from cnntrain.train.signals import Interrupted, StopRequest
from cnntrain.train.splits import check_trainable, load_splits
from cnntrain.train.state import TrainingState, TrainResult
from cnntrain.train.tensorboard_log import TensorBoardLog


def fit(cfg: TrainConfig, reporter: Reporter | None = None, resume: ResumePlan | None = None) -> TrainResult:
    """Train ``cfg.arch`` as configured; returns where the run was written and how it went.

    ``resume``: the plan ``resume.train_config`` made (else ``cfg.resume`` is loaded here).
    Expected failures mid-run (out of memory, a dead loader worker, a full disk) become
    ``CnnTrainError``s; the checkpoints already on disk are never the casualty.
    """
    reporter = reporter or Reporter(quiet=cfg.quiet)
    try:
        ctx, device = distributed.setup(resolve_device(cfg.device))
        if not ctx.is_main:
            reporter = Reporter(quiet=True, enabled=False)
        with StopRequest(escalate=not ctx.enabled) as stop:
            return _fit(cfg, reporter, stop, ctx, device, resume)
    except torch.OutOfMemoryError:
        half = max(cfg.batch_size // 2, 1)
        raise CnnTrainError(f"out of memory on {cfg.device} at --batch-size {cfg.batch_size}; "
                            f"try --batch-size {half} (or a smaller --img-size)") from None
    except RuntimeError as exc:
        if distributed.under_torchrun() and distributed.is_peer_failure(exc):
            raise CnnTrainError(f"lost contact with another training process ({first_line(exc, 200)}); the job "
                                "stops, see that process's error") from None
        if "DataLoader worker" in str(exc):
            raise DataError(f"a data loading worker died ({first_line(exc)}); rerun with --workers 0 to see the "
                            "underlying error") from None
        raise
    finally:
        distributed.cleanup()


def _fit(cfg: TrainConfig, reporter: Reporter, stop: StopRequest, ctx: DistContext, device: torch.device,
         plan: ResumePlan | None) -> TrainResult:
    started = time.perf_counter()
    cfg, plan = _checked(cfg, plan, ctx, device, reporter)
    seed_everything(cfg.seed, cfg.deterministic)
    _say(reporter, deterministic_note(device, cfg.deterministic))
    # The scan's decoding builds the image cache too, so a first run decodes each image once.
    first_pass = FirstPass(cfg.pick(PipelineSettings), device=device, ctx=ctx, log=reporter.info,
                           progress=reporter.interactive)
    with ctx.main_first():  # rank 0 scans (and downloads); the others then read its caches
        splits = load_splits(cfg.data_path, cfg.dataset, val_split=cfg.val_split, seed=cfg.seed, strict=cfg.strict,
                             labels=cfg.labels, info=reporter.info, warn=reporter.always, progress=reporter.interactive,
                             reader=first_pass.reader)
    check_trainable(splits)
    if plan is not None:
        plan.check_classes(splits.classes)
    reporter.info(splits.summary())
    leaks = _leaks(splits, reporter) if ctx.is_main else None
    counts = class_counts([label for _, label in splits.train], splits.num_classes)
    _say(reporter, imbalance_line(counts, splits.classes))
    run = build_run_model(cfg.arch, splits.num_classes, pretrained=cfg.pretrained, weights=cfg.weights,
                          resumed=plan.saved if plan else None, freeze_layers=cfg.freeze_layers, ctx=ctx,
                          log=reporter.info, warn=reporter.always)
    run_dir = _open_run_dir(cfg, plan, ctx, reporter, device)
    start_epoch = plan.epochs_done if plan else 0
    partial = plan.partial_epoch(ctx.world_size, ctx.is_main, reporter.info) if plan else None
    frozen = cfg.freeze_layers and (cfg.unfreeze_epoch is None or start_epoch + 1 < cfg.unfreeze_epoch)
    if frozen:
        freeze_backbone(run.model, run.head)
    amp_dtype, channels_last = amp_dtype_for(device, cfg.amp), use_channels_last(device, cfg.img_size)
    run.model = place(run.model, device, channels_last=channels_last, sync_bn=cfg.sync_bn and ctx.enabled)
    if cfg.batch_size_auto:
        cfg = _fitted_batch(cfg, run, splits.num_classes, device, channels_last, amp_dtype, ctx, reporter)
    if cfg.lr_auto:  # after the batch size, which the best rate depends on
        cfg = _found_lr(cfg, splits, ctx, reporter)
    state = _training_state(cfg, run, ctx, amp_dtype, device, "val_acc" if splits.val else "train_acc", reporter)
    objective = loss.build_objective(cfg, splits.classes, counts, reporter.info)
    if plan is not None:
        state.load_state_dict(plan.saved)  # the lr: what this run's schedule gives the epoch it continues at
        reporter.info(plan.describe(partial, cfg.epochs))
        length = plan.new_length(cfg.epochs, cfg.sched, state.lr)
        if length:
            reporter.info(length)
    phases = _phases(cfg, run, splits, frozen, device, ctx, amp_dtype, channels_last, reporter, first_pass)
    if ctx.is_main:
        write_run_description(run_dir, save_yaml(cfg), splits.classes)
        write_train_batch(run_dir, phases, start_epoch, splits.classes, run.mean, run.std, objective.batch_transform,
                          resumed=plan is not None)
    checkpointer = Checkpointer(run_dir, dict(arch=cfg.arch, classes=splits.classes, img_size=cfg.img_size,
                                              mean=run.mean, std=run.std, config=cfg.to_dict()),
                                enabled=ctx.is_main, world_size=ctx.world_size)
    ema = state.ema
    loop = EpochLoop(
        phases, state, objective.criterion, checkpointer, run.model, reporter, stop, ctx, epochs=cfg.epochs,
        batch_size=cfg.batch_size, num_classes=splits.num_classes, images=(len(splits.train), len(splits.val)),
        clip_grad=cfg.clip_grad, sync_every=sync_every_for(device),
        reporters=_epoch_reporters(cfg, run_dir, splits.classes), batch_transform=objective.batch_transform,
        val_criterion=objective.val_criterion, after_step=(lambda _: ema.update(run.model)) if ema else None,
    )
    try:
        stopped_early = loop.run(start_epoch, partial)
    except Interrupted:
        if ctx.is_main:  # the epochs so far, drawn now: the run can be judged before it is resumed
            draw_plots(run_dir, state.history, splits.classes, loop.best_val, state.best_epoch)
        raise
    result = TrainResult(run_dir=run_dir, best_epoch=state.best_epoch, best_metric=state.best_metric,
                         monitor=state.monitor, epochs_run=len(state.history), seconds=time.perf_counter() - started,
                         stopped_early=stopped_early, history=state.history, best_is_ema=state.best_is_ema,
                         leaks=leaks)
    best_val, analysis = _score_best(checkpointer, run, phases.best_scorer(), objective.val_criterion, splits,
                                     cfg.img_size, ctx, reporter)
    result.best_scores = best_val.confusion.scores() if best_val is not None else None
    finish(result, best_val, splits, cfg.arch, ctx, analysis)
    return result


def _checked(cfg: TrainConfig, plan: ResumePlan | None, ctx: DistContext, device: torch.device,
             reporter: Reporter) -> tuple[TrainConfig, ResumePlan | None]:
    """What can fail cheaply fails before the data scan: the run to resume and its epochs, the
    output folder, --sync-bn, the architecture's name and the image size it takes."""
    if plan is None and cfg.resume:
        plan = load_plan(cfg.resume, cfg.project)
    if plan is not None:
        plan.check_epochs(cfg.epochs)
        if plan.note:
            reporter.info(plan.note)
    if plan is None and ctx.is_main:
        checkpoint.check_project(cfg.project)
    if ctx.enabled:
        distributed.check_sync_bn(cfg.sync_bn, device)
    spec = get_spec(cfg.arch)
    if cfg.img_size < spec.min_size:  # (a ViT's patch grid is fixed: it would fail inside its forward)
        raise UsageError(f"--img-size {cfg.img_size}: {spec.name} takes images of at least {spec.min_size} px; "
                         f"use --img-size {spec.min_size} or another --arch")
    return dataclasses.replace(cfg, arch=spec.name), plan


def _leaks(splits: DatasetSplits, reporter: Reporter) -> list[tuple[str, str]]:
    """Validation images that are byte copies of training images: said before the first epoch,
    since they inflate the validation score, and kept for summary.json and the report."""
    leaks = exact_leaks(splits)
    line = leak_line(splits, leaks)
    if line is not None:
        reporter.always(line)
    return [(str(m.a.path), str(m.b.path)) for m in leaks]


def _epoch_reporters(cfg: TrainConfig, run_dir: Path, classes: list[str]) -> list[EpochReporter]:
    """What publishes each finished epoch: metrics.csv always, TensorBoard when asked for."""
    reporters: list[EpochReporter] = [MetricsCsv(run_dir / "metrics.csv")]
    if cfg.tensorboard:
        reporters.append(TensorBoardLog(run_dir, classes))
    return reporters


def _found_lr(cfg: TrainConfig, splits: DatasetSplits, ctx: DistContext, reporter: Reporter) -> TrainConfig:
    """``--lr auto``: the range test on rank 0 (it leaves the model, the data and the RNG as they
    were), its suggestion for every rank, and the number, not "auto", in the run's configuration."""
    found = None
    if ctx.is_main:
        result = lr_find_for_config(cfg, splits=splits, warn=reporter.always)
        found = result.suggestion
        reporter.info(f"--lr auto: {found:.3g}, {METHODS[result.method]} over {len(result.lrs)} steps of the "
                      "range test (`cnntrain lr-find` draws it); saved as lr")
    return dataclasses.replace(cfg, lr=float(ctx.broadcast(found)), lr_auto=False)


def _fitted_batch(cfg: TrainConfig, run: RunModel, num_classes: int, device: torch.device, channels_last: bool,
                  amp_dtype: torch.dtype | None, ctx: DistContext, reporter: Reporter) -> TrainConfig:
    """``--batch-size auto``: measured on rank 0's GPU (every rank has the same), saved as the number."""
    found = None
    if ctx.is_main:
        found = auto_batch_size(run.model, loss.build_loss(cfg.label_smoothing), img_size=cfg.img_size,
                                num_classes=num_classes, device=device, channels_last=channels_last,
                                amp_dtype=amp_dtype, opt=cfg.opt, momentum=cfg.momentum, ema=cfg.ema,
                                log=reporter.info)
    return dataclasses.replace(cfg, batch_size=int(ctx.broadcast(found)), batch_size_auto=False)


def _open_run_dir(cfg: TrainConfig, plan: ResumePlan | None, ctx: DistContext, reporter: Reporter,
                  device: torch.device) -> Path:
    """A resumed run continues in its folder (temp files of a killed writer removed); a new one
    claims the next free ``project/name``, chosen by rank 0. Either way ``latest`` now points at
    it: the run last started is what ``--resume auto`` and predict/eval/export mean by default."""
    if plan is not None:
        run_dir = plan.run_dir
        if ctx.is_main:
            fileio.clean_stale_temps(run_dir, older_than=0)
            checkpoint.point_latest(run_dir)
    else:
        made = checkpoint.new_run_dir(cfg.project, cfg.name, cfg.exist_ok) if ctx.is_main else None
        if made is not None:
            checkpoint.point_latest(made)
        run_dir = Path(ctx.broadcast(str(made) if made else None))
    reporter.info(f"run folder: {run_dir}")
    if ctx.enabled:
        reporter.info(f"distributed: {ctx.world_size} processes ({'NCCL' if device.type == 'cuda' else 'gloo'}), "
                      f"batch {cfg.batch_size} each = {cfg.batch_size * ctx.world_size} per step")
    return run_dir


def _training_state(cfg: TrainConfig, run: RunModel, ctx: DistContext, amp_dtype: torch.dtype | None,
                    device: torch.device, monitor: str, reporter: Reporter) -> TrainingState:
    lr = cfg.lr
    if cfg.lr_scale == "linear" and ctx.world_size > 1:
        lr = cfg.lr * ctx.world_size
        reporter.info(f"--lr-scale linear: learning rate {cfg.lr:g} x {ctx.world_size} processes = {lr:g}")
    state = TrainingState.create(run.model, cfg.pick(OptimizerSettings, lr=lr), cfg.pick(ScheduleSettings),
                                 amp_dtype=amp_dtype, monitor=monitor, patience=cfg.patience, head=run.head,
                                 ema_decay=cfg.ema_decay if cfg.ema else None, device=device)
    _say(reporter, describe_groups(state.optimizer))
    if state.ema is not None:
        reporter.info(f"--ema: validating an average of the weights too (decay {cfg.ema_decay:g}, warmed up); "
                      "best.pt keeps whichever scores higher" + ("" if monitor == "val_acc" else
                                                                 " (no validation split: the raw weights)"))
    return state


def _say(reporter: Reporter, line: str | None) -> None:
    if line:
        reporter.info(line)


def _phases(cfg: TrainConfig, run: RunModel, splits: DatasetSplits, frozen: bool, device: torch.device,
            ctx: DistContext, amp_dtype: torch.dtype | None, channels_last: bool, reporter: Reporter,
            first_pass: FirstPass) -> Phases:
    """The input pipeline (on the image cache of the first pass) and, with a frozen backbone and
    ``--aug none``, the cached features."""
    settings = cfg.pick(PipelineSettings)
    use_features = frozen and cfg.feature_cache and settings.deterministic
    if use_features and (cfg.mixup > 0 or cfg.cutmix > 0):
        reporter.info("feature cache: off, as mixup/cutmix mix images, not cached features; training through the "
                      "full model")
        use_features = False
    # Frozen to the end with cached features, the backbone reads each image once: no image cache is
    # built for that alone, but the one the first pass built is where the features read them from.
    features_only = use_features and cfg.unfreeze_epoch is None
    image_cache = first_pass.cache_for(splits, build=not features_only)
    pipeline = build_pipeline(splits, settings, device=device, mean=run.mean, std=run.std, channels_last=channels_last,
                              amp_dtype=amp_dtype, ctx=ctx, image_cache=image_cache, log=reporter.info,
                              progress=reporter.interactive)
    features = None
    if use_features:
        features = cached_features(run.model, run.head, splits, pipeline, arch=cfg.arch, settings=settings,
                                   device=device, ctx=ctx, log=reporter.info)
    ctx.setup_barrier()  # caches built at each rank's pace; the training collectives' short timeout starts now
    return Phases(run.model, run.head, pipeline, frozen=frozen, unfreeze_epoch=cfg.unfreeze_epoch, features=features,
                  wrap=wrapper(ctx, device, cfg.compile), distributed=ctx.enabled, log=reporter.info)


def _score_best(checkpointer: Checkpointer, run: RunModel, scorer: Phase, criterion: torch.nn.Module,
                splits: DatasetSplits, img_size: int, ctx: DistContext,
                reporter: Reporter) -> tuple[EvalResult | None, RunAnalysis | None]:
    """The best weights on the validation set, for the summary and the confusion matrix, and what
    the same pass says about them (``cnntrain.analysis``): the temperature, which best.pt then
    stores, the calibration, the most-confused classes and top_losses.png (on rank 0).

    Every rank scores its shard; best.pt is complete before any rank reads it."""
    ctx.barrier()
    if scorer.val is None or not checkpointer.best.is_file():
        analysis = without_validation() if scorer.val is None and ctx.is_main else None
        _say(reporter, analysis.note if analysis is not None else None)
        return None, analysis
    saved = checkpoint.load(checkpointer.best)
    run.model.load_state_dict(saved["model"])
    answers = AnswerCollector()
    best = evaluate(scorer.eval_net, scorer.val, criterion, scorer.batcher, splits.num_classes, reduce=ctx.sum,
                    keep=answers)
    started = time.perf_counter()
    analysis = analyse_best(answers, best.confusion, splits.val, splits.classes, img_size, checkpointer.run_dir, ctx)
    if analysis is not None:
        if analysis.calibration is not None:
            checkpointer.add_to_best(saved, **analysis.checkpoint_fields())
        analysis.seconds = time.perf_counter() - started
        for line in analysis.lines():
            reporter.info(line)
    return best, analysis
