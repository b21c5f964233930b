"""Every image's answer from one evaluation pass: its file, its true class and the model's logits.

The metrics of a pass (loss, accuracy, the confusion matrix) are sums; the pictures and lists
of :mod:`cnntrain.analysis` need each image on its own. :class:`AnswerCollector` rides along the
evaluation loop (``cnntrain.engine.evaluate(..., keep=collector)``): it keeps each batch's
logits on the device and reads them back once, at the end, so the pass that scores the set
feeds both without a per-batch host read and without a second pass.

Outputs are tied to files afterwards, from the loader's order: the sample list in order (one
rank's shard of it under DDP, as ``ShardSampler`` deals it), less the files the loader reported
unreadable. The labels must then agree with the targets the pass saw; when they do not (a file
dropped on the way without a report, e.g. by GPU decoding), the answers keep no paths, and the
figures that need none (calibration) are still computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F


class Ranks(Protocol):
    """The processes of a run (``cnntrain.train.distributed.DistContext``, named by what it does so
    this package imports nothing of the trainer, which imports it)."""

    @property
    def rank(self) -> int: ...
    @property
    def world_size(self) -> int: ...
    @property
    def enabled(self) -> bool: ...
    @property
    def is_main(self) -> bool: ...
    def all_gather_rows(self, values: torch.Tensor) -> torch.Tensor: ...


@dataclass
class Answers:
    """The logits (float32, CPU) of every scored image, its target and, when known, its path."""

    classes: list[str]
    targets: torch.Tensor  # int64 (N,)
    logits: torch.Tensor  # float32 (N, classes)
    paths: list[str] | None = None  # None: the outputs could not be tied to files

    def __len__(self) -> int:
        return len(self.targets)

    def probs(self, temperature: float = 1.0) -> torch.Tensor:
        return (self.logits / temperature).softmax(dim=1)

    def losses(self, temperature: float = 1.0) -> torch.Tensor:
        """Each image's cross-entropy (no label smoothing: the loss of the answer itself)."""
        return F.cross_entropy(self.logits / temperature, self.targets, reduction="none")


@dataclass
class AnswerCollector:
    """``keep`` for the evaluation loop: each batch's logits and targets, left on the device."""

    logits: list[torch.Tensor] = field(default_factory=list)
    targets: list[torch.Tensor] = field(default_factory=list)
    skipped: set[str] = field(default_factory=set)

    def __call__(self, logits: torch.Tensor | None, targets: torch.Tensor, skipped: Sequence[str]) -> None:
        self.skipped.update(skipped)
        if logits is not None:
            self.logits.append(logits.detach().float())
            self.targets.append(targets.detach())

    def tensors(self, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All logits and targets so far, still on their device ((0, classes) for none)."""
        if not self.logits:
            return torch.zeros(0, num_classes), torch.zeros(0, dtype=torch.int64)
        return torch.cat(self.logits), torch.cat(self.targets).to(torch.int64)

    def answers(self, samples: Sequence[tuple[str, int]], classes: Sequence[str],
                ctx: Ranks | None = None) -> Answers:
        """The answers over all of ``samples``, the list the loader went through in order.

        Under DDP (``ctx``) every rank calls this: each ties its own shard to files, then the
        rows of all ranks are gathered and put back in the list's order, on every rank."""
        rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
        logits, targets = self.tensors(len(classes))
        kept = [i for i in range(rank, len(samples), world) if samples[i][0] not in self.skipped]
        tied = len(kept) == len(targets) and [samples[i][1] for i in kept] == targets.tolist()
        index = torch.tensor(kept if tied else [-1] * len(targets), dtype=torch.int64)
        if ctx is not None and ctx.enabled:
            logits, targets = ctx.all_gather_rows(logits), ctx.all_gather_rows(targets)
            index = ctx.all_gather_rows(index)
        logits, targets, index = logits.cpu(), targets.cpu(), index.cpu()
        if len(index) and bool((index < 0).any()):  # some rank could not tie its outputs to files
            return Answers(list(classes), targets, logits)
        order = index.argsort()
        return Answers(list(classes), targets[order], logits[order], [samples[int(i)][0] for i in index[order]])
