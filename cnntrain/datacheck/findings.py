"""What check-data finds in a dataset's splits, as types: counts, sizes, unreadable files, matches.

A :class:`Match` is two images that are the same picture: byte-identical (``exact``, equal
content hashes) or nearly (``near``: within ``near_threshold`` bits of each other on the
128-bit concatenation of pHash and dHash, and of the same colours, see
:mod:`cnntrain.datacheck.hashing`). Every
problem is a view of the matches: a *duplicate* pairs two images of one split, a *leak* pairs
a training image with a validation one (it inflates validation accuracy), and a *label
conflict* pairs two images of different classes (one of the labels is wrong). A match can be
a leak and a conflict at once.

Byte-identical files form groups; a group of k files gives k - 1 matches, each member with
the group's first (training images first, then by path), so every copy is listed once, every
validation copy of a training image is a leak, and a group of a thousand blank images stays a
thousand lines. The near search compares one file per group, so a near copy of a file that
was copied three times is one match, not three.

Why both hashes: pHash alone puts some unrelated pairs within 10 bits of each other on
photo-like data, where a pair that is unrelated under one hash rarely is under the other; the
sum of the two distances separates copies from unrelated images better than either does (the
measurements behind ``NEAR_THRESHOLD`` are in the README; ``scripts/bench_check_data.py --plant``
repeats them). Matches are listed surest first: exact ones, then near ones by distance.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cnntrain.data import DatasetSplits, scan_samples
from cnntrain.datacheck import NEAR_THRESHOLD
from cnntrain.datacheck.hashing import FileHashes, Picture, hash_files
from cnntrain.errors import UsageError

SPLITS = ("train", "val")
SIGNATURE_BITS = 128
#: Largest mean difference, in levels of 255, between two near-duplicates' 4x4 colour thumbnails.
#: Resized, re-encoded and cropped copies (even 10% off one side) stayed within 8; the look-alikes
#: the grey hashes match (one shape or flower at the same place in other colours) lay above 30,
#: bar 1 of 1,194 pairs in the built-in shapes dataset. A copy whose colours were changed
#: (greyscale, strong grading) is not found.
COLOUR_LIMIT = 12
_BLOCK = 512  # rows of the all-pairs distance matrix computed at once (512 x N bytes)


@dataclass(frozen=True)
class ImageRef:
    """One image of the dataset: its file, its split and its class name."""

    path: str
    split: str
    label: str

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "split": self.split, "class": self.label}


def _order(ref: ImageRef) -> tuple[int, str]:
    return SPLITS.index(ref.split), ref.path


@dataclass(frozen=True)
class Match:
    """Two images that are the same picture; ``a`` comes first (train before val, then by path)."""

    a: ImageRef
    b: ImageRef
    distance: int  # bits apart on the perceptual hashes; 0 for an exact match
    exact: bool

    @property
    def kind(self) -> str:
        return "exact" if self.exact else "near"

    @property
    def cross_split(self) -> bool:
        return self.a.split != self.b.split

    @property
    def conflict(self) -> bool:
        return self.a.label != self.b.label

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "distance": self.distance, "a": self.a.to_dict(), "b": self.b.to_dict()}


def _match(x: ImageRef, y: ImageRef, distance: int, exact: bool) -> Match:
    a, b = sorted((x, y), key=_order)
    return Match(a, b, distance, exact)


@dataclass(frozen=True)
class Spread:
    """Smallest, median and largest of a set of numbers."""

    low: float
    median: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread | None:
        return cls(min(values), statistics.median(values), max(values)) if values else None

    def to_dict(self) -> dict[str, float]:
        return {"min": self.low, "median": self.median, "max": self.high}


@dataclass(frozen=True)
class SplitStats:
    """One split: readable images per class (every class listed) and their sizes in pixels."""

    name: str
    per_class: dict[str, int]
    width: Spread | None
    height: Spread | None
    aspect: Spread | None  # width / height

    @property
    def images(self) -> int:
        return sum(self.per_class.values())

    def to_dict(self) -> dict[str, Any]:
        spread = {k: s.to_dict() if s else None for k, s in (("width", self.width), ("height", self.height),
                                                                ("aspect", self.aspect))}
        return {"images": self.images, "per_class": self.per_class, **spread}


@dataclass(frozen=True)
class Unreadable:
    path: str
    split: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "split": self.split, "reason": self.reason}


@dataclass
class DataCheck:
    """Everything check-data found; ``near_threshold`` None: near-duplicates were not searched."""

    description: str
    root: str
    classes: list[str]
    splits: list[SplitStats]
    unreadable: list[Unreadable]
    matches: list[Match]
    near_threshold: int | None
    seconds: float = field(default=0.0, compare=False)

    @property
    def duplicates(self) -> list[Match]:
        return [m for m in self.matches if not m.cross_split]

    @property
    def leaks(self) -> list[Match]:
        return [m for m in self.matches if m.cross_split]

    @property
    def conflicts(self) -> list[Match]:
        return [m for m in self.matches if m.conflict]

    @property
    def found(self) -> bool:
        """Anything a ``--strict`` run fails on: an unreadable file or a match of any kind."""
        return bool(self.unreadable or self.matches)

    def counts(self) -> dict[str, int]:
        kinds = {"exact": [m for m in self.matches if m.exact], "near": [m for m in self.matches if not m.exact]}
        counts = {"unreadable": len(self.unreadable)}
        for kind, matches in kinds.items():
            counts[f"{kind}_duplicates"] = sum(not m.cross_split for m in matches)
            counts[f"{kind}_leaks"] = sum(m.cross_split for m in matches)
            counts[f"{kind}_conflicts"] = sum(m.conflict for m in matches)
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.description, "root": self.root, "classes": self.classes,
            "splits": {s.name: s.to_dict() for s in self.splits},
            "near_checked": self.near_threshold is not None, "near_threshold": self.near_threshold,
            "counts": self.counts(), "found": self.found,
            "unreadable": [u.to_dict() for u in self.unreadable],
            "duplicates": [m.to_dict() for m in self.duplicates],
            "leaks": [m.to_dict() for m in self.leaks],
            "conflicts": [m.to_dict() for m in self.conflicts],
            "seconds": round(self.seconds, 3),
        }


def exact_matches(refs: Sequence[ImageRef], content: Mapping[str, str]) -> list[Match]:
    """Byte-identical images: each member of a group of equal content hashes with the group's first."""
    groups: dict[str, list[ImageRef]] = {}
    for ref in refs:
        groups.setdefault(content[ref.path], []).append(ref)
    matches = []
    for members in groups.values():
        first, *rest = sorted(members, key=_order)
        matches += [Match(first, other, 0, exact=True) for other in rest]
    return matches


