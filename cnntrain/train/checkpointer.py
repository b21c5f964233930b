"""The only writer of a run's ``.pt`` files: best.pt, last.pt, and last.pt on an interrupt.

best.pt holds the weights and what describes them (enough for predict, eval and export), and
after the last epoch the temperature fitted on validation (``add_to_best``);
last.pt adds the training state (``TrainingState.state_dict()``) and the number of processes,
and, when a signal stopped the run mid-epoch, the running sums of that epoch. Under torchrun
only rank 0 writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.nn as nn

from cnntrain import checkpoint
from cnntrain.train.state import TrainingState


class Checkpointer:
    def __init__(self, run_dir: Path, describe: dict[str, Any], *, enabled: bool, world_size: int) -> None:
        self.run_dir = run_dir
        self.describe = describe  # arch, classes, img_size, mean, std, config
        self.enabled = enabled
        self.world_size = world_size

    @property
    def last(self) -> Path:
        return self.run_dir / "last.pt"

    @property
    def best(self) -> Path:
        return self.run_dir / "best.pt"

    def end_of_epoch(self, model: nn.Module, epoch: int, metrics: dict[str, Any], state: TrainingState,
                     improved: bool) -> None:
        """best.pt when the epoch improved the monitored metric, then last.pt, always."""
        if not self.enabled:
            return
        if improved:  # the weights that scored best: the model's own, or their average (--ema)
            checkpoint.save(self.best, checkpoint.make_checkpoint(
                state.best_weights(model), epoch=epoch, metrics=metrics, **self.describe,
                weights_averaged=state.best_is_ema))
        self._save_last(model, epoch, metrics, state)

    def add_to_best(self, saved: dict[str, Any], **fields: Any) -> None:
        """best.pt once more: ``saved`` (what it holds, as just loaded) plus ``fields``, learnt
        about those weights after the last epoch (the temperature, ``cnntrain.analysis``)."""
        if self.enabled:
            checkpoint.save(self.best, {**saved, **fields})

    def interrupted(self, model: nn.Module, epochs_done: int, state: TrainingState,
                    partial_epoch: dict[str, Any]) -> None:
        """last.pt of a run stopped inside epoch ``epochs_done + 1``: resuming continues at that step."""
        if self.enabled:
            self._save_last(model, epochs_done, {}, state, partial_epoch=partial_epoch)

    def _save_last(self, model: nn.Module, epoch: int, metrics: dict[str, Any], state: TrainingState,
                   **extra: Any) -> None:
        checkpoint.save(self.last, checkpoint.make_checkpoint(
            model, epoch=epoch, metrics=metrics, **self.describe, **state.state_dict(),
            world_size=self.world_size, **extra))
