"""Decompression bombs are refused from the header; every colour mode and EXIF
orientation decodes to sensible 3-channel uint8, the same way for train, eval and predict."""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from cnntrain.data import ImageDataset, decode_image, eval_transform, scan_samples
from cnntrain.data import decode as decode_mod
from cnntrain.errors import DataError

# ---------------------------------------------------------------- decompression bombs


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A tiny valid PNG whose IHDR claims ``width x height`` (CRC fixed, so Pillow trusts it)."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format="PNG")
    png = bytearray(buf.getvalue())
    assert png[12:16] == b"IHDR"
    png[16:24] = struct.pack(">II", width, height)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    path.write_bytes(bytes(png))
    return path


def refuse_pixel_decoding(monkeypatch) -> None:
    """From now on, fail loudly if any image data is decoded: a bomb must be refused from its header."""

    def refuse(self, *args, **kwargs):
        raise AssertionError("image data was decoded; the size check must come first")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    monkeypatch.setattr(Image.Image, "load", refuse)


# 9000x9000 is under Pillow's own limit (ours catches it); 10000x10000 is in Pillow's warning
# range; 20000x20000 is past Pillow's error limit.
@pytest.mark.parametrize("width,height", [(20000, 20000), (10000, 10000), (9000, 9000)])
def test_decompression_bomb_is_refused_from_its_header(tmp_path, monkeypatch, width, height):
    bomb = png_claiming(tmp_path / "bomb.png", width, height)
    refuse_pixel_decoding(monkeypatch)
    assert bomb.stat().st_size < 200
    start = time.perf_counter()
    with pytest.raises(DataError) as info:
        decode_image(bomb)
    assert time.perf_counter() - start < 1.0
    message = str(info.value)
    assert "\n" not in message and "bomb.png" in message and ("large" in message or "limit" in message)


def test_decompression_bomb_is_a_bad_file_in_the_scan(tmp_path, monkeypatch):
    bomb = png_claiming(tmp_path / "bomb.png", 20000, 20000)
    refuse_pixel_decoding(monkeypatch)
    result = scan_samples([(str(bomb), 0)], workers=0)
    assert result.good == [] and result.bad[0][0] == str(bomb)


def test_pixel_limit_is_configurable_and_can_be_off(tmp_path, monkeypatch):
    path = tmp_path / "photo.png"
    Image.new("RGB", (40, 30)).save(path)
    monkeypatch.setattr(decode_mod, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DataError, match="40x30 image"):
        decode_image(path)
    monkeypatch.setattr(decode_mod, "MAX_IMAGE_PIXELS", None)
    assert tuple(decode_image(path).shape) == (3, 30, 40)


def test_extreme_aspect_ratio_strip_is_refused(tmp_path, monkeypatch):
    strip = png_claiming(tmp_path / "strip.png", 100_000, 10)  # resizing its short side would explode
    refuse_pixel_decoding(monkeypatch)
    with pytest.raises(DataError, match="100000x10"):
        decode_image(strip)


# ---------------------------------------------------------------- colour modes and EXIF orientation


def pixel(t: torch.Tensor, x: int, y: int) -> list[int]:
    return t[:, y, x].tolist()


def check_rgb(t: torch.Tensor, size: tuple[int, int]) -> None:
    assert t.dtype == torch.uint8 and tuple(t.shape) == (3, size[1], size[0])


def test_grey_and_one_bit_images_decode_to_rgb(tmp_path):
    Image.new("L", (6, 4), 77).save(tmp_path / "l.png")
    t = decode_image(tmp_path / "l.png")
    check_rgb(t, (6, 4))
    assert pixel(t, 0, 0) == [77, 77, 77]
    one = Image.new("1", (6, 4), 0)
    one.putpixel((1, 1), 1)
    one.save(tmp_path / "one.png")
    t = decode_image(tmp_path / "one.png")
    check_rgb(t, (6, 4))
    assert pixel(t, 0, 0) == [0, 0, 0] and pixel(t, 1, 1) == [255, 255, 255]


def test_transparency_is_composited_onto_white(tmp_path):
    assert decode_mod.BACKGROUND == (255, 255, 255)
    # RGBA: left half fully transparent (hidden colour green), right half red at 50 % alpha
    rgba = Image.new("RGBA", (8, 4), (0, 255, 0, 0))
    rgba.paste((255, 0, 0, 128), (4, 0, 8, 4))
    rgba.save(tmp_path / "rgba.png")
    t = decode_image(tmp_path / "rgba.png")
    check_rgb(t, (8, 4))
    assert pixel(t, 0, 0) == [255, 255, 255]  # not the hidden green, not black
    r, g, b = pixel(t, 6, 2)
    assert r == 255 and 120 <= g <= 135 and 120 <= b <= 135
    # LA: transparent half white, opaque half its grey
    la = Image.new("LA", (8, 4), (30, 0))
    la.paste((200, 255), (4, 0, 8, 4))
    la.save(tmp_path / "la.png")
    t = decode_image(tmp_path / "la.png")
    assert pixel(t, 0, 0) == [255, 255, 255] and pixel(t, 6, 0) == [200, 200, 200]


