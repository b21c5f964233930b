"""Pretrained weights: resolve, download (atomic, hash-checked), cache, load safely.

Files live where torchvision keeps them (``$TORCH_HOME/hub/checkpoints``), so a file fetched
by either tool serves both. Names follow torch.hub's ``name-<sha256 prefix>.ext`` convention;
that prefix is checked after every download, copy-in and before every load, and loading is
always ``weights_only=True``: a weights file is data, never code.

A download streams into a hidden temp file next to its target and is renamed into place only
once its length and hash are right, so a dropped connection or a killed process never leaves a
file that a later run would trust. Every failure becomes one ``DownloadError`` line that says
what happened and what to do next.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from cnntrain.errors import CheckpointError, DownloadError, WeightsError, first_line
from cnntrain.fileio import atomic_open, is_temp_name, sha256_file
from cnntrain.http_download import FetchError, fetch
from cnntrain.paths import weights_dir as cache_dir  # public here too: the CLI and tests ask weights

__all__ = [
    "HASH_REGEX",
    "MIRROR_ENV",
    "cache_dir",
    "download",
    "download_for",
    "ensure_cached",
    "file_name",
    "hash_prefix",
    "import_file",
    "list_cached",
    "load_state_dict",
    "resolve_url",
    "safe_load",
    "safe_torchvision_loading",
    "verify",
]

# Same pattern as torch.hub, so we check exactly the files torch.hub would check.
HASH_REGEX = re.compile(r"-([a-f0-9]*)\.")
MIRROR_ENV = "CNNTRAIN_WEIGHTS_MIRROR"
_CHUNK = 1 << 18
#: Longest reason quoted from torch in a "damaged" message.
_REASON_LIMIT = 120


# --- names and places (the cache folder itself is cnntrain.paths.weights_dir) ---------------


def _url_of(weights: Any) -> str:
    """URL of a torchvision ``WeightsEnum`` member, a ``Weights`` record, or a URL string."""
    if isinstance(weights, str):
        return weights
    url = getattr(weights, "url", None)
    if not isinstance(url, str):
        raise WeightsError(f"{weights!r} is neither a weights entry nor a URL")
    return url


def file_name(weights: Any) -> str:
    """File name of a weights entry or URL: the last part of its path (``resnet50-11ad3fa6.pth``)."""
    url = _url_of(weights)
    name = urllib.parse.unquote(os.path.basename(urllib.parse.urlparse(url).path))
    if not name:
        raise WeightsError(f"cannot tell a file name from the URL {url!r}")
    return name


def hash_prefix(file_name: str | os.PathLike[str]) -> str | None:
    """The SHA-256 prefix a ``name-<hex>.ext`` file name promises, or None if it has none."""
    match = HASH_REGEX.search(Path(file_name).name)
    return (match.group(1) or None) if match else None


def resolve_url(weights_or_url: Any, mirror: str | None = None) -> str:
    """Where to fetch from: the original URL, or the same file name under a mirror.

    ``mirror`` (else $CNNTRAIN_WEIGHTS_MIRROR) is a base URL, or a local folder, for machines
    that cannot reach download.pytorch.org but can reach an internal copy.
    """
    url = _url_of(weights_or_url)
    base = mirror if mirror is not None else os.environ.get(MIRROR_ENV, "")
    base = base.strip()
    if not base:
        return url
    if "://" not in base:  # a plain folder: urllib reads file:// URLs the same way
        base = Path(base).expanduser().resolve().as_uri()
    return f"{base.rstrip('/')}/{urllib.parse.quote(file_name(url))}"


def _guess_arch(weights: Any) -> str:
    """Name of a torchvision model using ``weights``, to write runnable commands in messages."""
    try:
        import torchvision.models as tvm

        for name in tvm.list_models():
            try:
                if tvm.get_model_weights(name) is type(weights):
                    return name
            except Exception:  # noqa: BLE001 - a lookup that fails just is not the answer
                continue
    except Exception:  # noqa: BLE001
        pass
    return "ARCH"


# --- downloading --------------------------------------------------------------------------


def _download(url: str, folder: Path, *, timeout: float, progress: bool) -> Path:
    """Shared body of ``download`` and ``ensure_cached``: failures come out as ``FetchError``."""
    dest = folder / file_name(url)
    if dest.is_file() and _hash_ok(dest):
        return dest
    return fetch(url, dest, sha256=hash_prefix(dest.name), timeout=timeout, progress=progress)


def _download_hint(name: str, arch: str) -> str:
    return (
        f"retry, use --mirror BASE_URL (or set {MIRROR_ENV}), or fetch {name} another way and "
        f"copy it in with `cnntrain download-weights {arch} --from FILE`"
    )


def download(
    url: str,
    dest_dir: str | os.PathLike[str] | None = None,
    *,
    timeout: float = 30.0,
    progress: bool = True,
    arch: str | None = None,
) -> Path:
    """Fetch ``url`` into ``dest_dir`` (default: the cache) and return the verified file.

    ``timeout`` bounds the connect and every read (a stalled server fails, a slow one does
    not). A file already there that passes its hash check is returned without a download;
    on any failure nothing new is left in ``dest_dir`` and ``DownloadError`` says why.
    """
    folder = Path(dest_dir) if dest_dir is not None else cache_dir()
    try:
        return _download(url, folder, timeout=timeout, progress=progress)
    except FetchError as err:
        name = file_name(url)
        raise DownloadError(
            f"could not download {name}: {err.what}; {_download_hint(name, arch or 'ARCH')}"
        ) from err.__cause__


# --- the cache ----------------------------------------------------------------------------


def _hash_ok(path: Path) -> bool:
    """True if ``path`` is non-empty and matches the hash prefix its name carries (if any)."""
    expected = hash_prefix(path.name)
    try:
        if path.stat().st_size == 0:
            return False
        return expected is None or sha256_file(path).startswith(expected)
    except OSError:
        return False


def verify(path: str | os.PathLike[str], *, arch: str | None = None) -> None:
    """Re-check a cached file against the SHA-256 prefix in its name; raise ``WeightsError``.

    Disks, interrupted copies and hand edits do corrupt files; loading one would give a
    silently broken model or a confusing unpickling error far from the cause.
    """
    p = Path(path)
    expected = hash_prefix(p.name)
    if expected is None:
        return
    try:
        actual = sha256_file(p)
    except FileNotFoundError:
        raise WeightsError(f"{p} not found") from None
    except OSError as err:
        raise WeightsError(f"cannot read {p}: {err.strerror or err}") from err
    if not actual.startswith(expected):
        raise WeightsError(
            f"corrupted cache file {p}: its SHA-256 starts with {actual[: len(expected)]}, its name "
            f"says {expected}; delete it and re-download with `cnntrain download-weights {arch or 'ARCH'}`"
        )


def import_file(
    src: str | os.PathLike[str],
    dest_dir: str | os.PathLike[str] | None = None,
    *,
    name: str | None = None,
    arch: str | None = None,
) -> Path:
    """Copy a local weights file into the cache atomically (for offline machines).

    Stored as ``name`` (default: the source's own name), whose hash prefix, if any, the
    content must match; on a mismatch nothing is left behind and ``WeightsError`` is raised.
    """
    source = Path(src).expanduser()
    if not source.exists():
        raise WeightsError(f"{source} not found")
    if not source.is_file():
        raise WeightsError(f"{source} is not a file")
    folder = Path(dest_dir) if dest_dir is not None else cache_dir()
    dest = folder / (name or source.name)
    expected = hash_prefix(dest.name)
    if dest.exists() and os.path.samefile(source, dest):
        verify(dest, arch=arch)
        return dest
    refetch = f"fetch it again (e.g. `cnntrain download-weights {arch or 'ARCH'}`)"
    try:
        with open(source, "rb") as f_in, atomic_open(dest, "wb") as f_out:
            digest = hashlib.sha256()
            size = 0
            while chunk := f_in.read(_CHUNK):
                f_out.write(chunk)
                digest.update(chunk)
                size += len(chunk)
            if size == 0:
                raise WeightsError(f"{source} is empty (0 bytes); {refetch}")
            actual = digest.hexdigest()
            if expected and not actual.startswith(expected):
                raise WeightsError(
                    f"{source} is not {dest.name}: its SHA-256 starts with {actual[: len(expected)]}, "
                    f"the name promises {expected}; the file is damaged or a different release, {refetch}"
                )
    except OSError as err:
        raise WeightsError(f"cannot copy {source} into {folder}: {err.strerror or err}") from err
    return dest


def list_cached(dest_dir: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """Files in the cache: ``name``, ``size`` (bytes), ``path`` (Path), ``hash_prefix``."""
    folder = Path(dest_dir) if dest_dir is not None else cache_dir()
    if not folder.is_dir():
        return []
    entries = []
    for path in sorted(folder.iterdir()):
        if is_temp_name(path.name) or path.name.startswith(".") or not path.is_file():
            continue
        entries.append(
            {"name": path.name, "size": path.stat().st_size, "path": path, "hash_prefix": hash_prefix(path.name)}
        )
    return entries


# --- loading ------------------------------------------------------------------------------

_GLOBAL_RE = re.compile(r"GLOBAL (\S+?)(?: whose| was|\s|$)")


def safe_load(path: str | os.PathLike[str]) -> Any:
    """``torch.load`` with ``weights_only=True`` on the CPU, failures as one-line ``CheckpointError``.

    There is deliberately no unsafe fallback: a pickle that wants to import a function or
    build an arbitrary object is refused, because loading it could run any code.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p} not found")
    if not p.is_file():
        raise CheckpointError(f"{p} is not a file")
    damaged = "; delete it and download or save it again"
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p} is damaged: it is empty (0 bytes){damaged}")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        message = str(err)
        found = _GLOBAL_RE.search(message)
        if found or "Can only create new object" in message or "Can only build" in message:
            what = f"it references {found.group(1)}" if found else "it builds arbitrary objects"
            raise CheckpointError(
                f"refused to load {p}: it contains code or objects that are not plain tensors "
                f"({what}); cnntrain only loads tensors and plain containers, so nothing in it was run"
            ) from None
        # torch wraps the unpickler's reason in advice to retry with weights_only=False: drop it.
        reason = message.rsplit("WeightsUnpickler error:", 1)[-1].split("Check the documentation")[0]
        reason = first_line(reason.strip(), _REASON_LIMIT)
        raise CheckpointError(f"{p} is damaged or not a PyTorch file ({reason}){damaged}") from None
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - torch reports damage as many types (EOF, OSError, KeyError ...)
        reason = first_line(err, _REASON_LIMIT, with_type=True)
        raise CheckpointError(f"{p} is damaged or not a PyTorch file ({reason}){damaged}") from err


