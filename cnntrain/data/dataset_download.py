"""Verified downloads and safe archive extraction for the built-in datasets.

Both follow one rule: a file or folder appears under its final name only when it is complete and
checked. Work happens in a temporary sibling (same file system, so the final ``os.replace`` is
atomic) and any failure, including Ctrl-C, removes it.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from cnntrain.errors import DataError
from cnntrain.fileio import sha256_file
from cnntrain.http_download import FetchError, fetch


def verify_file(path: str | os.PathLike, sha256: str, size: int | None = None) -> bool:
    """True when ``path`` exists with the expected size (if given) and SHA-256.

    A file that vanishes while it is checked (another run that started at the same time finished
    with the archive and removed it) is simply not there: False, not an error."""
    path = Path(path)
    try:
        if not path.is_file():
            return False
        if size is not None and path.stat().st_size != size:
            return False
        return sha256_file(path) == sha256.lower()
    except FileNotFoundError:
        return False


def download_verified(
    url: str,
    dest: str | os.PathLike,
    sha256: str,
    size: int | None = None,
    timeout: float = 30.0,
    progress: bool = True,
    *,
    hint: str | None = None,
) -> Path:
    """Download ``url`` to ``dest``, checking size and SHA-256; return ``dest``.

    An existing ``dest`` that already verifies is returned without touching the network;
    otherwise ``dest`` is either absent or complete (see ``cnntrain.http_download.fetch``). A
    failure is one :class:`DataError` line; ``hint`` (default: download it by hand) is
    appended as the thing to do.
    """
    dest = Path(dest).expanduser()
    what_to_do = hint or f"check the network, or download {url} by hand and pass --data-path"
    if verify_file(dest, sha256, size):
        return dest
    try:
        return fetch(url, dest, sha256=sha256, size=size, timeout=timeout, progress=progress)
    except FetchError as e:
        raise DataError(f"download of {url} failed: {e.what}; {what_to_do}") from e


def publish_dir(tmp: Path, final: Path) -> Path:
    """Rename the finished folder ``tmp`` to ``final``; if another process won, keep theirs."""
    try:
        os.replace(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _check_member(member: tarfile.TarInfo, archive: Path) -> None:
    name = member.name
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts:
        raise DataError(
            f"archive {archive} contains an unsafe path {name!r}; refusing to extract it, "
            "delete the archive and download it again"
        )


def extract_tar(archive: str | os.PathLike, dest_dir: str | os.PathLike, top: str) -> Path:
    """Extract the folder ``top`` of a tar archive to ``dest_dir/top`` atomically; return it.

    Members with absolute paths or ``..`` are refused (DataError); links, devices and other
    non-regular members are skipped. Everything is extracted into a hidden temporary folder in
    ``dest_dir`` first, so ``dest_dir/top`` never exists half-written.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    final = dest_dir / top
    dest_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{top}.extract-", dir=dest_dir))
    try:
        try:
            with tarfile.open(archive, "r:*") as tf:
                members = tf.getmembers()
                for m in members:
                    _check_member(m, archive)
                members = [m for m in members if m.isfile() or m.isdir()]
                if hasattr(tarfile, "data_filter"):
                    tf.extractall(tmp, members=members, filter="data")
                else:  # pragma: no cover - Python without the 3.12 backport
                    tf.extractall(tmp, members=members)
        except (tarfile.TarError, EOFError, OSError) as e:
            if isinstance(e, FileNotFoundError) and final.is_dir():
                return final  # another run extracted it first and removed the archive: the folder is whole
            raise DataError(
                f"cannot extract {archive}: {e}; delete it and download it again"
            ) from e
        if not (tmp / top).is_dir():
            raise DataError(
                f"archive {archive} has no top-level folder {top}/; delete it and download it again"
            )
        return publish_dir(tmp / top, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
