"""Which answers were wrong: the most-confused class pairs, every misclassified file, the worst losses.

fastai's ``most_confused`` and ``plot_top_losses`` are the model for the first and the last: the
off-diagonal cells of the confusion matrix, largest first, say which classes the model mixes
up; the images with the highest loss (the lowest probability given to their true class) are
where to look first for a label error, a bad crop or a class that needs more examples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from cnntrain.analysis.answers import Answers

MOST_CONFUSED = 10  # pairs listed in summary.json and eval's report
TOP_LOSSES = 16  # images in top_losses.png: a 4 x 4 grid


@dataclass(frozen=True)
class ConfusedPair:
    true: str
    predicted: str
    count: int

    def as_dict(self) -> dict[str, str | int]:
        return asdict(self)


def most_confused(matrix: torch.Tensor | Sequence[Sequence[int]], classes: Sequence[str],
                  limit: int | None = MOST_CONFUSED) -> list[ConfusedPair]:
    """The off-diagonal cells of a (true x predicted) count matrix with a count, largest first.

    Ties keep the matrix's order (true class, then predicted class), so the list is the same
    on every run; ``limit=None`` lists every pair."""
    counts = torch.as_tensor(matrix, dtype=torch.int64).cpu()
    n = counts.shape[0]
    if counts.shape != (n, n) or len(classes) != n:
        raise ValueError(f"{len(classes)} class names for a confusion matrix of shape {tuple(counts.shape)}")
    cells = [(int(counts[i, j]), i, j) for i in range(n) for j in range(n) if i != j and counts[i, j] > 0]
    cells.sort(key=lambda cell: (-cell[0], cell[1], cell[2]))
    return [ConfusedPair(classes[i], classes[j], count) for count, i, j in cells[:limit]]


@dataclass(frozen=True)
class Mistake:
    """One image and what the model said about it (probabilities after the temperature used)."""

    path: str
    true: str
    predicted: str
    prob: float  # of the predicted class
    true_prob: float  # of the true class: near 0 on a confident mistake, often a label error
    loss: float  # -log(true_prob), the cross-entropy the image contributes

    def as_dict(self) -> dict[str, str | float]:
        return asdict(self)


def _mistake(answers: Answers, probs: torch.Tensor, losses: torch.Tensor, i: int) -> Mistake:
    assert answers.paths is not None
    target, predicted = int(answers.targets[i]), int(probs[i].argmax())
    return Mistake(path=answers.paths[i], true=answers.classes[target], predicted=answers.classes[predicted],
                   prob=float(probs[i, predicted]), true_prob=float(probs[i, target]), loss=float(losses[i]))


def misclassified(answers: Answers, temperature: float = 1.0) -> list[Mistake]:
    """Every image whose top answer is not its class, the most confident mistakes first."""
    probs, losses = answers.probs(temperature), answers.losses(temperature)
    wrong = (probs.argmax(1) != answers.targets).nonzero().flatten()
    order = wrong[losses[wrong].argsort(descending=True, stable=True)]
    return [_mistake(answers, probs, losses, int(i)) for i in order]


def top_losses(answers: Answers, k: int = TOP_LOSSES, temperature: float = 1.0) -> list[Mistake]:
    """The ``k`` images with the highest loss, highest first; right answers too when fewer than
    ``k`` are wrong (a right answer given little confidence is worth a look as well)."""
    probs, losses = answers.probs(temperature), answers.losses(temperature)
    order = losses.argsort(descending=True, stable=True)[:k]
    return [_mistake(answers, probs, losses, int(i)) for i in order]


def errors_csv(mistakes: Sequence[Mistake]) -> str:
    """``eval --errors``: one line per misclassified file (path, true, predicted, prob, true_prob, loss)."""
    from cnntrain.rows import to_csv

    return to_csv([{**m.as_dict(), "prob": f"{m.prob:.6f}", "true_prob": f"{m.true_prob:.6f}",
                    "loss": f"{m.loss:.6f}"} for m in mistakes],
                  columns=("path", "true", "predicted", "prob", "true_prob", "loss"))
