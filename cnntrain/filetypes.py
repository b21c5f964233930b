"""What a file is, told from its first bytes: for messages about a file that is not what was asked for.

``--weights photo.jpg`` should hear "it starts like a JPEG image", not torch's unpickling error.
Checked only after loading failed, so a real checkpoint never pays for it.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

#: What a file is, by its first bytes.
_SIGNATURES = (
    (b"\xff\xd8\xff", "it starts like a JPEG image"),
    (b"\x89PNG\r\n\x1a\n", "it starts like a PNG image"),
    (b"GIF87a", "it starts like a GIF image"),
    (b"GIF89a", "it starts like a GIF image"),
    (b"II*\x00", "it starts like a TIFF image"),
    (b"MM\x00*", "it starts like a TIFF image"),
    (b"%PDF", "it starts like a PDF document"),
    (b"\x1f\x8b", "it is gzip-compressed, an archive rather than a torch.save file"),
    (b"\x89HDF\r\n\x1a\n", "it is an HDF5 file, as Keras saves weights"),
    (b"\x93NUMPY", "it is a NumPy .npy array"),
)


def _as_text(head: bytes) -> str | None:
    """``head`` as text if it reads as UTF-8 without control characters, else None."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 3:  # not just a character cut in half at the end
            return None
        text = head[: err.start].decode("utf-8")
    return text if text.strip() and all(c.isprintable() or c in "\t\r\n\f" for c in text) else None


def _zip_kind(path: Path) -> str | None:
    """A ZIP archive torch could not load: a TorchScript export, another archive, or (None) damaged."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return None  # a torch.save file cut short, most likely
    if any(n.endswith("/constants.pkl") for n in names):
        return "it is a TorchScript export, as `cnntrain export` writes"
    if not any(n.endswith("/data.pkl") for n in names):
        return "it is a ZIP archive that torch.save did not write"
    return None


def describe_file(path: Path) -> str | None:
    """What a file that torch could not load seems to be instead, in words; None if unclear."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return None
    for magic, kind in _SIGNATURES:
        if head.startswith(magic):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "it starts like a WebP image"
    if head[8:10] == b'{"' and int.from_bytes(head[:8], "little") < path.stat().st_size:
        return "it is a safetensors file, not a torch.save one"
    if path.suffix.lower() == ".onnx":
        return "it is named like an ONNX model"
    if head.startswith(b"PK\x03\x04"):
        return _zip_kind(path)
    text = _as_text(head)
    if text is None:
        return None
    if text.lstrip().lower().startswith(("<!doctype html", "<html")):
        return "it is an HTML page, perhaps saved in place of the download"
    return "it is a text file"
