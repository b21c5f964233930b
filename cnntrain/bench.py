"""``cnntrain bench``: how fast is each architecture here, and how much of that does training get?

For every architecture (random init, nothing downloaded) it reports parameters and GMACs (from
``models.stats``), inference images/s at the batch size, latency at batch 1, and training-step
images/s on random tensors already on the device: the model's ceiling. Beside cnntrain's step
(the trainer's optimiser, memory format and other defaults) it times the loop a tutorial writes
(``bare``: the same model and batch, NCHW, eager, ``torch.optim.SGD``, zero_grad / backward /
step), alternating the two so that a busy machine slows both alike; ``step_vs_bare`` is what
cnntrain's defaults buy. With a data folder
(``pipeline=True``) it also times the trainer's own input pipeline alone and whole training
epochs, so ``efficiency = end-to-end / ceiling`` says how much the data path costs (the ceiling
timed again around each epoch, so both see the same load); ``cache``
(``auto``, ``ram``, ``disk`` or ``none``, as ``train --cache``) says whether the pipeline reads
decoded images from the image cache, so the two can be compared.

Timings use ``torch.utils.benchmark.Timer`` (which synchronises CUDA and restores thread counts);
each is the median of ``runs`` measurements after a warm-up.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from cnntrain.errors import CnnTrainError, UsageError

Log = Callable[[str], None]


def parse_archs(text: str) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]``; an unknown name raises UsageError with suggestions."""
    from cnntrain.models import get_spec

    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UsageError("--arch needs at least one architecture, e.g. --arch resnet18,mobilenet_v3_small")
    for name in names:
        get_spec(name)
    return list(dict.fromkeys(names))


def _timer(fn: Callable[[], Any]) -> Any:
    """``torch.utils.benchmark.Timer`` for ``fn``. Importing it imports torch's C++-extension
    builder, which on a machine without CUDA logs "No CUDA runtime is found": noise about
    compiling extensions, which bench never does, so that one logger is quiet for the import."""
    ext_log = logging.getLogger("torch.utils.cpp_extension")
    level = ext_log.level
    ext_log.setLevel(logging.ERROR)
    try:
        from torch.utils import benchmark
    finally:
        ext_log.setLevel(level)
    return benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())


