"""Check every image of a dataset before training, so a bad file is reported up front, not mid-epoch.

Scraped and phone folders hold truncated JPEGs, empty files, HTML pages saved as ``.jpg`` and
formats Pillow cannot read. ``Image.verify()`` passes truncated JPEGs, so each file is fully
decoded with the same :func:`~cnntrain.data.decode.decode_image` that training uses: what the
scan accepts, training can read.

Decoding a large dataset takes a while, so results are cached per file by (absolute path,
size, mtime_ns) in ``cnntrain.paths.scan_cache_dir()/<hash of the dataset root>.json``; a second
run decodes only new or changed files. The cache also records the decoder's identity
(:func:`~cnntrain.data.decode.decoder_id`: library versions, size limits), so upgrading any of
them re-checks everything. Runs that scan one dataset at the same time share the file: each
merges its verdicts in under a lock and writes it atomically, so it stays whole and keeps both.

Training decodes every image anyway, into its decoded-image cache, so a first run would decode
each file twice: once here, once there. It passes that build as the scan's ``reader`` instead:
the scan hands it the samples (with the reasons it already knows, so known-bad files are never
opened again), takes its verdicts for the files it has none for, caches them as its own, and
decodes only what the reader could not vouch for. One pass, and still every verdict is in
before the first training step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset
from tqdm import tqdm

from cnntrain import fileio
from cnntrain.data.decode import TEXT_LIMIT, ImageDecodeError, decode_image, decoder_id
from cnntrain.data.loader import default_workers
from cnntrain.data.pool import POOL_THRESHOLD, run_in_workers
from cnntrain.errors import DataError, UsageError, first_line
from cnntrain.paths import scan_cache_dir

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
#: Files listed by :meth:`ScanResult.warning` and in a strict-mode error.
WARN_LIMIT = 20
ERROR_LIMIT = 3

#: A pass that decodes every sample anyway (training's image cache): given the samples and the
#: reasons, by index, of those already known to be unreadable (not to be opened), it returns the
#: verdicts it is sure of, by index (None: decodes; else the lasting reason it does not).
Reader = Callable[[Sequence[tuple[str, int]], Mapping[int, str]], Mapping[int, str | None]]


@dataclass
class ScanResult:
    """Samples that decode (``good``, input order kept), ``(path, reason)`` for the rest."""

    good: list[tuple[str, int]]
    bad: list[tuple[str, str]]
    cached: int = 0  # results taken from the cache instead of decoding
    seconds: float = field(default=0.0, compare=False)

    @property
    def total(self) -> int:
        return len(self.good) + len(self.bad)

    def warning(self, limit: int = WARN_LIMIT) -> str | None:
        """One message for all bad files (a count, then a line per file up to ``limit``), or None."""
        if not self.bad:
            return None
        lines = [f"skipping {len(self.bad):,} of {self.total:,} images that cannot be read "
                 "(remove or replace them to use them):"]
        lines += [f"  {first_line(path, TEXT_LIMIT)}: {reason}" for path, reason in self.bad[:limit]]
        if len(self.bad) > limit:
            lines.append(f"  ... and {len(self.bad) - limit:,} more")
        return "\n".join(lines)

    def error(self, limit: int = ERROR_LIMIT) -> str:
        """The one-line strict-mode error: a count and the first few files with reasons."""
        shown = "; ".join(f"{first_line(p, TEXT_LIMIT)} ({r})" for p, r in self.bad[:limit])
        more = f"; and {len(self.bad) - limit:,} more" if len(self.bad) > limit else ""
        return (f"{len(self.bad):,} of {self.total:,} images cannot be read: {shown}{more}; "
                "remove or replace them, or scan without strict checking to skip them")


def _cache_file(paths: Sequence[str]) -> Path:
    """``scan_cache_dir()/<hash>.json``, keyed by the folder holding every sample (the dataset root)."""
    folders = sorted({os.path.dirname(p) for p in paths})
    try:
        root = os.path.commonpath(folders)
    except ValueError:  # different drives (Windows): key by the folder list instead
        root = "\n".join(folders)
    digest = hashlib.sha256(root.encode("utf-8", "surrogateescape")).hexdigest()[:20]
    return scan_cache_dir() / f"{digest}.json"


def _load_cache(path: Path) -> dict[str, list[Any]]:
    """The cached entries, or nothing if the file is missing, damaged or from another decoder."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("version") == CACHE_VERSION and data.get("decoder") == decoder_id():
            return {k: v for k, v in data["files"].items() if isinstance(v, list) and len(v) == 3}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        pass
    return {}


def _save_cache(path: Path, entries: dict[str, list[Any]], current: set[str]) -> None:
    """Merge this scan's ``entries`` into the cache file, atomically; ``current``: the files it checked.

    The file is read again, under a lock, just before it is written: another run scanning the
    same root meanwhile (two trainings started together) may have added verdicts, and writing
    only ours would drop them. Entries of files that are gone are left out. A cache that cannot
    be written only costs time on the next run."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with fileio.exclusive_lock(path.with_name(f".{path.stem}.lock")):
            merged = {**_load_cache(path), **entries}
            merged = {k: v for k, v in merged.items() if k in current or os.path.exists(k)}
            data = {"version": CACHE_VERSION, "decoder": decoder_id(), "files": merged}
            fileio.atomic_write_text(path, json.dumps(data, separators=(",", ":")))
    except OSError as e:
        logger.debug("could not write the scan cache %s: %s", path, e)


def check_image(path: str) -> tuple[str | None, bool]:
    """``(None, True)`` if ``path`` decodes, else ``(reason, cacheable)``."""
    try:
        decode_image(path)
    except ImageDecodeError as e:
        return e.reason, not e.transient
    except DataError as e:
        return first_line(e, TEXT_LIMIT), False
    return None, True


class _Checks(Dataset):
    """Lets a DataLoader run :func:`check_image` in worker processes (its crash handling included)."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, str | None, bool]:
        return (index, *check_image(self.paths[index]))


