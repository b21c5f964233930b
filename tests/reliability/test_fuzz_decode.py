"""Damaged image files of every format the scan reads: decoding returns an image or says why, never more.

A seeded generator damages small valid files the way downloads, disks and scrapers do (bits
flipped, the end cut off, a run of bytes overwritten, header fields smashed, two of those at once)
in JPEG, PNG, GIF, WebP, TIFF and BMP. For each, ``decode_image`` must return a 3 x H x W uint8
tensor or raise ``ImageDecodeError``: any other exception would end a training, and a case that
takes seconds would be a hang waiting for a bigger file. The scan over a folder of them must
finish and list exactly the files that do not decode. Every case is reproducible from its name
(format, number): the seed is the name. Images are 16-48 px, so the 2,040 cases take seconds.
"""

from __future__ import annotations

import io
import random
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnntrain.data import IMG_EXTENSIONS, decode_image, scan_samples
from cnntrain.data.decode import ImageDecodeError
from cnntrain.data.pool import POOL_THRESHOLD

CASES_PER_FORMAT = 250
#: Other cases than the decode test's; 540 in all, past the count at which the scan decodes in worker processes.
SCAN_CASES = range(1000, 1090)
#: Generous on purpose: a hang guard, not a benchmark (a case takes milliseconds).
SLOW_CASE_SECONDS = 5.0


