"""What a finished run learns from its best weights on the validation split, from the pass that
scores them: the temperature stored in best.pt, the calibration before and after it, the
most-confused classes, ``top_losses.png`` and ``reliability.png``.

``fit`` hands over the answers that ``_score_best``'s pass collected; every rank calls
:func:`analyse_best` (under DDP the shards' answers are gathered first), rank 0 alone fits,
draws and returns the result, which ``runfiles.finish`` writes into summary.json.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnntrain.analysis.answers import AnswerCollector, Answers, Ranks
from cnntrain.analysis.calibration import T_MAX, T_MIN, Calibration, calibrate, reliability
from cnntrain.analysis.mistakes import ConfusedPair, Mistake, most_confused, top_losses

if TYPE_CHECKING:
    from cnntrain.metrics import ConfusionMatrix

TOP_LOSSES_PNG = "top_losses.png"
RELIABILITY_PNG = "reliability.png"


@dataclass
class RunAnalysis:
    """The end-of-run analysis; ``summary()`` is what it adds to summary.json."""

    temperature: float = 1.0  # 1.0: not fitted (no validation split)
    calibration: Calibration | None = None
    most_confused: list[ConfusedPair] = field(default_factory=list)
    top_losses: list[Mistake] = field(default_factory=list)
    pictures: list[str] = field(default_factory=list)  # file names written in the run folder
    note: str | None = None  # what could not be done, and why
    seconds: float = 0.0

    def checkpoint_fields(self) -> dict[str, Any]:
        """What best.pt gains: the temperature predict and eval divide the logits by, and how it was fitted."""
        return {"temperature": self.temperature,
                "calibration": self.calibration.as_dict() if self.calibration is not None else None}

    def summary(self) -> dict[str, Any]:
        """summary.json's keys (documented in README, "Files of a run"):

        - ``temperature``: the temperature stored in best.pt (1.0 when none was fitted);
        - ``calibration``: ``temperature``, ``images``, ``bins``, ``ece_before``/``ece_after`` and
          ``nll_before``/``nll_after`` on the validation split (the "after" figures are on the images
          the temperature was fitted on), or null without a validation split;
        - ``most_confused``: ``[{true, predicted, count}]``, largest count first;
        - ``top_losses``: ``[{path, true, predicted, prob, true_prob, loss}]``, the images of
          top_losses.png in its order, probabilities with the temperature;
        - ``analysis_seconds``: what all of this took; ``analysis_note``: what was left out, or null."""
        return {
            "temperature": self.temperature,
            "calibration": self.calibration.as_dict() if self.calibration is not None else None,
            "most_confused": [pair.as_dict() for pair in self.most_confused],
            "top_losses": [m.as_dict() for m in self.top_losses],
            "analysis_seconds": round(self.seconds, 3),
            "analysis_note": self.note,
        }

    def lines(self) -> list[str]:
        """What the run prints about it."""
        found = []
        c = self.calibration
        if c is not None:
            found.append(f"calibration: temperature {c.temperature:.3g} fitted on {c.images} validation images "
                         f"(stored in best.pt); ECE {c.ece_before:.3f} -> {c.ece_after:.3f} ({c.bins} bins), "
                         f"NLL {c.nll_before:.3f} -> {c.nll_after:.3f}"
                         + (" (at the bound of the search: too few or too easy validation images to tell)"
                            if any(math.isclose(c.temperature, t) for t in (T_MIN, T_MAX)) else ""))
        if self.most_confused:
            found.append("most confused (true -> predicted): "
                         + ", ".join(f"{p.true} -> {p.predicted} {p.count}" for p in self.most_confused[:5]))
        if self.pictures:
            found.append(f"{', '.join(self.pictures)}: the worst answers and the calibration ({self.seconds:.1f}s)")
        if self.note:
            found.append(self.note)
        return found


def without_validation() -> RunAnalysis:
    """A run with no validation split has nothing to fit a temperature on or to draw from."""
    return RunAnalysis(note="no validation split: no temperature fitted (1.0: predict shows the raw softmax), "
                            "no top losses or reliability diagram")


def analyse_best(collector: AnswerCollector, confusion: ConfusionMatrix, samples: Sequence[tuple[str, int]],
                 classes: Sequence[str], img_size: int, run_dir: Path, ctx: Ranks) -> RunAnalysis | None:
    """Temperature, calibration, most-confused pairs and the two pictures of the best weights.

    ``collector`` rode along the pass over ``samples`` (the validation split) that produced
    ``confusion``. Called on every rank; returns the analysis on rank 0 and None elsewhere. Its
    ``seconds`` are this call's; the caller adds the rewrite of best.pt."""
    started = time.perf_counter()
    answers = collector.answers(samples, classes, ctx)  # a collective under DDP
    if not ctx.is_main:
        return None
    analysis = RunAnalysis(most_confused=most_confused(confusion.matrix, classes))
    if len(answers):
        analysis.calibration = calibrate(answers.logits, answers.targets)
        analysis.temperature = analysis.calibration.temperature
        _draw(analysis, answers, img_size, run_dir)
    else:
        analysis.note = "no validation image was scored: no temperature fitted (1.0)"
    analysis.seconds = time.perf_counter() - started
    return analysis


def _draw(analysis: RunAnalysis, answers: Answers, img_size: int, run_dir: Path) -> None:
    from cnntrain.analysis.pictures import plot_reliability, plot_top_losses

    t = analysis.temperature
    plot_reliability([("raw softmax", reliability(answers.probs(), answers.targets)),
                      (f"temperature {t:.3g}", reliability(answers.probs(t), answers.targets))],
                     run_dir / RELIABILITY_PNG, what=f"best weights on {len(answers)} validation images")
    analysis.pictures.append(RELIABILITY_PNG)
    if answers.paths is None:
        analysis.note = ("top_losses.png: left out, as the validation outputs could not be tied to their files "
                         "(images dropped on the way); `cnntrain eval --top-losses FILE` draws it")
        return
    analysis.top_losses = top_losses(answers, temperature=t)
    plot_top_losses(analysis.top_losses, img_size, run_dir / TOP_LOSSES_PNG, scored=len(answers), temperature=t)
    analysis.pictures.insert(0, TOP_LOSSES_PNG)
