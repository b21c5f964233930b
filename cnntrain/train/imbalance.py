"""Class imbalance: how skewed the training split is, and the two answers to it.

Users' own folders are rarely balanced (400 photos of one class, 25 of another). A model trained
on them learns the prior as much as the classes. Two remedies, either or both:

- ``--class-weights``: each class's share of the loss scaled, ``auto`` by inverse frequency;
- ``--sampler balanced``: each epoch draws classes equally often (with replacement), the way
  ``WeightedRandomSampler`` does, but seeded per (seed, epoch) like every other draw here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

from cnntrain.errors import UsageError

#: ``--class-weights auto`` never weighs a class more than this many times the average class:
#: a class of 3 images among classes of 300 would otherwise dominate every step.
AUTO_CAP = 10.0
#: Above this ratio of the largest to the smallest class, the start-up summary names the remedies.
IMBALANCE_HINT_RATIO = 3.0


def class_counts(labels: Sequence[int], num_classes: int) -> list[int]:
    counted = Counter(labels)
    return [counted.get(c, 0) for c in range(num_classes)]


def auto_weights(counts: Sequence[int]) -> list[float]:
    """Inverse class frequency, normalised to mean 1 over the classes present, capped at ``AUTO_CAP``."""
    present = [n for n in counts if n > 0]
    if not present:
        return [1.0] * len(counts)
    inverse = [1.0 / n if n > 0 else 0.0 for n in counts]
    mean = sum(inverse) / len(present)
    return [min(w / mean, AUTO_CAP) if w else 0.0 for w in inverse]


def weights_from_file(path: str | Path, classes: Sequence[str]) -> list[float]:
    """A YAML or JSON mapping of class name -> weight that names every class, and no other."""
    import yaml  # JSON is YAML, so one reader takes both

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UsageError(f"--class-weights {path}: cannot read it as YAML or JSON ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise UsageError(f"--class-weights {path} must map each class name to a weight, e.g. {{daisy: 2.0}}")
    data = {str(k): v for k, v in data.items()}
    missing = [c for c in classes if c not in data]
    unknown = sorted(set(data) - set(classes))
    if missing or unknown:
        what = (f"no weight for {', '.join(missing)}" if missing else "") + ("; " if missing and unknown else "") + (
            f"not a class of this data: {', '.join(unknown)}" if unknown else "")
        raise UsageError(f"--class-weights {path}: {what} (the classes are {', '.join(classes)})")
    bad = [c for c in classes if isinstance(data[c], bool) or not isinstance(data[c], (int, float)) or data[c] < 0]
    if bad:
        raise UsageError(f"--class-weights {path}: the weight of {bad[0]} must be a number >= 0, not {data[bad[0]]!r}")
    return [float(data[c]) for c in classes]


def class_weights(spec: str, classes: Sequence[str], counts: Sequence[int]) -> torch.Tensor | None:
    """The loss's per-class weights for ``--class-weights spec`` (None: unweighted)."""
    if spec == "none":
        return None
    values = auto_weights(counts) if spec == "auto" else weights_from_file(spec, classes)
    return torch.tensor(values, dtype=torch.float32)


def describe_weights(weights: torch.Tensor, classes: Sequence[str], spec: str, limit: int = 6) -> str:
    shown = ", ".join(f"{c} {w:.2f}" for c, w in list(zip(classes, weights.tolist()))[:limit])
    more = f", ... ({len(classes) - limit} more)" if len(classes) > limit else ""
    source = f"auto: inverse class frequency, mean 1, capped at {AUTO_CAP:g}" if spec == "auto" else spec
    return f"class weights ({source}): {shown}{more}"


def imbalance_line(counts: Sequence[int], classes: Sequence[str]) -> str | None:
    """``imbalance: daisy 400 / tulips 25 = 16.0x ...``; None when there is nothing to compare."""
    present = [(n, c) for n, c in zip(counts, classes) if n > 0]
    if len(present) < 2:
        return None
    (most, big), (least, small) = max(present), min(present)
    ratio = most / least
    line = f"imbalance: largest class {big} ({most:,}) / smallest {small} ({least:,}) = {ratio:.1f}x"
    if ratio > IMBALANCE_HINT_RATIO:
        line += "; consider --class-weights auto or --sampler balanced"
    return line