def picture(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    """Gradients plus noise, so every encoder has real work (runs, tables, predictors) to damage."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) * 5 % 256], axis=-1)
    rgb = np.clip(rgb + rng.integers(-30, 31, rgb.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(rgb, "RGB")
    if mode == "I;16":
        return Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)  # mode I;16
    return image if mode == "RGB" else image.convert(mode)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def two_frames(fmt: str, **options) -> bytes:
    first, second = picture(20, 16, 1, "P"), picture(20, 16, 2, "P")
    return encoded(first, fmt, save_all=True, append_images=[second], duration=50, loop=0, **options)


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate
    return encoded(picture(24, 16, 3), "JPEG", exif=exif.tobytes())


# Small valid files per format, in the modes each format is met in (built once, on first use).
BASES: dict[str, Callable[[], list[bytes]]] = {
    "jpeg": lambda: [
        encoded(picture(24, 20, 0), "JPEG", quality=85),
        encoded(picture(33, 17, 1), "JPEG", progressive=True, optimize=True),
        encoded(picture(16, 40, 2, "L"), "JPEG"),
        encoded(picture(20, 20, 3, "CMYK"), "JPEG"),
        encoded(picture(32, 24, 4), "JPEG", subsampling=0, quality=95),
        exif_rotated(),
    ],
    "png": lambda: [
        encoded(picture(24, 20, 0), "PNG"),
        encoded(picture(20, 30, 1, "RGBA"), "PNG"),
        encoded(picture(30, 16, 2, "P"), "PNG", transparency=0),
        encoded(picture(16, 16, 3, "I;16"), "PNG"),
        encoded(picture(40, 20, 4, "1"), "PNG"),
        encoded(picture(20, 20, 5, "LA"), "PNG"),
    ],
    "gif": lambda: [
        encoded(picture(24, 20, 0, "P"), "GIF"),
        encoded(picture(30, 18, 1, "P"), "GIF", transparency=3),
        encoded(picture(16, 16, 2, "L"), "GIF", interlace=True),
        two_frames("GIF"),
    ],
    "webp": lambda: [
        encoded(picture(24, 20, 0), "WEBP", quality=70),
        encoded(picture(20, 30, 1, "RGBA"), "WEBP", lossless=True),
        encoded(picture(32, 16, 2), "WEBP", lossless=True),
        two_frames("WEBP"),
    ],
    "tiff": lambda: [
        encoded(picture(24, 20, 0), "TIFF"),
        encoded(picture(20, 24, 1), "TIFF", compression="tiff_lzw"),
        encoded(picture(30, 16, 2), "TIFF", compression="tiff_adobe_deflate"),
        encoded(picture(16, 20, 3), "TIFF", compression="packbits"),
        encoded(picture(24, 24, 4), "TIFF", compression="jpeg"),
        encoded(picture(16, 16, 5, "I;16"), "TIFF"),
        encoded(picture(40, 16, 6, "1"), "TIFF", compression="group4"),
        encoded(picture(20, 20, 7, "CMYK"), "TIFF"),
    ],
    "bmp": lambda: [
        encoded(picture(24, 20, 0), "BMP"),
        encoded(picture(21, 17, 1, "P"), "BMP"),
        encoded(picture(40, 16, 2, "1"), "BMP"),
        encoded(picture(20, 30, 3, "RGBA"), "BMP"),
        encoded(picture(18, 18, 4, "L"), "BMP"),
    ],
}
EXTENSIONS = {"jpeg": (".jpg", ".jpeg"), "png": (".png",), "gif": (".gif",), "webp": (".webp",),
              "tiff": (".tif", ".tiff"), "bmp": (".bmp",)}
_BUILT: dict[str, list[bytes]] = {}


def bases(fmt: str) -> list[bytes]:
    if fmt not in _BUILT:
        _BUILT[fmt] = BASES[fmt]()
    return _BUILT[fmt]


# --- where the header fields are ----------------------------------------------------------

Field = tuple[int, int, str]  # offset, size in bytes, byte order ("big" / "little")


def _jpeg_fields(data: bytes) -> list[Field]:
    """Segment lengths of every marker, and the frame header's precision, size and components."""
    fields: list[Field] = []
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker, length = data[pos + 1], int.from_bytes(data[pos + 2:pos + 4], "big")
        fields.append((pos + 2, 2, "big"))
        if marker in (0xC0, 0xC1, 0xC2):  # SOF: precision, height, width, component count
            fields += [(pos + 4, 1, "big"), (pos + 5, 2, "big"), (pos + 7, 2, "big"), (pos + 9, 1, "big"),
                       (pos + 11, 1, "big")]
        if marker == 0xDA:  # start of scan: what follows is entropy-coded data
            fields += [(pos + 4, 1, "big"), (pos + 6, 1, "big")]
            break
        pos += 2 + length
    return fields


def _png_fields(data: bytes) -> list[Field]:
    """IHDR's width, height, depth, colour type, compression, filter, interlace; chunk lengths."""
    fields: list[Field] = [(16, 4, "big"), (20, 4, "big")] + [(o, 1, "big") for o in range(24, 29)]
    pos = 8
    while pos + 8 <= len(data):
        fields.append((pos, 4, "big"))
        pos += 12 + int.from_bytes(data[pos:pos + 4], "big")
    return fields


def _gif_fields(data: bytes) -> list[Field]:
    """The screen's size and flags, and the first image's place, size and flags."""
    fields: list[Field] = [(6, 2, "little"), (8, 2, "little"), (10, 1, "little")]
    start = data.find(b"\x2c", 13)
    if start > 0:
        fields += [(start + 1 + 2 * i, 2, "little") for i in range(4)] + [(start + 9, 1, "little")]
    return fields


def _webp_fields(data: bytes) -> list[Field]:
    """The RIFF size, the first chunk's size, and the bytes that hold the frame's size."""
    return [(4, 4, "little"), (16, 4, "little")] + [(o, 2, "little") for o in range(20, 30, 2)]


def _tiff_fields(data: bytes) -> list[Field]:
    """The first IFD's offset, entry count and each entry's type, count and value."""
    order = "little" if data[:2] == b"II" else "big"
    ifd = int.from_bytes(data[4:8], order)
    fields: list[Field] = [(4, 4, order), (ifd, 2, order)]
    count = int.from_bytes(data[ifd:ifd + 2], order) if ifd + 2 <= len(data) else 0
    for i in range(min(count, 64)):
        entry = ifd + 2 + 12 * i
        fields += [(entry + 2, 2, order), (entry + 4, 4, order), (entry + 8, 4, order)]
    return fields


def _bmp_fields(data: bytes) -> list[Field]:
    """File size, pixel offset, header size, width, height, planes, bits, compression, sizes, colours."""
    return [(2, 4, "little"), (10, 4, "little"), (14, 4, "little"), (18, 4, "little"), (22, 4, "little"),
            (26, 2, "little"), (28, 2, "little"), (30, 4, "little"), (34, 4, "little"), (46, 4, "little")]


FIELDS: dict[str, Callable[[bytes], list[Field]]] = {
    "jpeg": _jpeg_fields, "png": _png_fields, "gif": _gif_fields, "webp": _webp_fields,
    "tiff": _tiff_fields, "bmp": _bmp_fields,
}


# --- the damage ---------------------------------------------------------------------------


def flip_bits(data: bytearray, rng: random.Random, fmt: str) -> str:
    count = rng.choice([1, 2, 4, 8, 32])
    for _ in range(count):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return f"{count} bits flipped"


def truncate(data: bytearray, rng: random.Random, fmt: str) -> str:
    if len(data) < 3:  # already cut to almost nothing by a first hit
        return "too short to cut again"
    keep = rng.choice([rng.randrange(1, min(len(data), 40)), rng.randrange(1, len(data))])
    del data[keep:]
    return f"cut to {keep} bytes"


def overwrite_run(data: bytearray, rng: random.Random, fmt: str) -> str:
    start, length = rng.randrange(len(data)), rng.choice([1, 4, 16, 64, 256])
    fill = rng.choice(["zeros", "ones", "noise"])
    end = min(start + length, len(data))
    data[start:end] = {"zeros": b"\0" * (end - start), "ones": b"\xff" * (end - start),
                       "noise": rng.randbytes(end - start)}[fill]
    return f"{end - start} bytes at {start} overwritten with {fill}"


def smash_field(data: bytearray, rng: random.Random, fmt: str) -> str:
    """An extreme value (0, 1, all ones, the top bit, anything) in a header field; a PNG's IHDR
    checksum is often fixed up, as a deliberate forgery would, so the decoder believes the field."""
    fields = [f for f in FIELDS[fmt](bytes(data)) if f[0] + f[1] <= len(data)]
    if not fields:
        return overwrite_run(data, rng, fmt)
    offset, size, order = rng.choice(fields)
    top = 1 << (8 * size)
    value = rng.choice([0, 1, top - 1, top >> 1, rng.randrange(top)])
    data[offset:offset + size] = value.to_bytes(size, order)
    note = f"field at {offset} ({size} bytes) set to {value}"
    if fmt == "png" and offset < 29 and rng.random() < 0.7 and len(data) >= 33:
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
        note += ", IHDR checksum fixed"
    return note


DAMAGE = (flip_bits, truncate, overwrite_run, smash_field)


@dataclass
class Case:
    name: str  # "<format>-<number>": also the seed
    fmt: str
    data: bytes
    damage: str

    def write(self, folder: Path) -> Path:
        extensions = EXTENSIONS[self.fmt]
        path = folder / f"{self.name}{extensions[int(self.name.rsplit('-', 1)[1]) % len(extensions)]}"
        path.write_bytes(self.data)
        return path


def damaged(fmt: str, number: int) -> Case:
    """Case ``number`` of ``fmt``: one of its bases, damaged once or twice, seeded by its name."""
    name = f"{fmt}-{number}"
    rng = random.Random(name)
    data = bytearray(rng.choice(bases(fmt)))
    hits = [rng.choice(DAMAGE) for _ in range(1 if rng.random() < 0.75 else 2)]
    notes = [hit(data, rng, fmt) for hit in hits]
    return Case(name, fmt, bytes(data), "; ".join(notes))


def outcome(path: Path) -> tuple[str, float]:
    """``"image"``, ``"refused"`` or what else happened (a test failure), and the seconds it took."""
    start = time.perf_counter()
    try:
        image = decode_image(path)
    except ImageDecodeError as exc:
        result = "refused" if exc.reason and "\n" not in str(exc) else f"refused without a one-line reason: {exc!r}"
    except BaseException as exc:  # noqa: BLE001 - exactly what must not happen
        result = f"raised {type(exc).__name__}: {exc}"
    else:
        ok = (isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.dim() == 3
              and image.shape[0] == 3 and min(image.shape[1:]) >= 1)
        result = "image" if ok else f"returned {type(image).__name__} {getattr(image, 'shape', '')}"
    return result, time.perf_counter() - start


# --- the tests ----------------------------------------------------------------------------


def test_the_fuzzer_covers_every_extension_the_folder_scan_accepts(tmp_path):
    covered = {ext for exts in EXTENSIONS.values() for ext in exts}
    assert set(IMG_EXTENSIONS) <= covered, f"fuzz {sorted(set(IMG_EXTENSIONS) - covered)} too"
    for fmt in BASES:  # every base is a valid file to begin with
        for i, data in enumerate(bases(fmt)):
            assert decode_image(Case(f"{fmt}-{i}", fmt, data, "").write(tmp_path)).shape[0] == 3


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("fmt", list(BASES))
def test_damaged_files_decode_to_an_image_or_raise_image_decode_error(tmp_path, fmt):
    """250 damaged files per format (1,500 in all): each an RGB uint8 image or ImageDecodeError."""
    wrong, slow, refused = [], [], 0
    for number in range(CASES_PER_FORMAT):
        case = damaged(fmt, number)
        result, seconds = outcome(case.write(tmp_path))
        refused += result == "refused"
        if result not in ("image", "refused"):
            wrong.append(f"{case.name} ({case.damage}): {result}")
        if seconds > SLOW_CASE_SECONDS:
            slow.append(f"{case.name} ({case.damage}): {seconds:.1f} s")
    assert not wrong, "\n".join(wrong)
    assert not slow, "\n".join(slow)
    assert refused > CASES_PER_FORMAT // 10  # the damage is real: a good share cannot be read


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_scan_of_a_folder_of_damaged_files_finishes_and_lists_every_bad_one(tmp_path):
    """540 damaged files of all six formats in one folder, scanned as training scans them (in worker
    processes, at this count): the bad list is exactly the files decode_image refuses, each with
    a reason, and the warning counts them all."""
    files = [damaged(fmt, number).write(tmp_path) for fmt in BASES for number in SCAN_CASES]
    assert len(files) > POOL_THRESHOLD
    refused = {str(path) for path in files if outcome(path)[0] == "refused"}
    result = scan_samples([(str(path), 0) for path in files], cache=False)
    assert {path for path, _ in result.bad} == refused
    assert all(reason for _, reason in result.bad)
    assert len(result.good) == len(files) - len(refused)
    warning = result.warning()
    assert warning is not None and f"skipping {len(refused):,} of {len(files):,} images" in warning
