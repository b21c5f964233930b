"""What a run prints: tqdm bars on a terminal, plain lines in logs, nothing with --quiet.

CI logs should read like a transcript, so bars (carriage returns) appear only when stdout
is a terminal; every epoch still gets one summary line either way.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO

from tqdm import tqdm


class Reporter:
    def __init__(self, quiet: bool = False, stream: IO[str] | None = None, enabled: bool = True) -> None:
        self.stream = stream or sys.stdout
        self.quiet = quiet
        self.enabled = enabled  # False on non-zero ranks of a distributed run
        self.interactive = enabled and not quiet and _isatty(self.stream)

    def info(self, message: str) -> None:
        if self.enabled and not self.quiet:
            print(message, file=self.stream, flush=True)

    def always(self, message: str) -> None:
        if self.enabled:
            print(message, file=self.stream, flush=True)

    @contextmanager
    def bar(self, desc: str, total: int) -> Iterator[Callable[[dict[str, float]], None]]:
        """A per-batch callback that feeds a tqdm bar (or does nothing off a terminal)."""
        if not self.interactive:
            yield lambda stats: None
            return
        with tqdm(total=total, desc=desc, file=self.stream, leave=False, dynamic_ncols=True,
                  unit="img", unit_scale=True) as pbar:

            def update(stats: dict[str, float]) -> None:
                pbar.update(stats["n"])
                postfix = {"loss": f"{stats['loss']:.3f}", "acc": f"{stats['acc']:.3f}"}
                if "lr" in stats:
                    postfix["lr"] = f"{stats['lr']:.2e}"
                postfix["img/s"] = f"{stats['images_per_s']:.0f}"
                pbar.set_postfix(postfix, refresh=False)

            yield update


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def format_epoch(epoch: int, epochs: int, row: dict[str, float]) -> str:
    """One line per epoch, in the tutorial scripts' spirit: ``epoch[3/10] train_loss:0.735 ...``."""
    parts = [f"epoch[{epoch}/{epochs}]", f"train_loss:{row['train_loss']:.3f}", f"train_acc:{row['train_acc']:.3f}"]
    if row.get("val_acc") is not None:
        parts += [f"val_loss:{row['val_loss']:.3f}", f"val_acc:{row['val_acc']:.3f}"]
        if row.get("val_top5") is not None:  # None with 5 classes or fewer
            parts.append(f"val_top5:{row['val_top5']:.3f}")
        if row.get("val_acc_ema") is not None:
            parts.append(f"val_acc_ema:{row['val_acc_ema']:.3f}")
    parts += [f"lr:{row['lr']:.2e}", f"{row['images_per_s']:.0f} img/s", f"{row['seconds']:.1f}s"]
    return " ".join(parts)