def synchronizer(device: torch.device) -> Callable[[], None]:
    """Waits for ``device``'s queued work: a GPU call returns when its kernels are queued, not done."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _median_seconds(fn: Callable[[], Any], runs: int, target: float = 0.2,
                    sync: Callable[[], None] = lambda: None) -> float:
    """Median seconds per call of ``fn`` over ``runs`` blocks of about ``target`` seconds, after a warm-up.

    ``sync`` (:func:`synchronizer`) brackets the call that sizes the blocks: unsynchronised, a GPU
    call times only its kernel launches, and the blocks would be many times too long."""
    return statistics.median(_paired_blocks([fn], runs, target, sync)[0])


def _paired_blocks(fns: Sequence[Callable[[], Any]], runs: int, target: float = 0.2,
                   sync: Callable[[], None] = lambda: None) -> list[list[float]]:
    """Seconds per call of each of ``fns`` in each of ``runs`` rounds of alternating blocks.

    Two figures meant to be compared are taken side by side: a load that comes and goes on a
    shared machine then slows both, where back-to-back measurements would give it to one."""
    number = []
    for fn in fns:
        fn()  # warm-up: allocations, autotuning, lazy init
        sync()
        start = time.perf_counter()
        fn()
        sync()
        number.append(max(1, min(100, int(target / max(time.perf_counter() - start, 1e-6)))))
    timers = [_timer(fn) for fn in fns]
    blocks: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for i, timer in enumerate(timers):
            blocks[i].append(timer.timeit(number[i]).median)
    return blocks


def _batch(batch: int, size: int, num_classes: int, device: torch.device,
           channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(batch, 3, size, size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, num_classes, (batch,), device=device)


def _forward_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                  amp_dtype: torch.dtype | None) -> torch.Tensor:
    criterion = nn.functional.cross_entropy
    if amp_dtype is None:
        return criterion(model(x), y)
    with torch.autocast(device.type, dtype=amp_dtype):
        return criterion(model(x), y)


def _step_fn(model: nn.Module, batch: int, size: int, num_classes: int, device: torch.device,
             channels_last: bool, amp_dtype: torch.dtype | None) -> Callable[[], None]:
    """cnntrain's training step: the trainer's optimiser (``build_optimizer``'s defaults) and update."""
    from cnntrain.engine import backward_and_step
    from cnntrain.runtime import grad_scaler

    x, y = _batch(batch, size, num_classes, device, channels_last)
    optimizer, scaler = _make_optimizer(model), grad_scaler(amp_dtype)

    def step() -> None:
        backward_and_step(model, _forward_loss(model, x, y, device, amp_dtype), optimizer, scaler)

    return step


def _bare_step_fn(model: nn.Module, batch: int, size: int, num_classes: int, device: torch.device,
                  amp_dtype: torch.dtype | None) -> Callable[[], None]:
    """The loop a tutorial writes, on a copy of ``model`` in NCHW: the yardstick for :func:`_step_fn`.
    Precision is the user's choice, not a speed trick of cnntrain's, so both run at ``amp_dtype``."""
    import copy

    bare = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    x, y = _batch(batch, size, num_classes, device, channels_last=False)
    optimizer = torch.optim.SGD(bare.parameters(), lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

    def step() -> None:
        optimizer.zero_grad()
        loss = _forward_loss(bare, x, y, device, amp_dtype)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()

    return step


def _infer_fn(model: nn.Module, batch: int, size: int, device: torch.device, channels_last: bool,
              amp_dtype: torch.dtype | None) -> Callable[[], None]:
    x = torch.randn(batch, 3, size, size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def infer() -> None:
        if amp_dtype is not None:
            with torch.autocast(device.type, dtype=amp_dtype):
                model(x)
        else:
            model(x)

    return infer


def _make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """The trainer's optimiser with its defaults, for the step and the training epochs alike."""
    from cnntrain.train.optim import OptimizerSettings, build_optimizer

    return build_optimizer(model, OptimizerSettings())


def bench_model(name: str, *, img_size: int, batch_size: int, device: torch.device, amp_dtype: torch.dtype | None,
                channels_last: bool, runs: int, num_classes: int = 1000) -> tuple[dict[str, Any], nn.Module]:
    """Stats and model timings of one architecture; also returns the model (for the pipeline)."""
    from cnntrain.models import get_model, get_spec
    from cnntrain.models.stats import count_macs, model_stats_cached

    size = max(img_size, get_spec(name).min_size)
    model = get_model(name, num_classes=num_classes, pretrained=False)
    if num_classes == 1000:
        stats = model_stats_cached([name], size)[name]
        params_m, gmacs = stats["params_m"], stats["gmacs"]
    else:  # the dataset's head: count this very model
        params_m = sum(p.numel() for p in model.parameters()) / 1e6
        gmacs = count_macs(model, size, device="cpu") / 1e9
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    row: dict[str, Any] = {
        "arch": name, "device": str(device), "img_size": size, "batch_size": batch_size,
        "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else None, "channels_last": channels_last,
        "num_classes": num_classes, "params_m": round(params_m, 4), "gmacs": round(gmacs, 4),
    }
    sync = synchronizer(device)
    try:
        model.eval()
        row["infer_images_per_s"] = batch_size / _median_seconds(
            _infer_fn(model, batch_size, size, device, channels_last, amp_dtype), runs, sync=sync)
        row["latency_ms"] = 1000 * _median_seconds(_infer_fn(model, 1, size, device, channels_last, amp_dtype), runs,
                                                   sync=sync)
        model.train()
        step = _step_fn(model, batch_size, size, num_classes, device, channels_last, amp_dtype)
        bare = _bare_step_fn(model, batch_size, size, num_classes, device, amp_dtype)
        steps, bares = _paired_blocks([step, bare], runs, sync=sync)
        row["train_images_per_s"] = batch_size / statistics.median(steps)
        row["bare_images_per_s"] = batch_size / statistics.median(bares)
        # each round's own ratio: a load that lasts one round changes its two blocks, not the ratio
        row["step_vs_bare"] = statistics.median(b / s for s, b in zip(steps, bares))
    except torch.OutOfMemoryError:
        raise CnnTrainError(f"{name}: out of memory at batch {batch_size}, {size}px; try a smaller "
                            "--batch-size") from None
    row["runs"] = runs
    return row, model


def _median_after_first(values: Sequence[float]) -> float:
    """Epoch 1 includes worker start-up: the median of epochs >= 2 (epoch 1 if it is alone)."""
    return statistics.median(values[1:]) if len(values) > 1 else values[0]


def bench_pipeline(row: dict[str, Any], model: nn.Module, splits: Any, *, device: torch.device,
                   amp_dtype: torch.dtype | None, channels_last: bool, workers: int, epochs: int,
                   seed: int = 0, image_cache: Any = None, gpu_decode: bool = False,
                   log: Log = lambda s: None) -> dict[str, Any]:
    """Time the trainer's input pipeline alone, then whole training epochs, and add them to ``row``.

    The loaders come from the trainer's own ``build_pipeline``, so what is timed is what ``fit``
    runs. ``image_cache``: an :class:`~cnntrain.data.imagecache.ImageCache` of ``splits.train``
    to read decoded images from, as ``fit`` does (None: decode every file every epoch).
    ``gpu_decode``: decode JPEGs on a CUDA device, as ``train --gpu-decode``.
    """
    from cnntrain.models import normalisation
    from cnntrain.train.pipeline import PipelineSettings, build_pipeline

    mean, std = normalisation(row["arch"])
    settings = PipelineSettings(img_size=row["img_size"], batch_size=row["batch_size"], workers=workers, seed=seed,
                                gpu_decode=gpu_decode)

    def pipeline():  # exactly what fit() builds for training, fresh workers each time
        return build_pipeline(splits, settings, device=device, mean=mean, std=std, channels_last=channels_last,
                              amp_dtype=amp_dtype, image_cache=image_cache if image_cache is not None else False)

    data = pipeline()
    data_rates = []
    for epoch in range(epochs):
        data.sampler.set_epoch(epoch)
        seen, start = 0, time.perf_counter()
        for images, targets, _ in data.train:
            if targets.numel():
                images, targets = data.batcher(images, targets)
                seen += targets.numel()
        synchronizer(device)()
        data_rates.append(seen / max(time.perf_counter() - start, 1e-9))
        log(f"{row['arch']}: data epoch {epoch + 1}/{epochs}: {data_rates[-1]:.1f} images/s")
    del data

    train_rates, ceilings = _epochs_beside_ceiling(row, model, pipeline(), device=device, amp_dtype=amp_dtype,
                                                   channels_last=channels_last, epochs=epochs, log=log)
    ratios = [rate / ceiling for rate, ceiling in zip(train_rates, ceilings)]
    row.update({
        "images": len(splits.train), "workers": workers, "epochs": epochs,
        "cache": image_cache.mode if image_cache is not None else "none",
        "data_images_per_s": _median_after_first(data_rates), "data_epoch_images_per_s": data_rates,
        "epoch_images_per_s": train_rates, "e2e_images_per_s": _median_after_first(train_rates),
        "ceiling_images_per_s": ceilings, "efficiency": _median_after_first(ratios),
    })
    return row


def _epochs_beside_ceiling(row: dict[str, Any], model: nn.Module, train: Any, *, device: torch.device,
                           amp_dtype: torch.dtype | None, channels_last: bool, epochs: int,
                           log: Log) -> tuple[list[float], list[float]]:
    """Images/s of whole training epochs, each with the model's ceiling timed right around it.

    The ceiling (the step alone, on a batch already on the device) is timed in a block of a quarter
    of an epoch's steps before the epoch and another after it, with the same model, threads and idle
    workers: a load that comes and goes on a shared machine then slows an epoch and its ceiling
    alike, where a ceiling taken minutes before made the ratio swing from 0.86 to 1.17 run to run."""
    from cnntrain.engine import sync_every_for, train_one_epoch
    from cnntrain.runtime import grad_scaler

    optimizer, scaler, criterion = _make_optimizer(model), grad_scaler(amp_dtype), nn.CrossEntropyLoss()
    step = _step_fn(model, row["batch_size"], row["img_size"], row["num_classes"], device, channels_last, amp_dtype)
    block, timer = max(2, len(train.train) // 4), _timer(step)
    step()  # warm-up
    rates, ceilings = [], []
    for epoch in range(epochs):
        before = timer.timeit(block).median  # seconds per step
        train.sampler.set_epoch(epoch)
        totals = train_one_epoch(model, train.train, optimizer, criterion, train.batcher, epoch=epoch, scaler=scaler,
                                 sync_every=sync_every_for(device))  # as fit() trains
        rates.append(totals.summary()["images_per_s"])
        ceilings.append(2 * row["batch_size"] / (before + timer.timeit(block).median))
        log(f"{row['arch']}: training epoch {epoch + 1}/{epochs}: {rates[-1]:.1f} images/s "
            f"(the step alone around it: {ceilings[-1]:.1f})")
    return rates, ceilings


def _check_request(*, batch_size: int, img_size: int, runs: int, epochs: int, workers: int | None,
                   pipeline: bool, data_path: str | os.PathLike | None, cache: str) -> None:
    from cnntrain.choices import CACHE_MODES

    if batch_size < 2:
        raise UsageError("--batch-size must be at least 2 (a training step needs BatchNorm statistics)")
    from cnntrain.config import IMG_SIZE_MAX, WORKERS_MAX

    if not 16 <= img_size <= IMG_SIZE_MAX:
        raise UsageError(f"--img-size must be between 16 and {IMG_SIZE_MAX} pixels, e.g. 224")
    if runs < 1 or epochs < 1:
        raise UsageError("--runs and --epochs must be at least 1")
    if workers is not None and not 0 <= workers <= WORKERS_MAX:
        raise UsageError(f"--workers must be between 0 and {WORKERS_MAX} loader processes")
    if pipeline and data_path is None:
        raise UsageError("--pipeline needs --data-path DIR (an ImageFolder root)")
    if cache not in CACHE_MODES:
        raise UsageError(f"--cache must be one of {', '.join(CACHE_MODES)}, not {cache!r}")


def run_bench(archs: Sequence[str], *, img_size: int = 224, batch_size: int = 32, device: str = "auto",
              amp: bool | None = None, channels_last: bool | None = None, runs: int = 5,
              data_path: str | os.PathLike | None = None, pipeline: bool = False, workers: int | None = None,
              epochs: int = 2, cache: str = "auto", cache_max_gb: float | None = None, gpu_decode: bool = False,
              log: Log = lambda s: None) -> list[dict[str, Any]]:
    """Benchmark ``archs``; one dict per architecture (see the module docstring)."""
    from cnntrain.data import default_workers, load_folder
    from cnntrain.runtime import amp_dtype_for, resolve_device, use_channels_last
    from cnntrain.train.pipeline import PipelineSettings, decoded_image_cache

    _check_request(batch_size=batch_size, img_size=img_size, runs=runs, epochs=epochs, workers=workers,
                   pipeline=pipeline, data_path=data_path, cache=cache)
    dev = resolve_device(device)
    amp_dtype = amp_dtype_for(dev, amp)
    channels_last = use_channels_last(dev, img_size) if channels_last is None else channels_last
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    splits = None
    if pipeline:
        assert data_path is not None  # _check_request
        splits = load_folder(data_path, val_split=0)
        if len(splits.train) < 2:
            raise UsageError(f"{data_path}: only {len(splits.train)} image(s); the pipeline benchmark needs at least 2")
    workers = default_workers() if workers is None else workers
    caches: dict[int, tuple[Any, float]] = {}  # image size -> (cache, seconds to build it)
    rows = []
    for name in archs:
        log(f"benchmarking {name} on {dev} ...")
        num_classes = splits.num_classes if splits is not None else 1000
        row, model = bench_model(name, img_size=img_size, batch_size=batch_size, device=dev, amp_dtype=amp_dtype,
                                 channels_last=channels_last, runs=runs, num_classes=num_classes)
        if splits is not None:
            size = row["img_size"]
            if size not in caches:  # as in fit: no image cache when the GPU decodes
                start = time.perf_counter()
                settings = PipelineSettings(img_size=size, cache=cache, cache_max_gb=cache_max_gb)
                built = (None if gpu_decode and dev.type == "cuda"
                         else decoded_image_cache(splits, settings, workers=workers, log=log))
                caches[size] = built, time.perf_counter() - start
            image_cache, seconds = caches[size]
            bench_pipeline(row, model, splits, device=dev, amp_dtype=amp_dtype, channels_last=channels_last,
                           workers=workers, epochs=epochs, image_cache=image_cache, gpu_decode=gpu_decode, log=log)
            row["cache_seconds"] = seconds if image_cache is not None else 0.0
        rows.append(row)
        del model
    return rows


def bench_table(rows: list[dict[str, Any]]):
    """A rich Table of the results."""
    from rich.table import Table

    first = rows[0]
    amp = first["amp"] or "off"
    table = Table(title=f"{first['device']}, {first['img_size']}px, batch {first['batch_size']}, amp {amp}, "
                        f"channels_last {'on' if first['channels_last'] else 'off'}"
                        + (f", image cache {first['cache']}" if "cache" in first else ""))
    cols: list[tuple[str, str, str | None]] = [
        ("arch", "arch", "{}"), ("params (M)", "params_m", "{:.2f}"), ("GMACs", "gmacs", "{:.3f}"),
        ("infer img/s", "infer_images_per_s", "{:.1f}"), ("latency (ms)", "latency_ms", "{:.2f}"),
        ("train img/s", "train_images_per_s", "{:.1f}"), ("bare loop img/s", "bare_images_per_s", "{:.1f}"),
        ("step / bare", "step_vs_bare", "{:.2f}x")]
    if "efficiency" in first:
        cols += [("data img/s", "data_images_per_s", "{:.1f}"), ("epochs img/s", "epoch_images_per_s", None),
                 ("end-to-end img/s", "e2e_images_per_s", "{:.1f}"), ("efficiency", "efficiency", "{:.0%}")]
    for title, _, _ in cols:
        table.add_column(title, justify="left" if title == "arch" else "right")
    for r in rows:
        table.add_row(*(", ".join(f"{v:.1f}" for v in r[key]) if fmt is None else fmt.format(r[key])
                        for _, key, fmt in cols))
    return table


def plot_bench(rows: list[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Scatter of GMACs (x) against training images/s (y), one labelled point per architecture."""
    from cnntrain.plots import new_figure, save_png

    fig = new_figure(7, 5)
    ax = fig.add_subplot()
    xs, ys = [r["gmacs"] for r in rows], [r["train_images_per_s"] for r in rows]
    ax.scatter(xs, ys, s=36, color="tab:blue", zorder=3)
    for r, x, y in zip(rows, xs, ys):
        ax.annotate(r["arch"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    first = rows[0]
    ax.set_xlabel(f"GMACs at {first['img_size']}px")
    ax.set_ylabel("training images/s")
    ax.set_title(f"training step throughput on {first['device']} (batch {first['batch_size']})")
    ax.grid(True, alpha=0.3)
    ax.set_ylim(bottom=0)
    ax.set_xlim(left=0, right=max(xs) * 1.25 if max(xs) > 0 else 1)
    return save_png(fig, path)
