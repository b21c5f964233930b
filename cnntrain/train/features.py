"""Frozen-backbone feature cache: run the backbone once, then train the head on its output.

With ``--freeze-layers`` and a deterministic training transform (``--aug none``) the input of
the head cannot change between epochs, so pushing every image through the whole network
again is waste. The features are captured by a hook on the head (so this works for every
family without knowing its layout) and kept in memory; the head trains on them with the same
engine loops. The trained head stays inside the full model, so checkpoints are complete and
``predict``/``eval`` need nothing special.

Trade-off: features are taken in eval mode, so dropout placed *before* the head (MobileNet,
EfficientNet, VGG) does not act during the cached phase.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import ConcatDataset, Dataset, Subset

from cnntrain.data import DatasetSplits, ImageDataset, Unreadable, collate_skipping, eval_transform, make_loader
from cnntrain.data.sampler import EpochSampler
from cnntrain.engine import Batcher, unpack
from cnntrain.train.distributed import DistContext
from cnntrain.train.pipeline import InputPipeline, PipelineSettings, train_sampler


class FeatureDataset(Dataset):
    """Cached ``(feature, label)`` pairs; accepts the sampler's ``(seed, index)`` keys too."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.features = features
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index = key[1] if isinstance(key, tuple) else key
        return self.features[index], int(self.labels[index])


@torch.no_grad()
def extract_features(model: nn.Module, head: str, loader: Iterable,
                     batcher: Batcher) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's input for every sample of ``loader`` (in loader order), on the CPU."""
    captured: list[torch.Tensor] = []
    hook = model.get_submodule(head).register_forward_pre_hook(
        lambda module, args: captured.append(args[0].detach().float().cpu()))
    labels: list[torch.Tensor] = []
    model.eval()
    try:
        for batch in loader:
            images, targets, _ = unpack(batch)
            if targets.numel() == 0:
                continue
            images, _ = batcher(images, targets)
            with batcher.autocast():
                model(images)
            labels.append(targets.cpu())
    finally:
        hook.remove()
    if not labels:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.cat(captured), torch.cat(labels)


@torch.no_grad()
def head_reproduces_model(model: nn.Module, head: str, images: torch.Tensor) -> bool:
    """True when the model's output is exactly its head applied to the captured input, i.e.
    nothing (pooling, activation) follows the head; else the cache cannot be used."""
    captured: list[torch.Tensor] = []
    module = model.get_submodule(head)
    hook = module.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    model.eval()
    try:
        out = model(images)
    finally:
        hook.remove()
    return len(captured) == 1 and out.shape == module(captured[0]).shape and torch.allclose(
        out, module(captured[0]), atol=1e-5)


@dataclass
class FeaturePhase:
    """Loaders over cached backbone features, and the head that trains on them."""

    head: nn.Module
    train: Any
    val: Any
    sampler: EpochSampler
    batcher: Batcher


class _ValTagged(Dataset):
    """Shifts labels by ``offset`` so train and val can share one extraction pass and still be
    told apart afterwards, whatever unreadable images the pass drops."""

    def __init__(self, dataset: Dataset, offset: int) -> None:
        self.dataset, self.offset = dataset, offset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        return item if isinstance(item, Unreadable) else (item[0], item[1] + self.offset)


def cached_features(model: nn.Module, head: str, splits: DatasetSplits, pipeline: InputPipeline, *, arch: str,
                    settings: PipelineSettings, device: torch.device, ctx: DistContext = DistContext(),
                    log: Callable[[str], None] = lambda s: None) -> FeaturePhase | None:
    """Run the frozen backbone once over train and val; None when the model cannot use the cache.

    Under torchrun every rank extracts the features it trains on (all of train, as the shuffle
    spans ranks, and its shard of val) into its own memory; nothing is written to disk."""
    batcher, batch_size = pipeline.batcher, settings.batch_size
    transform = eval_transform(settings.img_size)
    probe_cache = pipeline.train_cache.split(2)[0] if pipeline.train_cache is not None else None  # no decoding
    probe = next(iter(make_loader(ImageDataset(splits.train[:2], transform, cache=probe_cache), batch_size=2,
                                  shuffle=False, workers=0)))[0]
    if not head_reproduces_model(model, head, batcher(probe, torch.zeros(len(probe)))[0]):
        log(f"feature cache: {arch} has layers after its head `{head}`; training through the full model")
        return None
    started = time.perf_counter()
    classes = splits.num_classes
    val_shard = Subset(ImageDataset(splits.val, transform, skip_unreadable=True, cache=pipeline.val_cache),
                       range(ctx.rank, len(splits.val), ctx.world_size))  # as ShardSampler splits it
    train_set = ImageDataset(splits.train, transform, skip_unreadable=True, cache=pipeline.train_cache)
    both: ConcatDataset[Any] = ConcatDataset([train_set, _ValTagged(val_shard, classes)])
    extract = make_loader(both, batch_size=batch_size, shuffle=False, workers=pipeline.workers, device=device,
                          collate_fn=collate_skipping)
    x, y = extract_features(model, head, extract, batcher)
    is_val = y >= classes
    train_x, train_y, val_x, val_y = x[~is_val], y[~is_val], x[is_val], y[is_val] - classes
    log(f"feature cache: backbone ran once over {len(train_y)} train + {len(val_y)} val images in "
        f"{time.perf_counter() - started:.1f}s ({x.numel() * 4 / 1e6:.0f} MB); the head trains on cached features")
    sampler = train_sampler(train_y.tolist(), settings, ctx)
    train = make_loader(FeatureDataset(train_x, train_y), batch_size=batch_size, shuffle=False, sampler=sampler,
                        workers=0, device=device, drop_last=sampler.num_samples % batch_size == 1)
    val = (make_loader(FeatureDataset(val_x, val_y), batch_size=batch_size, shuffle=False, workers=0, device=device)
           if splits.val else None)
    return FeaturePhase(head=model.get_submodule(head), train=train, val=val, sampler=sampler,
                        batcher=Batcher(device, None, False, batcher.amp_dtype))