def signatures(pictures: Sequence[Picture]) -> np.ndarray:
    """``N x 2`` uint64: pHash and dHash of each picture, the 128 bits the near search compares."""
    return np.array([[int(p.phash or "0", 16), int(p.dhash or "0", 16)] for p in pictures],
                    dtype=np.uint64).reshape(-1, 2)


def _popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 (numpy >= 2 has it built in; older ones count bytes by table)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
    return table[x.view(np.uint8)].reshape(*x.shape, 8).sum(axis=-1, dtype=np.uint8)


def near_pairs(sig: np.ndarray, threshold: int) -> list[tuple[int, int, int]]:
    """Every ``(i, j, distance)`` with i < j whose signatures differ in at most ``threshold`` bits.

    All pairs, compared blockwise with numpy: quadratic, but 10,000 images are 50 million
    comparisons of two machine words, about a second. (An index such as a BK-tree pays off
    only far beyond the folders this command is for.)"""
    found: list[tuple[int, int, int]] = []
    for start in range(0, len(sig), _BLOCK):
        rows, rest = sig[start:start + _BLOCK], sig[start:]
        distance = np.zeros((len(rows), len(rest)), dtype=np.uint8)
        for word in range(sig.shape[1]):
            distance += _popcount(rows[:, None, word] ^ rest[None, :, word])
        i, j = np.nonzero(distance <= threshold)
        keep = j > i  # the upper triangle: each pair once, no image with itself
        found += [(start + int(a), start + int(b), int(distance[a, b])) for a, b in zip(i[keep], j[keep])]
    return found


def colour_distances(pictures: Sequence[Picture], pairs: Sequence[tuple[int, int, int]]) -> np.ndarray:
    """Mean absolute difference, in levels of 255, between the colour thumbnails of each pair."""
    if not pairs:
        return np.zeros(0)
    thumbs = np.array([np.frombuffer(p.thumbnail(), dtype=np.uint8) for p in pictures], dtype=np.int16)
    i, j = np.array([(a, b) for a, b, _ in pairs]).T
    return np.abs(thumbs[i] - thumbs[j]).mean(axis=1)


