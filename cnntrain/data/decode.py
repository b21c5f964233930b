"""Decoding image files to uint8 RGB tensors: the one definition used by scan, train, eval and predict.

Datasets scraped from the web or copied off phones hold every kind of file, so decoding is
defensive: a file that cannot be read raises :class:`ImageDecodeError` (a
:class:`~cnntrain.errors.DataError`) with a one-line reason, whatever Pillow raised inside;
sizes are checked from the header before any pixel is decoded, so a decompression bomb never
allocates; every colour mode comes out as 3-channel uint8; EXIF orientation is applied.

Limits are module constants so a user with unusual data can change them from Python
(``cnntrain.data.decode.MAX_IMAGE_PIXELS = None`` disables our check; Pillow's own
``Image.MAX_IMAGE_PIXELS`` then still applies).
"""

from __future__ import annotations

import os
import stat
import warnings

import numpy as np
import PIL
import torch
import torchvision
from PIL import ExifTags, Image, UnidentifiedImageError
from torchvision.transforms.v2.functional import pil_to_tensor

from cnntrain.errors import DataError, first_line

#: Largest image accepted, in pixels (width x height), checked from the header before decoding.
#: 64 MP covers every phone and most DSLRs; a PNG claiming 20000x20000 (400 MP, 1.2 GB as RGB)
#: is refused. ``None`` leaves only Pillow's own limit (``PIL.Image.MAX_IMAGE_PIXELS``, about
#: 89 MP, also enforced here); raising ours past it needs Pillow's raised too.
MAX_IMAGE_PIXELS: int | None = 64_000_000

#: Largest ratio of long to short side. Resizing the short side of a 100000x1 strip to 256 px
#: would allocate gigabytes; no photo comes near 100:1. ``None`` disables the check.
MAX_ASPECT_RATIO: float | None = 100.0

#: Colour that transparent areas are composited onto (RGBA, LA, P/L/RGB with transparency).
#: White, because transparent images in the wild are mostly logos and product shots on white.
BACKGROUND: tuple[int, int, int] = (255, 255, 255)

#: Longest path or reason (in characters) put into an error, a log line or an error row; a
#: longer one ends in ``...``. Every data module passes it to :func:`cnntrain.errors.first_line`.
TEXT_LIMIT = 300

_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageDecodeError(DataError):
    """An image file that cannot be decoded; ``path`` and a short ``reason`` for reports."""

    def __init__(self, path: str | os.PathLike, reason: str, *, transient: bool = False) -> None:
        self.path = os.fspath(path)
        self.reason = first_line(reason, TEXT_LIMIT)
        #: True when the cause may go away without the file changing (e.g. permissions),
        #: so a scan cache must not remember it.
        self.transient = transient
        super().__init__(f"cannot read image {first_line(self.path, TEXT_LIMIT)}: {self.reason}; "
                         "remove or replace the file")


def _reason(exc: BaseException) -> tuple[str, bool]:
    """A short, human reason for a decoding failure and whether it is transient."""
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"too large to decode safely ({exc})", False
    if isinstance(exc, UnidentifiedImageError):
        return "not an image Pillow can read (unknown or unsupported format, or not an image at all)", False
    if isinstance(exc, FileNotFoundError):
        return "file not found (deleted or moved?)", True
    if isinstance(exc, PermissionError):
        return "permission denied", True
    if isinstance(exc, MemoryError):
        return "out of memory while decoding", True
    if "truncated" in str(exc).lower():  # Pillow words it several ways depending on where the data ends
        return "file is truncated (an incomplete download or copy?)", False
    transient = isinstance(exc, OSError) and exc.errno is not None
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror, transient  # the path is reported separately
    return first_line(exc), transient


def decoder_id() -> str:
    """What a decoded image depends on besides its file, for caches of anything derived from it.

    The scan cache (verdicts) and the disk image cache (resized pixels) both store this and
    distrust entries made under another one: the Pillow, torch and torchvision versions, the
    CPU's vector path (resize kernels round differently), the size limits and the background
    that transparency is composited onto.
    """
    return (f"pillow {PIL.__version__} torch {torch.__version__} torchvision {torchvision.__version__} "
            f"cpu {torch.backends.cpu.get_cpu_capability()} "
            f"limits {MAX_IMAGE_PIXELS} {MAX_ASPECT_RATIO} background {BACKGROUND}")