def ensure_cached(
    weights: Any,
    *,
    mirror: str | None = None,
    timeout: float = 30.0,
    progress: bool = True,
    download_missing: bool = True,
    arch: str | None = None,
) -> Path:
    """Path of the verified cached file for ``weights``, downloading it if missing and allowed.

    When the file is neither cached nor obtainable, the error names the three ways out:
    fetch it with ``cnntrain download-weights``, bring your own with ``--weights FILE``, or
    train without it (``--no-pretrained``).
    """
    name = file_name(weights)
    folder = cache_dir()
    path = folder / name
    label = arch or (_guess_arch(weights) if not isinstance(weights, str) else "ARCH")
    if path.is_file():
        verify(path, arch=label)
        return path
    ways = (
        f"`cnntrain download-weights {label}` (with --mirror BASE_URL or --from FILE when offline), "
        "`--weights FILE` to use your own file, or `--no-pretrained` to train from scratch"
    )
    if not download_missing:
        raise WeightsError(f"pretrained weights {name} are not in {folder} and downloading is off; use {ways}")
    try:
        return _download(resolve_url(weights, mirror), folder, timeout=timeout, progress=progress)
    except FetchError as err:
        raise DownloadError(
            f"pretrained weights {name} are not cached and could not be downloaded: {err.what}; retry, or use {ways}"
        ) from err.__cause__


