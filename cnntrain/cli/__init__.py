"""The ``cnntrain`` command line: one thin function per command.

Each command parses its options, makes one call into the library and prints the result.
Expected failures arrive as ``CnnTrainError`` and leave, through the one ``command`` wrapper,
as one red line and an exit code (2 for usage errors); only genuine bugs show a traceback.

Defaults in the help of ``train`` are read from ``TrainConfig`` and every list of choices from
``cnntrain.choices``, so the help cannot drift from the code. Nothing here imports torch until
a command runs: ``cnntrain --help`` stays fast.
"""

from cnntrain.cli.app import app, err, main, out

# Each module registers its commands on import; this order is the order of `cnntrain --help`.
# isort: off
from cnntrain.cli import training  # noqa: F401  train, lr-find
from cnntrain.cli import datacheck  # noqa: F401  check-data
from cnntrain.cli import results  # noqa: F401  predict, eval, export
from cnntrain.cli import explain  # noqa: F401  explain
from cnntrain.cli import report  # noqa: F401  report
from cnntrain.cli import tools  # noqa: F401  models, bench, download-weights
# isort: on

__all__ = ["app", "err", "main", "out"]