def _check_geometry(path: str | os.PathLike, size: tuple[int, int]) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise ImageDecodeError(path, f"image has no pixels ({width}x{height})")
    if MAX_IMAGE_PIXELS is not None and width * height > MAX_IMAGE_PIXELS:
        raise ImageDecodeError(
            path,
            f"{width}x{height} image ({width * height / 1e6:.0f} megapixels) is over the "
            f"{MAX_IMAGE_PIXELS / 1e6:g}-megapixel limit (a decompression bomb, or raise "
            "cnntrain.data.decode.MAX_IMAGE_PIXELS)",
        )
    if MAX_ASPECT_RATIO is not None and max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise ImageDecodeError(
            path, f"{width}x{height} image is more than {MAX_ASPECT_RATIO:g}:1 (a strip, not a photo)"
        )


def _orientation(img: Image.Image) -> int:
    """EXIF orientation (1 when absent or unparsable: broken EXIF must not cost the image)."""
    try:
        value = img.getexif().get(ExifTags.Base.Orientation, 1)
        return int(value) if value in _ORIENTATION else 1
    except Exception:  # noqa: BLE001 - malformed EXIF comes in endless varieties
        return 1


def _to_8bit(img: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer and float greyscale to 8-bit L (``convert`` would clip to white).

    16-bit modes are divided by 257 (65535 -> 255, 32768 -> 127). Plain 32-bit ``I`` is
    ambiguous: values up to 255 are kept, up to 65535 treated as 16-bit, larger ones scaled
    by the maximum. Float is taken as [0, 1] when its maximum is at most 1, else as [0, 255].
    """
    arr = np.asarray(img)
    if img.mode == "F":
        arr = np.nan_to_num(arr.astype(np.float64))
        arr = arr * 255 if arr.max(initial=0) <= 1 else arr
    else:
        arr = arr.astype(np.int64)
        peak = int(arr.max(initial=0))
        if img.mode.startswith("I;16") or 255 < peak <= 65535:
            arr = arr // 257
        elif peak > 65535:
            arr = arr * 255 // peak
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparency is composited onto :data:`BACKGROUND`."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _to_8bit(img)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_image(path: str | os.PathLike) -> torch.Tensor:
    """Read an image file as a uint8 ``3 x H x W`` tensor: EXIF-rotated, RGB.

    Grey, 1-bit, palette, CMYK and 16-bit images come back as 3-channel uint8 (16-bit scaled
    by 1/257, not clipped); transparent areas (alpha, palette or colour-key transparency) are
    composited onto :data:`BACKGROUND` (white). The whole image is decoded, so a truncated
    file fails here and not silently as a grey strip. Size limits (:data:`MAX_IMAGE_PIXELS`,
    :data:`MAX_ASPECT_RATIO`) are checked from the header before decoding.

    Any failure raises :class:`ImageDecodeError` (a ``DataError``) naming the file with a
    one-line reason. Pillow's decompression-bomb warning is turned into that error and its
    other warnings (corrupt EXIF ...) are silenced; ``warnings`` filters are process-global,
    so do not call this from many threads at once (DataLoader workers are processes: fine).
    """
    try:
        st = os.stat(path)
    except OSError as e:
        reason, transient = _reason(e)
        raise ImageDecodeError(path, reason, transient=transient) from e
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block forever; a folder named x.jpg fails
        raise ImageDecodeError(path, "not a regular file")
    if st.st_size == 0:
        raise ImageDecodeError(path, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "corrupt EXIF" and the like: the outcome is what counts
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                _check_geometry(path, img.size)
                img.load()  # every pixel, before anything else reads from it
                method = _ORIENTATION.get(_orientation(img))
                if method is not None:
                    img = img.transpose(method)
                return pil_to_tensor(to_rgb(img))
    except ImageDecodeError:
        raise
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad files; all mean "unreadable"
        reason, transient = _reason(e)
        raise ImageDecodeError(path, reason, transient=transient) from e