def load_state_dict(weights: Any, **kw: Any) -> dict[str, torch.Tensor]:
    """The state dict of ``weights``: cached (``kw`` go to ``ensure_cached``), verified, loaded safely.

    ``ensure_cached`` hashes a cached file and ``download`` hashes a new one, so the file is
    verified exactly once per call.
    """
    path = ensure_cached(weights, **kw)
    state = safe_load(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    return state


@contextlib.contextmanager
def safe_torchvision_loading(**kw: Any) -> Iterator[None]:
    """Let torchvision builders load weights through ``load_state_dict`` (verified, weights_only).

    torchvision's builders know each family's quirks (DenseNet key renames, Inception's
    transform_input), but fetch through ``torch.hub`` with ``weights_only=False``. Inside this
    context ``WeightsEnum.get_state_dict`` is ours; it is restored on exit, errors included.
    ``kw`` (mirror, timeout, progress, download_missing, arch) go to ``ensure_cached``. The
    patch is process-wide, so keep the context short.
    """
    from torchvision.models import WeightsEnum

    original = WeightsEnum.__dict__["get_state_dict"]

    def get_state_dict(self: Any, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        options = {"progress": kwargs.get("progress", True), **kw}
        return load_state_dict(self, **options)  # looked up at call time: patchable in tests

    WeightsEnum.get_state_dict = get_state_dict
    try:
        yield
    finally:
        WeightsEnum.get_state_dict = original


# --- fetching by architecture (`cnntrain download-weights`) ----------------------------------


def download_for(
    archs: Sequence[str],
    *,
    all_: bool = False,
    mirror: str | None = None,
    timeout: float = 30.0,
    on_cached: Callable[[str, Path], None] | None = None,
) -> list[tuple[str, Path]]:
    """Cache the ImageNet weights of ``archs`` (or, with ``all_``, of every architecture that has
    them); returns ``(arch, path)`` per file, and calls ``on_cached`` as each one is ready.

    Every name is checked before anything is fetched. Architectures sharing a file are fetched
    once, under the first name. Naming one without weights is a usage error; ``all_`` skips them.
    No names and no ``all_``: nothing to do, an empty list.
    """
    # Here, not at the top: the registry loads torchvision's model zoo, which plain weight
    # handling (and cnntrain.models itself, when it loads weights) should not wait for.
    from cnntrain.errors import UsageError
    from cnntrain.models.registry import get_spec, list_models

    names = list_models() if all_ else list(archs)
    specs = [get_spec(n) for n in names]  # unknown names fail before anything is fetched
    todo: dict[str, Any] = {}  # url -> the first spec naming it
    for spec in specs:
        if spec.weights is None:
            if not all_:
                raise UsageError(f"{spec.name} has no pretrained weights (train it with --no-pretrained)")
            continue
        todo.setdefault(spec.weights.url, spec)
    done = []
    for spec in todo.values():
        path = ensure_cached(spec.weights, arch=spec.name, mirror=mirror, timeout=timeout)
        if on_cached is not None:
            on_cached(spec.name, path)
        done.append((spec.name, path))
    return done
