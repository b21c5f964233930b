"""Pretrained weights: resolve, download (atomic, hash-checked), cache, load safely.

Files live where torchvision keeps them (``$TORCH_HOME/hub/checkpoints``), so a file fetched
by either tool serves both. Names follow torch.hub's ``name-<sha256 prefix>.ext`` convention;
that prefix is checked after every download, copy-in and before every load, and loading is
always ``weights_only=True``: a weights file is data, never code.

A file of one's own (``cnntrain download-weights --from FILE --arch NAME``, see
``weights_import``) is checked to load into that architecture and stored under the name its
weights are looked up by. Its hash cannot match that name, so the import is recorded next to it
(``<name>.imported.json``, holding the file's full SHA-256), and the record stands in for the
name's promise on every later check here.

A download streams into a hidden temp file next to its target and is renamed into place only
once its length and hash are right, so a dropped connection or a killed process never leaves a
file that a later run would trust. Every failure becomes one ``DownloadError`` line that says
what happened and what to do next.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from cnntrain.errors import CheckpointError, DownloadError, UsageError, WeightsError, first_line
from cnntrain.fileio import atomic_open, is_temp_name, sha256_file
from cnntrain.filetypes import describe_file
from cnntrain.http_download import FetchError, fetch
from cnntrain.paths import weights_dir as cache_dir  # public here too: the CLI and tests ask weights

__all__ = [
    "HASH_REGEX",
    "MIRROR_ENV",
    "RECORD_SUFFIX",
    "cache_dir",
    "download",
    "download_for",
    "ensure_cached",
    "file_name",
    "hash_prefix",
    "import_file",
    "imported_record",
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
REASON_LIMIT = 120


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


def guess_arch(weights: Any) -> str:
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
    fetch(url, dest, sha256=hash_prefix(dest.name), timeout=timeout, progress=progress)
    record_path(dest).unlink(missing_ok=True)  # the release replaced a file imported with --arch
    return dest


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

#: Next to a file imported with ``--from FILE --arch NAME``: what was imported, with its SHA-256.
RECORD_SUFFIX = ".imported.json"
_REIMPORT = "import it again with `cnntrain download-weights --from FILE --arch {arch}`"


def record_path(path: Path) -> Path:
    return path.with_name(path.name + RECORD_SUFFIX)


def imported_record(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The record of a cached file imported with ``--arch`` (``sha256``, ``arch``, ``source``), or None."""
    try:
        record = json.loads(record_path(Path(path)).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("sha256"), str) else None


def _hash_ok(path: Path, *, imported: bool = False) -> bool:
    """True if ``path`` is non-empty and matches the hash prefix its name carries (if any); with
    ``imported``, also when its import record holds exactly its SHA-256."""
    expected = hash_prefix(path.name)
    try:
        if path.stat().st_size == 0:
            return False
        if expected is None:
            return True
        actual = sha256_file(path)
    except OSError:
        return False
    if actual.startswith(expected):
        return True
    record = imported_record(path) if imported else None
    return record is not None and record["sha256"] == actual


def verify(path: str | os.PathLike[str], *, arch: str | None = None) -> None:
    """Re-check a cached file against the SHA-256 prefix in its name; raise ``WeightsError``.

    Disks, interrupted copies and hand edits do corrupt files; loading one would give a
    silently broken model or a confusing unpickling error far from the cause. A file imported
    with ``--arch`` passes when its content is still the one its import record names.
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
    if actual.startswith(expected):
        return
    record = imported_record(p)
    if record is not None:
        if record["sha256"] == actual:
            return
        raise WeightsError(
            f"{p} changed since it was imported (its SHA-256 is no longer the one in {record_path(p).name}); "
            + _REIMPORT.format(arch=arch or record.get("arch") or "ARCH")
        )
    raise WeightsError(
        f"corrupted cache file {p}: its SHA-256 starts with {actual[: len(expected)]}, its name "
        f"says {expected}; delete it and re-download with `cnntrain download-weights {arch or 'ARCH'}`"
    )


def source_file(src: str | os.PathLike[str]) -> Path:
    source = Path(src).expanduser()
    if not source.exists():
        raise WeightsError(f"{source} not found")
    if not source.is_file():
        raise WeightsError(f"{source} is not a file")
    return source


def copy_in(source: Path, dest: Path, check: Callable[[str, int], None]) -> Path:
    """Copy ``source`` onto ``dest`` atomically; ``check(sha256, size)`` may refuse it first."""
    try:
        with open(source, "rb") as f_in, atomic_open(dest, "wb") as f_out:
            digest = hashlib.sha256()
            size = 0
            while chunk := f_in.read(_CHUNK):
                f_out.write(chunk)
                digest.update(chunk)
                size += len(chunk)
            check(digest.hexdigest(), size)
    except OSError as err:
        raise WeightsError(f"cannot copy {source} into {dest.parent}: {err.strerror or err}") from err
    return dest


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
    (``import_weights`` is the by-architecture front door, for files of any name.)
    """
    source = source_file(src)
    folder = Path(dest_dir) if dest_dir is not None else cache_dir()
    dest = folder / (name or source.name)
    expected = hash_prefix(dest.name)
    if dest.exists() and os.path.samefile(source, dest):
        verify(dest, arch=arch)
        return dest
    refetch = f"fetch it again (e.g. `cnntrain download-weights {arch or 'ARCH'}`)"

    def check(actual: str, size: int) -> None:
        if size == 0:
            raise WeightsError(f"{source} is empty (0 bytes); {refetch}")
        if expected and not actual.startswith(expected):
            raise WeightsError(
                f"{source} is not {dest.name}: its SHA-256 starts with {actual[: len(expected)]}, "
                f"the name promises {expected}; the file is damaged or a different release, {refetch}"
            )

    copy_in(source, dest, check)
    record_path(dest).unlink(missing_ok=True)  # the content is what its name says: no import to record
    return dest