def test_palette_images_with_and_without_transparency(tmp_path):
    rgb = Image.new("RGB", (8, 4), (0, 0, 255))
    rgb.paste((255, 0, 0), (4, 0, 8, 4))
    pal = rgb.quantize(colors=2)
    pal.save(tmp_path / "p.png")
    t = decode_image(tmp_path / "p.png")
    check_rgb(t, (8, 4))
    assert pixel(t, 0, 0) == [0, 0, 255] and pixel(t, 6, 0) == [255, 0, 0]
    blue_index = pal.getpixel((0, 0))
    pal.save(tmp_path / "pt.png", transparency=blue_index)
    with Image.open(tmp_path / "pt.png") as check:
        assert check.mode == "P" and "transparency" in check.info
    t = decode_image(tmp_path / "pt.png")
    assert pixel(t, 0, 0) == [255, 255, 255] and pixel(t, 6, 0) == [255, 0, 0]


def test_cmyk_tiff_and_jpeg_decode_to_rgb(tmp_path):
    cmyk = Image.new("CMYK", (8, 4), (0, 255, 255, 0))  # red
    cmyk.paste((0, 0, 0, 0), (4, 0, 8, 4))  # white
    cmyk.save(tmp_path / "cmyk.tif")
    t = decode_image(tmp_path / "cmyk.tif")
    check_rgb(t, (8, 4))
    assert pixel(t, 0, 0) == [255, 0, 0] and pixel(t, 6, 0) == [255, 255, 255]
    cmyk.save(tmp_path / "cmyk.jpg", quality=95)
    r, g, b = pixel(decode_image(tmp_path / "cmyk.jpg"), 1, 1)
    assert r > 200 and g < 60 and b < 60


def test_sixteen_bit_is_scaled_not_white(tmp_path):
    arr = np.array([[0, 32768, 65535, 1000]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as check:
        assert check.mode.startswith("I")
    t = decode_image(tmp_path / "deep.png")
    check_rgb(t, (4, 1))
    values = t[0, 0].tolist()
    assert values[0] == 0 and abs(values[1] - 128) <= 1 and values[2] == 255 and values[3] == 3
    assert torch.equal(t[0], t[1]) and torch.equal(t[1], t[2])


def oriented_jpeg(path: Path, orientation: int) -> Path:
    """40x20 stored pixels, left half red and right half blue, with an EXIF orientation tag."""
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))
    exif = img.getexif()
    exif[0x0112] = orientation
    img.save(path, exif=exif, quality=95)
    return path


def is_red(rgb: list[int]) -> bool:
    return rgb[0] > 200 and rgb[2] < 60


@pytest.mark.parametrize("orientation,red_at", [(6, "top"), (8, "bottom"), (1, "left")])
def test_exif_orientation_same_in_decode_and_dataset(tmp_path, orientation, red_at):
    path = oriented_jpeg(tmp_path / f"o{orientation}.jpg", orientation)
    direct = decode_image(path)
    via_eval, _ = ImageDataset([(str(path), 0)], eval_transform(16))[0]  # eval and predict preset
    assert tuple(direct.shape) == ((3, 20, 40) if orientation == 1 else (3, 40, 20))
    for t in (direct, via_eval):
        h, w = t.shape[1:]
        probe = {"top": (w // 2, 1), "bottom": (w // 2, h - 2), "left": (1, h // 2)}[red_at]
        opposite = {"top": (w // 2, h - 2), "bottom": (w // 2, 1), "left": (w - 2, h // 2)}[red_at]
        assert is_red(pixel(t, *probe)) and not is_red(pixel(t, *opposite))


@pytest.mark.parametrize("exif", [
    b"Exif\x00\x00MM\x00*garbage",  # truncated IFD
    b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x02\x00\x00\x00\x02A\x00\x00\x00",  # orientation "A"
    b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01\x00\x09\x00\x00",  # orientation 9
])
def test_broken_exif_does_not_cost_the_image(tmp_path, exif):
    path = tmp_path / "exif.jpg"
    Image.new("RGB", (10, 6), (9, 9, 9)).save(path, exif=exif)
    assert tuple(decode_image(path).shape) == (3, 6, 10)
