"""Training: ``fit(config)`` and the named parts it is made of.

Start at ``fit.py``: its docstring lists the parts (resume plan, splits, run model, training
state, input pipeline, phase, checkpointer, epoch loop, run files) and the seams a new
training feature plugs into without touching the epoch loop.
"""

from cnntrain.train.fit import fit
from cnntrain.train.resume import ResumePlan, train_config
from cnntrain.train.state import TrainResult

__all__ = ["ResumePlan", "TrainResult", "fit", "train_config"]
