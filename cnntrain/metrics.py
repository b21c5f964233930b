"""Classification metrics: top-k, confusion matrix, per-class precision/recall/F1.

Everything here is a plain function or a small accumulator over torch tensors, with no globals,
so the engine can use it per batch, the trainer can sum it across ranks (the state is exposed
as plain numbers and one int64 tensor) and tests can check it on hand-computed examples.
Undefined ratios (no samples, a class never predicted) are 0.0, never NaN, so results can be
written as strict JSON and compared without special cases.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

__all__ = [
    "ConfusionMatrix",
    "classification_report",
    "topk_correct",
    "topk_hits",
]


def topk_correct(logits: Tensor, targets: Tensor, ks: Iterable[int] = (1, 5)) -> dict[int, int]:
    """Number of samples whose target is among the ``k`` highest logits, for each ``k`` in ``ks``.

    ``k`` above the class count is clamped (top-5 of 3 classes counts every sample), so one
    call serves any dataset. Counts rather than ratios, so batches and ranks can be summed.
    """
    ks = tuple(int(k) for k in ks)
    return dict(zip(ks, topk_hits(logits, targets, ks).tolist()))


def topk_hits(logits: Tensor, targets: Tensor, ks: Iterable[int] = (1, 5)) -> Tensor:
    """:func:`topk_correct`'s counts as an int64 tensor on the logits' device, in the order of
    ``ks``: summed over batches there, they are read back once per pass instead of every batch."""
    ks = tuple(int(k) for k in ks)
    if any(k < 1 for k in ks):
        raise ValueError(f"top-k needs k >= 1, got {ks}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be (batch, classes), got shape {tuple(logits.shape)}")
    targets = targets.reshape(-1)
    if targets.numel() != logits.shape[0]:
        raise ValueError(f"{logits.shape[0]} logits rows but {targets.numel()} targets")
    if not ks or logits.shape[0] == 0:
        return torch.zeros(len(ks), dtype=torch.int64, device=logits.device)
    num_classes = logits.shape[1]
    maxk = min(max(ks), num_classes)
    top = logits.topk(maxk, dim=1).indices  # (batch, maxk), best first
    hit = top.eq(targets.to(top.device).unsqueeze(1))  # at most one True per row
    # Cumulative hits: hit_by_rank[:, j] says "target within the best j+1".
    hit_by_rank = hit.cumsum(dim=1).sum(dim=0)
    return torch.stack([hit_by_rank[min(k, num_classes) - 1] for k in ks])  # (no host copy of an index)


class ConfusionMatrix:
    """Counts of (true class, predicted class) pairs, accumulated over batches.

    ``matrix[i, j]`` is the number of samples of class ``i`` predicted as ``j``. The state is
    the one int64 tensor ``matrix``, so summing across processes is
    ``torch.distributed.all_reduce(cm.matrix)``; create it on the device the predictions live
    on to keep updates free of host copies.
    """

    def __init__(self, num_classes: int, device: torch.device | str | None = None) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.matrix = torch.zeros((self.num_classes, self.num_classes), dtype=torch.int64, device=device)

    @classmethod
    def from_matrix(cls, matrix: Tensor | Sequence[Sequence[int]]) -> ConfusionMatrix:
        """Rebuild from saved counts (e.g. a JSON list of lists)."""
        counts = torch.as_tensor(matrix, dtype=torch.int64)
        if counts.dim() != 2 or counts.shape[0] != counts.shape[1]:
            raise ValueError(f"a confusion matrix must be square, got shape {tuple(counts.shape)}")
        cm = cls(counts.shape[0], device=counts.device)
        cm.matrix += counts
        return cm

    def update(self, preds: Tensor, targets: Tensor) -> None:
        """Add one batch. ``preds`` are class indices, or (batch, classes) logits (argmax is taken).

        Targets outside ``[0, num_classes)`` (e.g. an ignore index of -100) are skipped;
        a prediction outside that range is a bug upstream and raises ``ValueError``.
        """
        n = self.num_classes
        targets = targets.reshape(-1)
        if preds.dim() == 2 and preds.shape[0] == targets.numel() and preds.is_floating_point():
            preds = preds.argmax(dim=1)
        preds = preds.reshape(-1)
        if preds.numel() != targets.numel():
            raise ValueError(f"{preds.numel()} predictions but {targets.numel()} targets")
        preds = preds.to(device=self.matrix.device, dtype=torch.int64)
        targets = targets.to(device=self.matrix.device, dtype=torch.int64)
        keep = (targets >= 0) & (targets < n)
        preds, targets = preds[keep], targets[keep]
        if preds.numel() and (int(preds.min()) < 0 or int(preds.max()) >= n):
            raise ValueError(f"prediction outside 0..{n - 1}: got {int(preds.min())}..{int(preds.max())}")
        counts = torch.bincount(targets * n + preds, minlength=n * n)
        self.matrix += counts.reshape(n, n)

    def merge(self, other: ConfusionMatrix) -> None:
        """Add another matrix's counts (same class count), e.g. from another shard."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes} classes into {self.num_classes}")
        self.matrix += other.matrix.to(self.matrix.device)

    def reset(self) -> None:
        self.matrix.zero_()

    @property
    def total(self) -> int:
        return int(self.matrix.sum())

    def accuracy(self) -> float:
        """Fraction of samples on the diagonal; 0.0 when empty."""
        total = self.total
        return float(self.matrix.diagonal().sum()) / total if total else 0.0

    def per_class(self) -> list[dict[str, float | int]]:
        """Precision, recall, F1 and support (true count) per class, in class-index order.

        A class never predicted has precision 0.0 and one never present has recall 0.0
        (sklearn's ``zero_division=0``), so averages stay finite.
        """
        m = self.matrix.detach().to("cpu", torch.float64)
        tp = m.diagonal()
        predicted = m.sum(dim=0)
        support = m.sum(dim=1)
        precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
        recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
        denom = precision + recall
        f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), torch.zeros_like(tp))
        return [
            {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i in range(self.num_classes)
        ]

    def macro_f1(self) -> float:
        """Unweighted mean F1 over the classes that occur as a target or a prediction.

        Classes absent from both (e.g. a 1000-class head evaluated on a subset) would add
        meaningless zeros, so they are left out, as sklearn does without ``labels=``.
        """
        m = self.matrix
        seen = ((m.sum(dim=0) + m.sum(dim=1)) > 0).tolist()
        f1s = [row["f1"] for row, s in zip(self.per_class(), seen) if s]
        return sum(f1s) / len(f1s) if f1s else 0.0

    def scores(self) -> dict[str, float]:
        """Accuracy, balanced accuracy and macro-F1, the last two over the classes that have samples.

        On imbalanced data accuracy rewards predicting the big class; balanced accuracy (the mean
        recall per class) and macro-F1 weigh every class alike, so the three are read together."""
        rows = [row for row in self.per_class() if row["support"]]
        return {
            "acc": self.accuracy(),
            "balanced_acc": sum(float(r["recall"]) for r in rows) / len(rows) if rows else 0.0,
            "macro_f1": sum(float(r["f1"]) for r in rows) / len(rows) if rows else 0.0,
        }

    def __repr__(self) -> str:
        return f"ConfusionMatrix(num_classes={self.num_classes}, total={self.total})"


def classification_report(
    cm: ConfusionMatrix, classes: Sequence[str], averages: bool = False
) -> list[dict[str, str | float | int]]:
    """One row per class: ``class``, ``precision``, ``recall``, ``f1``, ``support``.

    Rows are plain dicts so ``cnntrain eval`` can print them as a table or dump them as JSON.
    With ``averages`` two more rows follow, ``macro avg`` and ``weighted avg`` (by support),
    over the classes that have a support.
    """
    if len(classes) != cm.num_classes:
        raise ValueError(f"{len(classes)} class names for a {cm.num_classes}-class confusion matrix")
    rows: list[dict[str, str | float | int]] = [
        {"class": str(name), **stats} for name, stats in zip(classes, cm.per_class())
    ]
    if averages:
        present = [r for r in rows if r["support"]]
        total = sum(int(r["support"]) for r in present)
        for label, weight in (("macro avg", lambda r: 1.0), ("weighted avg", lambda r: float(r["support"]))):
            norm = sum(weight(r) for r in present)
            avg = {
                key: (sum(weight(r) * float(r[key]) for r in present) / norm if norm else 0.0)
                for key in ("precision", "recall", "f1")
            }
            rows.append({"class": label, **avg, "support": total})
    return rows
