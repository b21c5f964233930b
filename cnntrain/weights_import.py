"""Weights of one's own for an architecture: ``cnntrain download-weights --from FILE --arch NAME``.

Pretrained builds look their weights up by file name in torchvision's cache. A file of one's own
is checked to load into the architecture (torchvision's strict loader, with each family's key
quirks) and stored under that name; as its hash cannot match the name, the import is recorded
beside it (see ``weights.imported_record``), and the record stands in for the name's promise.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cnntrain.errors import CheckpointError, UsageError, WeightsError, first_line
from cnntrain.fileio import atomic_write_text, sha256_file
from cnntrain.weights import (
    REASON_LIMIT,
    cache_dir,
    copy_in,
    few,
    file_name,
    guess_arch,
    hash_prefix,
    import_file,
    record_path,
    safe_load,
    source_file,
)

__all__ = ["Imported", "import_weights"]


@dataclass(frozen=True)
class Imported:
    """What ``import_weights`` did: ``source`` is now ``path``, the file ``arch``'s pretrained
    builds read; ``record`` is the import record, written when the content is not the release
    the name stands for (None when it is)."""

    source: Path
    path: Path
    arch: str
    record: Path | None = None

    def summary(self) -> str:
        if self.record is None:
            return f"cached {self.path} ({self.arch})"
        return (
            f"imported {self.source} as {self.path} for {self.arch} (it loads into {self.arch}); as it is not "
            f"torchvision's release of that file (its SHA-256 does not match the name), the import is recorded in "
            f"{self.record.name}, and cnntrain checks the file against that record before each use"
        )


def _expected_names() -> dict[str, str]:
    """File name -> architecture, for every architecture with weights (torchvision's own first)."""
    from cnntrain.models.registry import get_spec, list_models

    specs = sorted((get_spec(n) for n in list_models()), key=lambda s: s.partial_weights)
    names: dict[str, str] = {}
    for spec in specs:
        if spec.weights is not None:
            names.setdefault(file_name(spec.weights), spec.name)
    return names


_QUOTED_RE = re.compile(r'"([^"]+)"')


def _load_problems(err: Exception) -> str:
    """torch's strict-load error (one line per kind, every key) as one short phrase."""
    problems, mismatched = [], []
    for line in str(err).splitlines()[1:]:
        line = line.strip()
        if line.startswith("size mismatch for "):
            mismatched.append(line[len("size mismatch for "):].split(":", 1)[0])
        elif line.startswith(("Missing key(s)", "Unexpected key(s)")):
            label = "missing" if line.startswith("Missing") else "unexpected"
            problems.append(f"{label}: {few(_QUOTED_RE.findall(line), 4)}")
    if mismatched:
        problems.append(f"shape mismatch: {few(mismatched, 4)}")
    return "; ".join(problems) or first_line(err, REASON_LIMIT)


def _check_fits(source: Path, spec: Any) -> None:
    """Refuse a file that torchvision's builder for ``spec`` would not load (it loads strictly,
    with each family's quirks: DenseNet's renamed keys, GoogLeNet's auxiliary heads)."""
    import torchvision
    from torchvision.models import WeightsEnum

    advice = "--from expects ImageNet weights saved with torch.save(model.state_dict(), FILE)"
    state = safe_load(source, what="a PyTorch weights file", advice=advice)
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        inner = next((k for k in ("model", "state_dict", "model_state_dict")
                      if isinstance(state, dict) and isinstance(state.get(k), dict)), None)
        if inner is None:
            raise CheckpointError(f"{source} holds a {type(state).__name__}, not a state dict of tensors; {advice}")
        raise CheckpointError(
            f"{source} holds its weights under {inner!r}; save those alone with torch.save(obj[{inner!r}], FILE) "
            "and import that, or start a run from the file as it is with `cnntrain train --weights FILE`"
        )
    base = guess_arch(spec.weights) if spec.partial_weights else spec.name  # ours start from torchvision's
    original = WeightsEnum.__dict__["get_state_dict"]
    WeightsEnum.get_state_dict = lambda self, *args, **kwargs: state
    try:
        torchvision.models.get_model(base, weights=spec.weights)
    except RuntimeError as err:
        target = spec.name if base == spec.name else f"{base}, whose weights {spec.name} starts from,"
        raise CheckpointError(f"{source} does not fit {target} ({_load_problems(err)}); check --arch") from None
    finally:
        WeightsEnum.get_state_dict = original


def import_weights(
    src: str | os.PathLike[str], *, arch: str | None = None, dest_dir: str | os.PathLike[str] | None = None
) -> Imported:
    """Put a local weights file where pretrained builds of ``arch`` will find it (offline machines).

    Without ``arch`` the file must carry the name some architecture's weights are looked up by
    (``resnet18-f37072fd.pth``), and match its hash. With ``arch`` it may be called anything and
    is stored under that architecture's name; content that is not the release must load into the
    architecture (safely, weights_only) and is then recorded (``<name>.imported.json``, its
    SHA-256), so that ``verify`` and ``ensure_cached`` accept it while it stays unchanged.
    """
    from cnntrain.models.registry import get_spec, list_models

    source = source_file(src)
    folder = Path(dest_dir) if dest_dir is not None else cache_dir()
    if arch is None:
        names = _expected_names()
        owner = names.get(source.name)
        if owner is None:
            stem = source.stem.lower()
            archs = sorted(n for n in list_models() if get_spec(n).weights is not None and n in stem)
            guess = max(archs, key=len, default="NAME")  # my_resnet18.pth: resnet18
            raise UsageError(
                f"no architecture will find {source.name} in the cache: pretrained builds look for their own "
                f"file name (e.g. resnet18's {file_name(get_spec('resnet18').weights)}); pass --arch NAME to check "
                f"the file and store it under that name: `cnntrain download-weights --from {source} --arch {guess}`"
            )
        return Imported(source, import_file(source, folder, arch=owner), owner)
    spec = get_spec(arch)
    if spec.weights is None:
        raise UsageError(
            f"{arch} has no pretrained weights, so no pretrained build of it looks for a file; start a run from "
            "yours with `cnntrain train --weights FILE`"
        )
    dest = folder / file_name(spec.weights)
    expected = hash_prefix(dest.name)
    try:
        digest = sha256_file(source)
    except OSError as err:
        raise WeightsError(f"cannot read {source}: {err.strerror or err}") from err
    if expected is None or digest.startswith(expected):  # the release itself, under another name
        return Imported(source, import_file(source, folder, name=dest.name, arch=arch), arch)
    _check_fits(source, spec)
    record = record_path(dest)
    written = []

    def check(actual: str, size: int) -> None:  # runs before the file is renamed into place
        if actual != digest:
            raise WeightsError(f"{source} changed while it was being imported; import it again")
        content = {"sha256": actual, "size": size, "arch": arch, "source": str(source.resolve())}
        written.append(atomic_write_text(record, json.dumps(content, indent=2) + "\n"))

    try:
        copy_in(source, dest, check)
    except BaseException:
        if written:  # the record of a file that never arrived
            record.unlink(missing_ok=True)
        raise
    return Imported(source, dest, arch, record)
