"""Ctrl-C and SIGTERM during training: finish the current step, save, exit 130 / 143.

The handler only records the request; the training loop polls it between steps, so a
checkpoint is never written from inside a signal handler or halfway through an update. A
second signal while stopping falls back to Python's default (immediate) behaviour.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

from cnntrain.errors import CnnTrainError

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Interrupted(CnnTrainError):
    """Training stopped on a signal after saving; the exit code follows the shell convention."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = EXIT_CODES.get(signal.Signals(signum), 128 + int(signum))


class StopRequest:
    """Context manager installing SIGINT/SIGTERM handlers that set ``self.signum``.

    ``escalate=False`` (under torchrun) ignores further signals: Ctrl-C reaches every rank and
    torchrun then sends its own SIGTERM, which must not cut short the checkpoint being saved;
    torchrun itself SIGKILLs ranks that do not finish in time.
    """

    def __init__(self, escalate: bool = True) -> None:
        self.signum: int | None = None
        self.escalate = escalate
        self._previous: dict[int, object] = {}

    def __bool__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and self.escalate:  # asked twice: stop waiting for the step to finish
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))  # type: ignore[arg-type]
            signal.raise_signal(signum)
            return
        if self.signum is None:
            self.signum = signum

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # handlers only work there
            for sig in EXIT_CODES:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
