"""An exponential moving average of the weights (``--ema``), validated beside the raw weights.

Small fine-tuning runs are noisy from step to step; an average over the last few hundred steps
often generalises better. The average is torch's ``AveragedModel`` with ``get_ema_multi_avg_fn``
over parameters and buffers (BatchNorm's running statistics too). The decay is warmed up,
``min(decay, (1 + n) / (10 + n))`` after n updates, so that in the first epochs the average is not
dominated by the random start (timm #245: EMA accuracy near 0 early on).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def warmed_decay(decay: float, updates: int) -> float:
    """The decay of the update after ``updates`` earlier ones (the first of which copies the
    model): short memory at first, ``decay`` in the long run."""
    return min(decay, (1 + updates) / (10 + updates))


class WeightAverage:
    """The EMA of a model; ``update(model)`` after every optimiser step."""

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        self.decay = decay
        self.updates = 0
        self._current = decay
        self.averaged = AveragedModel(model, multi_avg_fn=self._average, use_buffers=True)
        self.averaged.eval()

    @property
    def module(self) -> nn.Module:
        """The averaged copy of the model, for validation and best.pt."""
        return self.averaged.module

    def _average(self, averaged: list[torch.Tensor] | tuple[torch.Tensor, ...],
                 current: list[torch.Tensor] | tuple[torch.Tensor, ...], n_averaged: torch.Tensor | int) -> None:
        get_ema_multi_avg_fn(self._current)(averaged, current, n_averaged)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        # The decay is computed from a Python count: reading n_averaged would wait for the GPU.
        self._current = warmed_decay(self.decay, self.updates)
        self.averaged.update_parameters(model)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"averaged": self.averaged.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.averaged.load_state_dict(state["averaged"])
        self.updates = int(state["updates"])
