"""The input pipeline of a run: datasets, samplers, the decoded-image cache, loaders, batcher.

Built by one function, ``build_pipeline``, which ``fit`` and ``bench --pipeline`` both call, so
what the benchmark times is what training runs (drop_last rule, GPU decoding, caches included).
See DESIGN.md, "The input path": loaders yield uint8 batches; the ``Batcher`` makes them the
model's float input on the device. ``FirstPass`` builds the image cache early, as the scan's
reader, so that a first run decodes each image once, not once to check it and once to cache it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from cnntrain.data import DatasetSplits, ImageDataset, Normalize, collate_skipping, default_workers, make_loader
from cnntrain.data.gpu_decode import EncodedImageDataset, collate_encoded, use_gpu_decode
from cnntrain.data.imagecache import ImageCache, build_image_cache, default_budget
from cnntrain.data.sampler import EpochSampler, SeededDataset, ShardSampler, balanced_weights
from cnntrain.data.scan import Reader
from cnntrain.data.transforms import CROP_RATIO, Augment, eval_transform, train_transform
from cnntrain.engine import Batcher
from cnntrain.train.distributed import DistContext

Log = Callable[[str], None]


@dataclass(frozen=True)
class PipelineSettings:
    """What the pipeline reads from the run's configuration (``TrainConfig.pick``)."""

    img_size: int = 224
    aug: tuple[str, ...] = ()
    batch_size: int = 32
    workers: int | None = None  # None: default_workers() shared between the ranks of this machine
    seed: int = 0
    cache: str = "auto"
    cache_max_gb: float | None = None  # None: a quarter of the available memory
    gpu_decode: bool = False
    sampler: str = "shuffle"  # or balanced: classes drawn equally often
    hflip: float = 0.5  # the random training transform (data.transforms.Augment), resolved from the preset
    vflip: float = 0.0
    crop_scale: tuple[float, ...] = (0.08, 1.0)
    crop_ratio: tuple[float, ...] = (3 / 4, 4 / 3)
    rotate: float = 0.0
    color_jitter: float = 0.0

    @property
    def augment(self) -> Augment:
        return Augment(hflip=self.hflip, vflip=self.vflip, crop_scale=(self.crop_scale[0], self.crop_scale[1]),
                       crop_ratio=(self.crop_ratio[0], self.crop_ratio[1]), rotate=self.rotate,
                       color_jitter=self.color_jitter).check()

    @property
    def deterministic(self) -> bool:
        """``--aug none``: every epoch sees the same training tensors (what the feature cache needs)."""
        return "none" in self.aug

    def loader_workers(self, local_world_size: int = 1) -> int:
        if self.workers is not None:
            return self.workers
        return max(1, default_workers() // local_world_size)


@dataclass
class InputPipeline:
    train: DataLoader
    val: DataLoader | None
    sampler: EpochSampler  # call set_epoch before each epoch
    batcher: Batcher
    workers: int
    train_cache: ImageCache | None
    val_cache: ImageCache | None


def train_sampler(labels: list[int], settings: PipelineSettings, ctx: DistContext) -> EpochSampler:
    """The epoch-seeded training sampler: a shuffle, or with ``--sampler balanced`` a weighted draw."""
    weights = balanced_weights(labels) if settings.sampler == "balanced" else None
    return EpochSampler(labels, shuffle=True, seed=settings.seed, num_replicas=ctx.world_size, rank=ctx.rank,
                        weights=weights)


def decoded_image_cache(splits: DatasetSplits, settings: PipelineSettings, *, workers: int, local_world_size: int = 1,
                        log: Log = lambda s: None, progress: bool = False) -> ImageCache | None:
    """Every image of train and val decoded once, resized to the eval size, for all epochs."""
    return _image_cache(splits.train + splits.val, settings, workers=workers, local_world_size=local_world_size,
                        log=log, progress=progress)


def _image_cache(samples: Sequence[tuple[str, int]], settings: PipelineSettings, *, workers: int,
                 local_world_size: int, log: Log, progress: bool,
                 known_bad: Mapping[int, str] | None = None) -> ImageCache | None:
    """The image cache of ``samples`` as ``settings`` ask for it. Under torchrun each rank holds
    its own RAM copy, so the machine's budget is shared."""
    budget_gb = settings.cache_max_gb if settings.cache_max_gb is not None else default_budget() / 1e9
    return build_image_cache(samples, short_side=int(settings.img_size / CROP_RATIO), mode=settings.cache,
                             max_gb=budget_gb / local_world_size, workers=workers, log=log, progress=progress,
                             known_bad=known_bad)


class FirstPass:
    """The run's one decoding pass over its images: the image cache's build, done as the scan.

    Before the first step the scan must decode every image (a bad file is reported up front) and
    the image cache must decode every image (to keep its pixels): the same work, twice on a first
    run. So the cache is built early, as the scan's reader (``scan_samples(reader=...)``): over
    the samples as loaded, with the files the scan already knows to be bad recorded unopened, and
    its verdicts become the scan's. ``cache_for`` then narrows it to the samples the run keeps.
    Being built for the list as loaded, a disk cache's key does not depend on which files turned
    out bad, so the next run finds it (and its scan finds every verdict cached): it decodes nothing.

    Where no image cache is built (``--cache none``, ``--gpu-decode`` on CUDA) there is no
    reader and the scan decodes by itself, as before.
    """

    def __init__(self, settings: PipelineSettings, *, device: torch.device, ctx: DistContext = DistContext(),
                 log: Log = lambda s: None, progress: bool = False) -> None:
        self.settings, self.log, self.progress = settings, log, progress
        self.local_world_size = ctx.local_world_size
        self.workers = settings.loader_workers(ctx.local_world_size)  # as build_pipeline would build it with
        self.wanted = settings.cache != "none" and not (settings.gpu_decode and device.type == "cuda")
        self._paths: list[str] | None = None  # what the cache was built for; None: not built (yet)
        self._cache: ImageCache | None = None

    @property
    def reader(self) -> Reader | None:
        """What the scan is given: ``read``, or None where the run builds no image cache."""
        return self.read if self.wanted else None

    def read(self, samples: Sequence[tuple[str, int]], known_bad: Mapping[int, str]) -> dict[int, str | None]:
        """Build the cache of ``samples``; what it found of each image, for the scan."""
        self._cache = _image_cache(samples, self.settings, workers=self.workers,
                                   local_world_size=self.local_world_size, log=self.log, progress=self.progress,
                                   known_bad=known_bad)
        self._paths = [path for path, _ in samples]
        return self._cache.verdicts() if self._cache is not None else {}

    def cache_for(self, splits: DatasetSplits, build: bool = True) -> ImageCache | None | bool:
        """``build_pipeline``'s ``image_cache`` for ``splits`` (readable samples picked, in order, from
        those the cache was built for): a view of the cache, False when the pass found no room for
        one (asking again would find none either), else ``build`` (the pass did not run)."""
        if self._paths is None:
            return build
        if self._cache is None:
            return False
        indices = _positions(self._paths, [path for path, _ in splits.train + splits.val])
        return self._cache.select(indices) if indices is not None else build


def _positions(built: Sequence[str], kept: Sequence[str]) -> list[int] | None:
    """Where each of ``kept`` sits in ``built``, which it was picked from in order; None if it was not."""
    positions: list[int] = []
    at = 0
    for path in kept:
        while at < len(built) and built[at] != path:
            at += 1
        if at == len(built):
            return None
        positions.append(at)
        at += 1
    return positions


def build_pipeline(splits: DatasetSplits, settings: PipelineSettings, *, device: torch.device,
                   mean: list[float], std: list[float], channels_last: bool, amp_dtype: torch.dtype | None,
                   ctx: DistContext = DistContext(), image_cache: ImageCache | None | bool = True,
                   log: Log = lambda s: None, progress: bool = False) -> InputPipeline:
    """Loaders over ``splits`` as training reads them.

    ``image_cache``: True builds the decoded-image cache (``settings.cache``), False uses none,
    or pass one already built for ``splits.train + splits.val``. ``--gpu-decode`` on CUDA makes
    the workers pass JPEG bytes that the Batcher decodes and augments on the device (no cache).
    """
    workers = settings.loader_workers(ctx.local_world_size)
    gpu_decode = use_gpu_decode(settings.gpu_decode, device, log)
    if gpu_decode or image_cache is False:
        image_cache = None
    elif image_cache is True:
        image_cache = decoded_image_cache(splits, settings, workers=workers, local_world_size=ctx.local_world_size,
                                          log=log, progress=progress)
    train_cache, val_cache = image_cache.split(len(splits.train)) if image_cache is not None else (None, None)
    dataset_type, collate = (EncodedImageDataset, collate_encoded) if gpu_decode else (ImageDataset, collate_skipping)
    if settings.deterministic:
        train_tf = eval_transform(settings.img_size)
    else:
        augment = settings.augment
        train_tf = train_transform(settings.img_size, settings.aug, augment=augment)
        extras = [a for a in settings.aug if a != "none"]
        log(f"training transform: {augment.describe()}" + (f", then {', '.join(extras)}" if extras else ""))
    sampler = train_sampler([label for _, label in splits.train], settings, ctx)
    # BatchNorm cannot train on a batch of one: skip that lone last sample (a different one
    # each epoch, as the order is shuffled) rather than crash at the end of the epoch.
    drop_last = sampler.num_samples % settings.batch_size == 1
    # Files that break after the scan are skipped and counted, never fatal (collate_skipping).
    train = make_loader(SeededDataset(dataset_type(splits.train, train_tf, skip_unreadable=True, cache=train_cache)),
                        batch_size=settings.batch_size, shuffle=False, sampler=sampler, workers=workers, device=device,
                        seed=settings.seed, drop_last=drop_last, collate_fn=collate)
    val = None
    if splits.val:
        val = make_loader(dataset_type(splits.val, eval_transform(settings.img_size), skip_unreadable=True,
                                       cache=val_cache),
                          batch_size=settings.batch_size, shuffle=False, workers=workers, device=device,
                          seed=settings.seed, collate_fn=collate,
                          sampler=ShardSampler(splits.val, num_replicas=ctx.world_size, rank=ctx.rank))
    batcher = Batcher(device, Normalize(mean, std).to(device), channels_last, amp_dtype)
    return InputPipeline(train, val, sampler, batcher, workers, train_cache, val_cache)
