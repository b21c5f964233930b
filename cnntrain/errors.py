"""Expected failures, each mapped to one line of output and an exit code by the CLI.

The library raises these instead of printing or exiting, so it stays usable from Python
and the CLI stays the single place that decides how an error looks. :func:`first_line` is the
one way any module squeezes a message, path or reason onto one line.
"""

from __future__ import annotations


class CnnTrainError(Exception):
    """Base class: a failure the user can act on (bad input, missing file, ...)."""

    exit_code: int = 1


class UsageError(CnnTrainError):
    """The command line or config asked for something that does not exist or conflicts."""

    exit_code = 2


class DataError(CnnTrainError):
    """The dataset is missing, empty, malformed or unreadable."""


class CheckpointError(CnnTrainError):
    """A checkpoint or weights file is damaged, unsafe or does not fit the model."""


class MissingDependencyError(CnnTrainError):
    """An optional package (an extra: onnx, explain, tensorboard) is needed for this and is not
    installed; the message names the ``pip install 'cnntrain[EXTRA]'`` that brings it."""


def missing_extra(what: str, package: str, extra: str) -> MissingDependencyError:
    """The one-line error for an optional package that is not installed, naming the pip command."""
    return MissingDependencyError(f"{what} needs {package}, which is not installed: pip install 'cnntrain[{extra}]'")


class WeightsError(CnnTrainError):
    """Pretrained weights are unavailable (not cached and not downloadable) or corrupt."""


class DownloadError(WeightsError):
    """A download failed: refused, timed out, truncated or failed its hash check."""


def first_line(text_or_exception: object, limit: int | None = None, *, with_type: bool = False) -> str:
    """One line for an error message, a log line or an error row; the only such helper.

    Two kinds of input, two rules:

    - an exception: the first non-empty line of its message, stripped, or its type name when the
      message is empty. Later lines are detail a one-line error must not carry: DataLoader
      workers append a traceback, the ONNX exporter the whole graph, torch.load its advice.
      ``with_type`` puts the type name in front (``ValueError: ...``), for exceptions raised by
      other libraries, whose messages often make sense only with it.
    - anything else (a path, a reason): all of it, with carriage returns and newlines written as
      ``\\r`` and ``\\n``, so a file name holding a newline stays recognisable and cannot forge a
      second log line.

    ``limit`` cuts the result to that many characters, the last three being ``...``; None keeps
    it whole.
    """
    if isinstance(text_or_exception, BaseException):
        lines = [line.strip() for line in str(text_or_exception).splitlines() if line.strip()]
        name = type(text_or_exception).__name__
        text = (f"{name}: {lines[0]}" if with_type else lines[0]) if lines else name
    else:
        text = str(text_or_exception).replace("\r", "\\r").replace("\n", "\\n")
    if limit is not None and len(text) > limit:
        text = text[: limit - 3] + "..."
    return text
