"""The only writer of a run's ``.pt`` files: best.pt, last.pt, and last.pt on an interrupt.

best.pt holds the weights and what describes them (enough for predict, eval and export), and
after the last epoch the temperature fitted on validation (``add_to_best``);
last.pt adds the training state (``TrainingState.state_dict()``) and the number of processes,
and, when a signal stopped the run mid-epoch, the running sums of that epoch. Under torchrun
only rank 0 writes.

last.pt follows every epoch, except while only the head trains on cached features: those
epochs take milliseconds, and writing (and fsyncing) the whole model after each cost more than
the training. There it is written at most every :data:`QUICK_SAVE_EVERY` seconds, and always
after the first epoch of a session, the last one, and one a stop request or early stopping
ends the run on; best.pt is still written whenever an epoch improves. A killed run therefore
loses at most those few seconds of head training, and resumes from the epoch it saved.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch.nn as nn

from cnntrain import checkpoint
from cnntrain.train.state import TrainingState

#: Seconds between two last.pt saves while epochs are quick (the head on cached features).
QUICK_SAVE_EVERY = 5.0


class Checkpointer:
    def __init__(self, run_dir: Path, describe: dict[str, Any], *, enabled: bool, world_size: int) -> None:
        self.run_dir = run_dir
        self.describe = describe  # arch, classes, img_size, mean, std, config
        self.enabled = enabled
        self.world_size = world_size
        self._last_saved: float | None = None  # time.monotonic() of this session's latest last.pt

    @property
    def last(self) -> Path:
        return self.run_dir / "last.pt"

    @property
    def best(self) -> Path:
        return self.run_dir / "best.pt"

    def end_of_epoch(self, model: nn.Module, epoch: int, metrics: dict[str, Any], state: TrainingState,
                     improved: bool, *, ending: bool = False, quick: bool = False) -> None:
        """best.pt when the epoch improved the monitored metric, then last.pt: always, unless the
        epoch was ``quick`` (head only) and the last save is recent; ``ending``: the run stops now."""
        if not self.enabled:
            return
        if improved:  # the weights that scored best: the model's own, or their average (--ema)
            checkpoint.save(self.best, checkpoint.make_checkpoint(
                state.best_weights(model), epoch=epoch, metrics=metrics, **self.describe,
                weights_averaged=state.best_is_ema))
        recent = self._last_saved is not None and time.monotonic() - self._last_saved < QUICK_SAVE_EVERY
        if ending or not (quick and recent):
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
        self._last_saved = time.monotonic()
