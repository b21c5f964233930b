"""Streamed, verified, atomic HTTP(S) downloads shared by weights and built-in datasets.

A download streams into a hidden temp file next to its target and is renamed into place only
once its length and SHA-256 are right, so a dropped connection or a killed process never leaves
a file that a later run would trust. Failures come out as one ``FetchError`` phrase; callers add
what the user can do about it.
"""

from __future__ import annotations

import hashlib
import http.client
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tqdm import tqdm

from cnntrain.fileio import atomic_open, format_bytes

_CHUNK = 1 << 18


class FetchError(Exception):
    """What went wrong in a download, before the caller adds what to do about it."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


def describe_failure(err: BaseException, url: str, timeout: float | None = None) -> str:
    """One phrase for an exception that urllib (or code built on it: torchvision's dataset
    downloaders) raised fetching ``url``, instead of its ``[Errno -2] Name or service not known``."""
    if isinstance(err, urllib.error.HTTPError):
        host = urllib.parse.urlparse(url).netloc or url
        return f"{host} answered HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        return _describe_unreachable(err.reason, url, timeout)
    return _describe_unreachable(err, url, timeout)


def _describe_unreachable(reason: object, url: str, timeout: float | None) -> str:
    """One phrase for a failure to connect (``URLError.reason`` or a raw socket error)."""
    host = urllib.parse.urlparse(url).netloc or url
    if isinstance(reason, ConnectionRefusedError):
        return f"connection refused by {host} (nothing is listening there)"
    if isinstance(reason, TimeoutError):
        return f"no answer from {host}" + (f" within {timeout:g} s" if timeout is not None else "")
    if isinstance(reason, socket.gaierror):
        return f"cannot resolve {host} (offline, or no DNS)"
    if isinstance(reason, FileNotFoundError):
        return f"{url} does not exist"
    if isinstance(reason, OSError) and reason.strerror:
        return f"cannot reach {host}: {reason.strerror}"
    return f"cannot reach {host}: {reason}"


def _content_length(response: Any) -> int | None:
    """Announced body size, or None when the server does not say (or says nonsense)."""
    value = response.headers.get("Content-Length")
    try:
        length = int(value) if value is not None else None
    except ValueError:
        return None
    return length if length is not None and length >= 0 else None


def fetch(url: str, dest: Path, *, sha256: str | None = None, size: int | None = None,
          timeout: float = 30.0, progress: bool = True) -> Path:
    """Stream ``url`` into ``dest`` atomically; raise ``FetchError`` saying what went wrong.

    ``sha256`` may be the full digest or a prefix (torch hub names carry 8+ hex digits);
    ``size`` is checked when known. ``timeout`` bounds the connect and every read, so a
    stalled server fails while a slow one does not. Nothing appears under ``dest`` unless
    it is complete and verified.
    """
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        _stream(url, dest, sha256=sha256.lower() if sha256 else None, size=size, timeout=timeout,
                progress=progress)
    except FetchError:
        raise
    except OSError as err:  # our side: full disk, read-only folder
        raise FetchError(f"cannot write into {dest.parent} ({err.strerror or err})") from err
    return dest


def _stream(url: str, dest: Path, *, sha256: str | None, size: int | None, timeout: float,
            progress: bool) -> None:
    host = urllib.parse.urlparse(url).netloc or url
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "cnntrain"})
        response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - http(s)/file only
    except urllib.error.HTTPError as err:
        err.close()
        gone = " (the file is not there: check the URL or --mirror)" if err.code in (404, 410) else ""
        raise FetchError(describe_failure(err, url) + gone) from err
    except ValueError as err:  # no scheme, malformed URL
        raise FetchError(f"{url!r} is not a usable URL ({err})") from err
    except (OSError, http.client.HTTPException) as err:  # unreachable, or a timeout or reset before the headers
        raise FetchError(describe_failure(err, url, timeout)) from err

    with response:
        length = size if size is not None else _content_length(response)
        digest = hashlib.sha256()
        received = 0
        bar = tqdm(
            total=length,
            unit="B",
            unit_scale=True,
            unit_divisor=1000,  # decimal, like format_bytes in the messages
            desc=dest.name,
            disable=None if progress else True,  # None: no bar off a terminal (CI logs)
            leave=False,
        )
        with bar, atomic_open(dest, "wb") as out:
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except TimeoutError as err:
                    raise FetchError(
                        f"the transfer from {host} stalled: no data for {timeout:g} s after {format_bytes(received)}"
                    ) from err
                except http.client.IncompleteRead as err:
                    received += len(err.partial)
                    raise FetchError(_truncated(received, length, host)) from err
                except (OSError, http.client.HTTPException) as err:
                    raise FetchError(f"the connection to {host} broke after {format_bytes(received)} ({err})") from err
                if not chunk:
                    break
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
            if length is not None and received != length:
                raise FetchError(_truncated(received, length, host))
            if received == 0:
                raise FetchError(f"{host} sent an empty file")
            actual = digest.hexdigest()
            if sha256 and not actual.startswith(sha256):
                raise FetchError(
                    f"the downloaded file failed its hash check (SHA-256 {actual[:12]}..., expected "
                    f"{sha256[:12]}...): the server or a proxy sent different content"
                )


def _truncated(received: int, length: int | None, host: str) -> str:
    total = f" of {format_bytes(length)}" if length is not None else ""
    return f"the download from {host} was cut short after {format_bytes(received)}{total}"