def _run_checks(paths: list[str], workers: int, progress: bool) -> list[tuple[str | None, bool]]:
    """:func:`check_image` of every path, in order, in ``workers`` processes (0: here)."""
    results: list[tuple[str | None, bool]] = []
    with tqdm(total=len(paths), desc="checking images", unit="img", disable=not progress, leave=False) as bar:
        for _, reason, cacheable in run_in_workers(_Checks(paths), workers, batch_size=16):
            results.append((reason, cacheable))
            bar.update()
    return results


def _auto_workers(n: int) -> int:
    return 0 if n < POOL_THRESHOLD else min(default_workers(), max(1, n // 256))


def _known_verdicts(abspaths: Sequence[str], entries: dict[str, list[Any]]
                    ) -> tuple[dict[str, str | None], dict[str, list[Any]], int]:
    """What is known without decoding: ``(verdicts, keys, cached)``. ``verdicts`` maps a path
    to its reason (None: good) when it cannot be opened or the cache has its verdict; ``keys``
    holds ``[size, mtime_ns]`` of the files still to decode; ``cached`` counts cache hits."""
    verdicts: dict[str, str | None] = {}
    keys: dict[str, list[Any]] = {}
    cached = 0
    for ap in dict.fromkeys(abspaths):
        try:
            st = os.stat(ap)
        except OSError as e:  # not cached: the file may come back
            gone = isinstance(e, FileNotFoundError)
            verdicts[ap] = "file not found (deleted or moved?)" if gone else first_line(e.strerror or e, TEXT_LIMIT)
            continue
        if not stat.S_ISREG(st.st_mode):
            verdicts[ap] = "not a regular file"
            continue
        entry = entries.get(ap)
        if entry is not None and entry[0] == st.st_size and entry[1] == st.st_mtime_ns:
            verdicts[ap] = entry[2]
            cached += 1
        else:
            keys[ap] = [st.st_size, st.st_mtime_ns]
    return verdicts, keys, cached


def _vouched(reader: Reader, samples: list[tuple[str, int]], abspaths: list[str],
             verdicts: dict[str, str | None]) -> dict[str, str | None]:
    """The reader's verdicts by path, after it read every sample not known to be unreadable."""
    known_bad = {i: reason for i, ap in enumerate(abspaths) if (reason := verdicts.get(ap)) is not None}
    return {abspaths[i]: reason for i, reason in reader(samples, known_bad).items()}


def scan_samples(
    samples: list[tuple[str, int]],
    *,
    strict: bool = False,
    cache: bool = True,
    workers: int | None = None,
    progress: bool = False,
    reader: Reader | None = None,
) -> ScanResult:
    """Fully decode every sample; split them into readable ``good`` ones and ``bad`` ``(path, reason)``.

    Default: bad files are only reported (``result.warning()`` is the message to print) and left
    out of ``good``. ``strict=True`` raises :class:`DataError` naming them instead. With
    ``cache`` (the default) verdicts are stored by (absolute path, size, mtime_ns) under
    :func:`~cnntrain.paths.scan_cache_dir` and reused while a file is unchanged; ``result.cached`` counts those.
    ``workers`` decoder processes (default: none below :data:`POOL_THRESHOLD` files to decode,
    else up to ``default_workers()``); ``progress`` shows a bar. ``reader``: a pass that decodes
    every sample anyway (see the module docstring); it is always called, and the files it vouches
    for are not decoded here.
    """
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise UsageError(f"workers must be 0 or more, got {workers!r}; 0 checks in this process")
    start = time.perf_counter()
    samples = list(samples)
    abspaths = [os.path.abspath(path) for path, _ in samples]
    cache_path = _cache_file(abspaths) if cache and samples else None
    entries = _load_cache(cache_path) if cache_path is not None else {}
    verdicts, keys, cached = _known_verdicts(abspaths, entries)
    vouched = _vouched(reader, samples, abspaths, verdicts) if reader is not None else {}
    checked = {ap: (vouched[ap], True) for ap in keys if ap in vouched}
    todo = [ap for ap in keys if ap not in vouched]
    n_workers = _auto_workers(len(todo)) if workers is None else min(workers, len(todo))
    checked.update(zip(todo, _run_checks(todo, n_workers, progress)))
    changed = False
    for ap, (reason, cacheable) in checked.items():
        verdicts[ap] = reason
        if cacheable:
            entries[ap] = [*keys[ap], reason]
            changed = True
    if cache_path is not None and changed:  # other scans' entries (train and val share a root) are kept
        _save_cache(cache_path, entries, set(verdicts))

    good = [s for s, ap in zip(samples, abspaths) if verdicts[ap] is None]
    bad = [(path, verdicts[ap] or "") for (path, _), ap in zip(samples, abspaths) if verdicts[ap] is not None]
    result = ScanResult(good, bad, cached, time.perf_counter() - start)
    if strict and bad:
        raise DataError(result.error())
    return result
