"""Expected failures, each mapped to one line of output and an exit code by the CLI.

The library raises these instead of printing or exiting, so it stays usable from Python
and the CLI stays the single place that decides how an error looks.
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


class WeightsError(CnnTrainError):
    """Pretrained weights are unavailable (not cached and not downloadable) or corrupt."""


class DownloadError(WeightsError):
    """A download failed: refused, timed out, truncated or failed its hash check."""
