"""Crash-safe file writes, streamed hashing and byte counts, shared by every module that writes files.

A file that is half written (killed process, full disk, dropped connection) must never sit
under its final name: a later run would trust it. So every write goes to a temp file in the
same folder (same file system, so the rename is atomic), is flushed and fsynced, and only
then renamed onto the target; the folder is fsynced so the rename itself survives a crash.
``atomic_open`` is for writers that take a file object, ``atomic_path`` for those that insist on
a path (exporters); nobody hand-rolls temp files, so ``clean_stale_temps`` recognises them all.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_open",
    "atomic_path",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "clean_stale_temps",
    "exclusive_lock",
    "format_bytes",
    "fsync_dir",
    "is_temp_name",
    "sha256_file",
    "temp_name",
]

_TMP_MARK = ".tmp-"
_CHUNK = 1 << 20


def temp_name(target: str | os.PathLike[str]) -> str:
    """Hidden temp name for ``target``: ``.{name}.tmp-<random>`` (clean_stale_temps finds these)."""
    return f".{Path(target).name}{_TMP_MARK}{secrets.token_hex(4)}"


def is_temp_name(name: str) -> bool:
    """True for names made by ``temp_name`` (left behind only if a process was killed)."""
    return name.startswith(".") and _TMP_MARK in name


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Persist a folder's entries (a rename) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows, some network file systems
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _create_temp(folder: Path, target: Path) -> tuple[int, Path]:
    """Create a fresh temp file next to ``target``; os.open's 0o666 lets the umask apply as usual."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = folder / temp_name(target)
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # astronomically unlikely; pick another name
            continue


@contextmanager
def _published(target: Path, tmp: Path) -> Iterator[None]:
    """Rename ``tmp`` onto ``target`` when the block succeeds (then fsync the folder); on any
    exception, KeyboardInterrupt included, remove ``tmp`` and leave ``target`` untouched."""
    try:
        yield
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


@contextmanager
def atomic_open(
    path: str | os.PathLike[str], mode: str = "wb", *, encoding: str | None = None
) -> Iterator[IO[Any]]:
    """Open ``path`` for writing so it appears complete or not at all.

    Yields a file object on a temp file in the same folder. On normal exit the data is
    fsynced and renamed onto ``path``; on any exception (KeyboardInterrupt included) the
    temp file is removed and an existing ``path`` is left untouched.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open supports mode 'wb' or 'w', not {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(target.parent, target)
    if mode == "w" and encoding is None:
        encoding = "utf-8"
    with _published(target, tmp):
        try:
            f = os.fdopen(fd, mode, encoding=encoding)
        except BaseException:
            os.close(fd)
            raise
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path beside ``path`` for writers that need a file name, not a file object.

    The writer creates the file at the yielded path (the ONNX and TorchScript exporters do). On
    normal exit it is fsynced and renamed onto ``path``, and the folder fsynced; on any
    exception, or if nothing was written there, the temp file is removed and an existing
    ``path`` is left untouched (a writer that created nothing raises ``FileNotFoundError``).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / temp_name(target)
    with _published(target, tmp):
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())


@contextmanager
def exclusive_lock(path: str | os.PathLike[str], on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (created if missing) for the block.

    For what several runs share: one builder of a disk image cache at a time, and the
    read-merge-write of the scan and model-statistics caches, which would otherwise drop the
    entries another run wrote meanwhile. POSIX ``flock``, so the kernel releases the lock of a
    killed process and no run ever waits on a dead one. ``on_wait`` is called once if another
    process holds it. Lock files are never deleted: unlinking one while a process waits on it
    would let two hold "the" lock. Without ``flock`` (Windows, a file system that refuses
    locks, a folder that cannot be written) the block runs unlocked; the writes inside are
    atomic anyway, so the worst outcome is work done twice or a cache entry lost.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        handle = open(path, "a+b")  # held for the block, closed below
    except OSError:
        yield
        return
    with handle:
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None:
                    on_wait()
                fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:  # ENOLCK and the like: no locking here
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def atomic_write(path: str | os.PathLike[str], write_fn: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write_fn(binary_file)`` and publish the result atomically (e.g. ``torch.save``)."""
    with atomic_open(path, "wb") as f:
        write_fn(f)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_open(path, "w", encoding=encoding) as f:
        f.write(text)
    return Path(path)


def clean_stale_temps(folder: str | os.PathLike[str], older_than: float = 60.0) -> list[Path]:
    """Remove ``.*.tmp-*`` files left in ``folder`` by killed writers; return what was removed.

    Only temps not modified for ``older_than`` seconds go, so a writer that is still busy in
    another process (a download, another rank) is not pulled from under it. Pass 0 to remove all.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    now = time.time()
    for entry in entries:
        if not is_temp_name(entry.name):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            if older_than > 0 and now - entry.stat(follow_symlinks=False).st_mtime < older_than:
                continue
            os.unlink(entry.path)
        except FileNotFoundError:  # its writer finished or cleaned up meanwhile
            continue
        removed.append(Path(entry.path))
    return removed


def sha256_file(path: str | os.PathLike[str], chunk_size: int = _CHUNK) -> str:
    """Hex SHA-256 of a file, read in chunks so large weights never sit in memory whole."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def format_bytes(n: float) -> str:
    """A byte count for messages, in decimal units as ``--cache-max-gb`` counts them (1 MB = 10**6
    bytes): ``512 bytes``, ``4.2 KB``, ``3.4 MB``, ``1.25 GB``."""
    if n < 1e3:
        return f"{int(n)} bytes"
    if n < 1e6:
        return f"{n / 1e3:.1f} KB"
    if n < 1e9:
        return f"{n / 1e6:.1f} MB"
    return f"{n / 1e9:.2f} GB"