def list_cached(dest_dir: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """Files in the cache: ``name``, ``size`` (bytes), ``path`` (Path), ``hash_prefix``, ``imported``
    (True for a file of one's own, imported with ``--arch``). Import records are not listed."""
    folder = Path(dest_dir) if dest_dir is not None else cache_dir()
    if not folder.is_dir():
        return []
    entries = []
    for path in sorted(folder.iterdir()):
        if is_temp_name(path.name) or path.name.startswith(".") or not path.is_file():
            continue
        if path.name.endswith(RECORD_SUFFIX):
            continue
        entries.append(
            {"name": path.name, "size": path.stat().st_size, "path": path, "hash_prefix": hash_prefix(path.name),
             "imported": record_path(path).is_file()}
        )
    return entries


# --- loading ------------------------------------------------------------------------------

_GLOBAL_RE = re.compile(r"GLOBAL (\S+?)(?: whose| was|\s|$)")


def safe_load(
    path: str | os.PathLike[str],
    *,
    what: str = "a PyTorch file",
    advice: str = "expected a file saved by torch.save (.pt/.pth)",
) -> Any:
    """``torch.load`` with ``weights_only=True`` on the CPU, failures as one-line ``CheckpointError``.

    There is deliberately no unsafe fallback: a pickle that wants to import a function or
    build an arbitrary object is refused, because loading it could run any code. A file torch
    cannot read is described: ``{path} is not {what} (it starts like a JPEG image); {advice}``.
    ``advice`` is for the caller to give, because only it knows whose file this is: the user's
    own (say what was expected) or one cnntrain downloaded (delete it and download it again).
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p} not found")
    if not p.is_file():
        raise CheckpointError(f"{p} is not a file")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p} is empty (0 bytes), not {what}; {advice}")
    try:
        with warnings.catch_warnings():  # torch's note on TorchScript archives: the error says it better
            warnings.filterwarnings("ignore", message=".*looks like a TorchScript archive")
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        message = str(err)
        found = _GLOBAL_RE.search(message)
        if found or "Can only create new object" in message or "Can only build" in message:
            objects = f"it references {found.group(1)}" if found else "it builds arbitrary objects"
            raise CheckpointError(
                f"refused to load {p}: it contains code or objects that are not plain tensors "
                f"({objects}); cnntrain only loads tensors and plain containers, so nothing in it was run"
            ) from None
        # torch wraps the unpickler's reason in advice to retry with weights_only=False: drop it.
        reason = message.rsplit("WeightsUnpickler error:", 1)[-1].split("Check the documentation")[0]
        raise _not_loadable(p, what, advice, first_line(reason.strip(), REASON_LIMIT)) from None
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - torch reports damage as many types (EOF, OSError, KeyError ...)
        raise _not_loadable(p, what, advice, first_line(err, REASON_LIMIT, with_type=True)) from err


def _not_loadable(p: Path, what: str, advice: str, reason: str) -> CheckpointError:
    kind = describe_file(p)
    if kind is not None:
        return CheckpointError(f"{p} is not {what} ({kind}); {advice}")
    return CheckpointError(f"{p} is damaged or not {what} ({reason}); {advice}")


def _label(weights: Any, arch: str | None) -> str:
    """The architecture to name in commands that messages suggest."""
    return arch or (guess_arch(weights) if not isinstance(weights, str) else "ARCH")


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
    fetch it with ``cnntrain download-weights`` (or elsewhere, then import it), bring your own
    with ``--weights FILE``, or train without it (``--no-pretrained``).
    """
    name = file_name(weights)
    folder = cache_dir()
    path = folder / name
    label = _label(weights, arch)
    if path.is_file():
        verify(path, arch=label)
        return path
    ways = (
        f"`cnntrain download-weights {label}` (offline: with --mirror BASE_URL, or fetch {_url_of(weights)} "
        f"elsewhere and import it with `cnntrain download-weights --from FILE --arch {label}`), "
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
    label = _label(weights, kw.get("arch"))
    if imported_record(path) is not None:
        advice = _REIMPORT.format(arch=label)
    else:  # a file cnntrain (or torchvision) downloaded: getting it again is the fix
        advice = f"delete it and download it again with `cnntrain download-weights {label}`"
    state = safe_load(path, what="a PyTorch weights file", advice=advice)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict of tensors; {advice}")
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


# --- by architecture (`cnntrain download-weights`) -------------------------------------------


def few(names: Sequence[str], limit: int = 8) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _mirror_given(mirror: str | None) -> bool:
    return bool((mirror if mirror is not None else os.environ.get(MIRROR_ENV, "")).strip())


def _fetch_for(spec: Any, *, mirror: str | None, timeout: float) -> Path:
    """The cached file of ``spec``'s weights (an imported one counts), fetched if missing or damaged."""
    folder = cache_dir()
    path = folder / file_name(spec.weights)
    if path.is_file() and _hash_ok(path, imported=True):
        return path
    url = resolve_url(spec.weights, mirror)
    try:
        return _download(url, folder, timeout=timeout, progress=True)
    except FetchError as err:
        # Not ensure_cached's advice: --weights and --no-pretrained are options of train, not of this command.
        hint = (
            f"retry, or fetch {spec.weights.url} on a machine that can reach it and import it here with "
            f"`cnntrain download-weights --from FILE --arch {spec.name}`"
        )
        if not _mirror_given(mirror):
            hint += f", or use --mirror BASE_URL (or set {MIRROR_ENV})"
        raise DownloadError(f"could not download {path.name} from {url}: {err.what}; {hint}") from err.__cause__


def download_for(
    archs: Sequence[str],
    *,
    all_: bool = False,
    mirror: str | None = None,
    timeout: float = 30.0,
    on_cached: Callable[[str, Path], None] | None = None,
    on_failed: Callable[[str, DownloadError], None] | None = None,
) -> list[tuple[str, Path]]:
    """Cache the ImageNet weights of ``archs`` (or, with ``all_``, of every architecture that has
    them); returns ``(arch, path)`` per file, and calls ``on_cached`` as each one is ready.

    Every name is checked before anything is fetched. Architectures sharing a file are fetched
    once, under the first name. Naming one without weights is a usage error; ``all_`` skips them.
    No names and no ``all_``: nothing to do, an empty list. A file cached but damaged is fetched
    again; one imported with ``--arch`` is kept. With several files, a failure does not stop the
    others: each is passed to ``on_failed``, and one ``DownloadError`` at the end sums up what
    was cached and what was not. A single file's failure is that file's ``DownloadError``.
    """
    # Here, not at the top: the registry loads torchvision's model zoo, which plain weight
    # handling (and cnntrain.models itself, when it loads weights) should not wait for.
    from cnntrain.models.registry import get_spec, list_models

    names = list_models() if all_ else list(archs)
    specs = [get_spec(n) for n in names]  # unknown names fail before anything is fetched
    todo: dict[str, Any] = {}  # url -> the first spec naming it
    for spec in specs:
        if spec.weights is None:
            if spec.pretrained_loader is not None and not all_:  # timm's: fetched by timm, not by URL
                raise UsageError(
                    f"{spec.name} loads its weights through timm, into the Hugging Face cache, the first time a run "
                    f"uses them (`cnntrain train --arch {spec.name}`); download-weights fetches torchvision's"
                )
            if not all_:
                raise UsageError(f"{spec.name} has no pretrained weights (train it with --no-pretrained)")
            continue
        todo.setdefault(spec.weights.url, spec)
    done: list[tuple[str, Path]] = []
    failed: list[str] = []
    for spec in todo.values():
        try:
            path = _fetch_for(spec, mirror=mirror, timeout=timeout)
        except DownloadError as err:
            if len(todo) == 1:
                raise
            failed.append(spec.name)
            if on_failed is not None:
                on_failed(spec.name, err)
            continue
        if on_cached is not None:
            on_cached(spec.name, path)
        done.append((spec.name, path))
    if failed:
        cached = f" ({few([name for name, _ in done])})" if done else ""
        raise DownloadError(
            f"cached {len(done)} of {len(todo)} weights files{cached}; could not fetch {len(failed)}: "
            f"{few(failed)}; fetch those elsewhere and import each with "
            "`cnntrain download-weights --from FILE --arch NAME`"
        )
    return done
