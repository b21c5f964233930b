"""How far to trust a probability: expected calibration error, reliability bins, temperature scaling.

A network trained with cross-entropy is usually over-confident: of the images it calls 90%
sure, fewer than 90% are right. Temperature scaling (Guo et al., 2017, "On Calibration of Modern
Neural Networks") divides every logit by one scalar ``T`` fitted on held-out images to minimise
their negative log-likelihood. Dividing by a positive number keeps each row's ranking, so top-1,
top-5 and the confusion matrix are unchanged; only the confidences move. Finding ``T`` is
a one-dimensional convex problem in ``1 / T`` (:func:`fit_temperature`), solved here rather than
with a library: the maintained calibration packages (netcal, torchcal) bring far more than one
scalar needs.

The expected calibration error (ECE) is the usual equal-width binning of the top probability:
``sum_b |B_b| / N * |accuracy(B_b) - confidence(B_b)|``, 15 bins by default as in Guo et al.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

ECE_BINS = 15
# The fitted temperature is kept within these bounds: on a validation split with no mistake the
# likelihood keeps rising as T -> 0 (every answer made certain), which no test image justifies.
T_MIN, T_MAX = 0.05, 20.0
#: min-confidence thresholds at which eval shows how many answers are kept and how many of those are right.
COVERAGE_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


@dataclass(frozen=True)
class ReliabilityBins:
    """Per confidence bin ``(k/bins, (k+1)/bins]``: images, mean top probability and accuracy
    (NaN for an empty bin); what a reliability diagram draws."""

    counts: list[int]
    confidence: list[float]
    accuracy: list[float]

    @property
    def bins(self) -> int:
        return len(self.counts)

    @property
    def ece(self) -> float:
        total = sum(self.counts)
        if not total:
            return math.nan
        return sum(n / total * abs(a - c) for n, a, c in zip(self.counts, self.accuracy, self.confidence) if n)


@dataclass(frozen=True)
class Calibration:
    """A temperature fitted on ``images`` held-out images, with what it changed there."""

    temperature: float
    images: int
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float
    bins: int = ECE_BINS

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def stored_temperature(saved: dict[str, Any]) -> float | None:
    """The temperature in a checkpoint (or an export's sidecar): None for one made before
    calibration, or by a run without a validation split; its scores are the raw softmax."""
    value = saved.get("temperature")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) and value > 0 else None


def reliability(probs: torch.Tensor, targets: torch.Tensor, bins: int = ECE_BINS) -> ReliabilityBins:
    """Bin the top probability of each row of ``probs`` (N x classes) against whether it was right."""
    confidence, predicted = probs.float().max(dim=1)
    correct = (predicted == targets.to(predicted.device)).double()
    # Bin k holds (k/bins, (k+1)/bins]: bucketize with right=False puts x <= edge in the lower bin.
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)[1:-1].to(confidence.device)
    index = torch.bucketize(confidence.double(), edges)
    counts = torch.bincount(index, minlength=bins).tolist()
    conf_sum = torch.zeros(bins, dtype=torch.float64, device=index.device).index_add_(0, index, confidence.double())
    hit_sum = torch.zeros(bins, dtype=torch.float64, device=index.device).index_add_(0, index, correct)
    return ReliabilityBins(counts=[int(n) for n in counts],
                           confidence=[c / n if n else math.nan for c, n in zip(conf_sum.tolist(), counts)],
                           accuracy=[h / n if n else math.nan for h, n in zip(hit_sum.tolist(), counts)])


def expected_calibration_error(probs: torch.Tensor, targets: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE of the top probability over ``bins`` equal-width bins (NaN for no images)."""
    return reliability(probs, targets, bins).ece


def nll(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``logits / temperature``."""
    if not len(targets):
        return math.nan
    return float(F.cross_entropy(logits.double() / temperature, targets))


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, max_iter: int = 100) -> float:
    """The ``T`` minimising the NLL of ``logits / T`` on these labelled samples (1.0 for none).

    Solved in ``b = 1 / T``, where the NLL is convex (a mean of log-sum-exps of linear functions
    of ``b``, less a linear term): its slope, the mean over samples of ``E_p[z] - z_true``, only
    rises, so its one root is the minimum, found by Newton's method (the second derivative is the
    mean variance of the logits under the softmax) kept inside a shrinking bracket, with a
    geometric bisection whenever a step would leave it. Exact to float64 in a few steps, with no
    optimiser object (torch's first ``Optimizer.step`` imports torch._dynamo, seconds on a small
    CPU). The result lies in [T_MIN, T_MAX], and is 1 when no T lowers the NLL at all (e.g.
    constant logits)."""
    if not len(targets):
        return 1.0
    z = logits.detach().double().cpu()
    true = z.gather(1, targets.detach().cpu().long().unsqueeze(1)).squeeze(1)

    def slope(b: float) -> tuple[float, float]:
        p = (b * z).softmax(dim=1)
        mean = (p * z).sum(dim=1)
        return float((mean - true).mean()), float(((p * z * z).sum(dim=1) - mean * mean).mean())

    lo, hi = 1 / T_MAX, 1 / T_MIN
    if slope(lo)[0] >= 0:  # the NLL rises from the smallest b on: the largest T allowed
        b = lo
    elif slope(hi)[0] <= 0:  # still falling at the largest b (e.g. no mistake to pay for): the smallest T
        b = hi
    else:
        b = 1.0
        for _ in range(max_iter):
            g, h = slope(b)
            if g == 0:
                break
            lo, hi = (lo, b) if g > 0 else (b, hi)
            step = b - g / h if h > 0 else math.nan
            if step == b or hi - lo <= 1e-12 * b:  # converged to float precision
                break
            b = step if lo < step < hi else math.sqrt(lo * hi)
    found = 1 / b
    return found if nll(z, targets, found) < nll(z, targets, 1.0) else 1.0


def calibrate(logits: torch.Tensor, targets: torch.Tensor, bins: int = ECE_BINS) -> Calibration:
    """Fit a temperature on these samples and measure ECE and NLL before and after it.

    The "after" figures are on the very samples the temperature was fitted on, so they are the
    best case; ``cnntrain eval`` on another split measures the temperature out of sample."""
    temperature = fit_temperature(logits, targets)
    return Calibration(
        temperature=temperature, images=len(targets), bins=bins,
        ece_before=expected_calibration_error(logits.float().softmax(1), targets, bins),
        ece_after=expected_calibration_error((logits.float() / temperature).softmax(1), targets, bins),
        nll_before=nll(logits, targets), nll_after=nll(logits, targets, temperature))


@dataclass(frozen=True)
class Coverage:
    """With ``predict --min-confidence threshold``: the share of images still answered and how
    many of those answers are right (NaN when none is answered)."""

    threshold: float
    answered: float
    accuracy: float
    wrong_kept: int  # wrong answers that still clear the threshold


def coverage(probs: torch.Tensor, targets: torch.Tensor,
             thresholds: Sequence[float] = COVERAGE_THRESHOLDS) -> list[Coverage]:
    """Answers kept and their accuracy at each threshold: the table to choose ``--min-confidence`` from."""
    confidence, predicted = probs.float().max(dim=1)
    correct = predicted == targets.to(predicted.device)
    rows = []
    for p in thresholds:
        kept = confidence >= p
        n = int(kept.sum())
        rows.append(Coverage(threshold=float(p), answered=n / len(targets) if len(targets) else math.nan,
                             accuracy=float(correct[kept].double().mean()) if n else math.nan,
                             wrong_kept=int((kept & ~correct).sum())))
    return rows
