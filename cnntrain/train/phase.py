"""Which network an epoch trains, on what input: the full model, or the head on cached features.

With ``--freeze-layers`` the backbone is frozen; with ``--aug none`` as well, its output cannot
change between epochs, so the head trains on features computed once (``features.py``). From
``--unfreeze-epoch`` on, everything trains through the full model again. ``Phases`` makes that
decision each epoch and hands the loop a ``Phase``: the loop itself never asks which one it got.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from cnntrain.data.sampler import EpochSampler
from cnntrain.engine import Batcher
from cnntrain.models.heads import keep_frozen_bn_eval, unfreeze
from cnntrain.train.features import FeaturePhase
from cnntrain.train.pipeline import InputPipeline


@dataclass
class Phase:
    net: nn.Module  # what the optimiser steps through (DDP / compiled when asked)
    eval_net: nn.Module  # what scores validation: never DDP, as ranks hold shards of different lengths
    train: Any  # loader of (inputs, targets[, skipped paths])
    val: Any | None
    batcher: Batcher
    sampler: EpochSampler
    prepare: Callable[[nn.Module], None] | None = None  # after model.train(): e.g. frozen BatchNorm stays eval
    head_only: str | None = None  # the head's name when ``net`` is just the head, on cached features

    def eval_net_of(self, model: nn.Module) -> nn.Module:
        """What scores validation for another copy of the model (an average of its weights)."""
        return model.get_submodule(self.head_only) if self.head_only is not None else model


class Phases:
    """The phase of each epoch; unfreezes (and re-wraps) the model when its epoch comes."""

    def __init__(self, model: nn.Module, head: str, pipeline: InputPipeline, *, frozen: bool,
                 unfreeze_epoch: int | None, features: FeaturePhase | None, wrap: Callable[[nn.Module], nn.Module],
                 distributed: bool, log: Callable[[str], None] = lambda s: None) -> None:
        self.model, self.head, self.pipeline = model, head, pipeline
        self.frozen, self.unfreeze_epoch, self.features = frozen, unfreeze_epoch, features
        self.wrap, self.distributed, self.log = wrap, distributed, log
        self.train_model = wrap(model)
        self.head_model = wrap(features.head) if features is not None else None

    def for_epoch(self, epoch: int) -> Phase:
        """The phase of 1-based ``epoch``."""
        if self.frozen and self.unfreeze_epoch is not None and epoch >= self.unfreeze_epoch:
            unfreeze(self.model)
            self.frozen = False
            self.train_model = self.wrap(self.model)
            self.log(f"epoch {epoch}: unfreezing all layers")
        if self.frozen and self.head_model is not None:  # set exactly when features were cached
            return self._feature_phase(self.head_model)
        pipe = self.pipeline
        prepare = (lambda m: keep_frozen_bn_eval(self.model, self.head)) if self.frozen else None
        return Phase(self.train_model, self.model if self.distributed else self.train_model, pipe.train, pipe.val,
                     pipe.batcher, pipe.sampler, prepare)

    def best_scorer(self) -> Phase:
        """How the best weights are scored at the end: on the cached features while still frozen
        (the head scores on them exactly as through the model), else through the bare model."""
        if self.frozen and self.features is not None:
            return self._feature_phase(self.features.head)
        pipe = self.pipeline
        return Phase(self.model, self.model, pipe.train, pipe.val, pipe.batcher, pipe.sampler)

    def _feature_phase(self, net: nn.Module) -> Phase:
        f = self.features
        assert f is not None
        return Phase(net, f.head, f.train, f.val, f.batcher, f.sampler, head_only=self.head)