def near_matches(refs: Sequence[ImageRef], pictures: Mapping[str, Picture], content: Mapping[str, str],
                 threshold: int) -> list[Match]:
    """Nearly identical images that are not byte-identical, one file per group of equal bytes:
    within ``threshold`` bits on the perceptual hashes, and within :data:`COLOUR_LIMIT` in colour."""
    firsts: dict[str, ImageRef] = {}
    for ref in sorted(refs, key=_order):
        if ref.path in pictures:
            firsts.setdefault(content[ref.path], ref)
    reps = list(firsts.values())
    shown = [pictures[r.path] for r in reps]
    pairs = near_pairs(signatures(shown), threshold)
    alike = colour_distances(shown, pairs) <= COLOUR_LIMIT
    return [_match(reps[i], reps[j], d, exact=False) for (i, j, d), keep in zip(pairs, alike) if keep]


def _split_stats(name: str, refs: Sequence[ImageRef], classes: Sequence[str],
                 pictures: Mapping[str, Picture]) -> SplitStats:
    per_class = dict.fromkeys(classes, 0)
    for ref in refs:
        per_class[ref.label] += 1
    sizes = [pictures[r.path] for r in refs if r.path in pictures]
    return SplitStats(name, per_class, Spread.of([p.width for p in sizes]), Spread.of([p.height for p in sizes]),
                      Spread.of([p.width / p.height for p in sizes]))


def check_threshold(threshold: int) -> int:
    if isinstance(threshold, bool) or not isinstance(threshold, int) or not 0 <= threshold < SIGNATURE_BITS:
        raise UsageError(f"--near-threshold must be a whole number of bits from 0 to {SIGNATURE_BITS - 1}, "
                         f"not {threshold!r}; the default {NEAR_THRESHOLD} finds resized, re-encoded and slightly "
                         "cropped copies")
    return threshold


def _refs(splits: DatasetSplits) -> list[ImageRef]:
    return [ImageRef(path, name, splits.classes[label])
            for name, samples in zip(SPLITS, (splits.train, splits.val)) for path, label in samples]


def check_data(splits: DatasetSplits, *, near_threshold: int = NEAR_THRESHOLD, workers: int | None = None,
               progress: bool = False) -> DataCheck:
    """Check ``splits`` as training would use them: the scan's verdicts (cached, shared with
    ``train``), then hashes of the readable files (cached), then the matches between them."""
    check_threshold(near_threshold)
    start = time.perf_counter()
    refs = _refs(splits)
    scan = scan_samples([(r.path, 0) for r in refs], workers=workers, progress=progress)
    bad = dict(scan.bad)
    hashes: FileHashes = hash_files([r.path for r in refs if r.path not in bad], pictures=True, workers=workers,
                                    progress=progress)
    bad.update(hashes.failed)
    unreadable = [Unreadable(r.path, r.split, bad[r.path]) for r in refs if r.path in bad]
    readable = [r for r in refs if r.path not in bad]
    matches = exact_matches(readable, hashes.content)
    if hashes.perceptual:
        matches += near_matches(readable, hashes.pictures, hashes.content, near_threshold)
    stats = [_split_stats(name, [r for r in readable if r.split == name], splits.classes, hashes.pictures)
             for name in SPLITS]
    return DataCheck(splits.description, str(splits.root), list(splits.classes), stats, unreadable,
                     sorted(matches, key=lambda m: (not m.exact, m.distance, _order(m.a), _order(m.b))),
                     near_threshold if hashes.perceptual else None, time.perf_counter() - start)


def exact_leaks(splits: DatasetSplits) -> list[Match]:
    """Validation images byte-identical to a training image: content hashes only (cached), no decode."""
    if not splits.val:
        return []
    refs = _refs(splits)
    hashes = hash_files([r.path for r in refs])
    return [m for m in exact_matches([r for r in refs if r.path in hashes.content], hashes.content)
            if m.cross_split]


def leak_line(splits: DatasetSplits, leaks: Sequence[Match] | None = None) -> str | None:
    """The one-line warning ``train`` prints before its first epoch when val leaks into train, or None;
    ``leaks``: :func:`exact_leaks` of ``splits`` when the caller has them already."""
    leaks = exact_leaks(splits) if leaks is None else leaks
    if not leaks:
        return None
    copies = len({m.b.path for m in leaks})
    are = "is an exact copy of a training image" if copies == 1 else "are exact copies of training images"
    return (f"warning: {copies:,} of {len(splits.val):,} validation images {are} (train/val leakage inflates val "
            "accuracy); `cnntrain check-data` with the same data options lists them")

