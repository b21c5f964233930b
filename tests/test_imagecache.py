"""The decoded-image cache: same pixels as decoding, safe on disk, within its budget."""

from __future__ import annotations

import os
import pickle
import zlib
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from cnntrain.cli import app
from cnntrain.config import build_config
from cnntrain.data import (
    ImageDataset,
    Unreadable,
    collate_skipping,
    eval_transform,
    imagecache,
    make_loader,
    train_transform,
)
from cnntrain.data.decode import ImageDecodeError
from cnntrain.data.imagecache import build_image_cache, cache_key, open_disk_cache, resized_size
from cnntrain.data.transforms import CROP_RATIO
from cnntrain.errors import UsageError
from cnntrain.paths import image_cache_dir

IMG = 32
SHORT = int(IMG / CROP_RATIO)  # 36: what eval resizes to, and what the cache keeps


def _save(path: Path, size: tuple[int, int], mode: str = "RGB", orientation: int | None = None) -> str:
    g = torch.Generator().manual_seed(zlib.crc32(path.name.encode()))
    w, h = size
    pixels = torch.randint(0, 256, (h, w, 4), generator=g, dtype=torch.uint8).numpy()
    img = Image.fromarray(pixels, "RGBA").convert(mode)
    if orientation is None:
        img.save(path)
    else:
        exif = img.getexif()
        exif[0x0112] = orientation
        img.save(path, exif=exif)
    return str(path)


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> list[tuple[str, int]]:
    """Bigger and smaller than the cache's short side, odd modes, an EXIF rotation."""
    root = tmp_path_factory.mktemp("mixed")
    return [
        (_save(root / "big.jpg", (80, 50)), 0),
        (_save(root / "small.png", (20, 30)), 1),  # short side below 36: stored as is, never upscaled
        (_save(root / "rotated.jpg", (60, 40), orientation=6), 0),
        (_save(root / "grey.png", (70, 45), "L"), 1),
        (_save(root / "alpha.png", (45, 90), "RGBA"), 2),
        (_save(root / "exact.png", (36, 50)), 2),
        (_save(root / "wide.png", (121, 37)), 0),
    ]


def _build(samples, mode="ram", **kw):
    lines: list[str] = []
    kw = {"max_gb": None, "workers": 0, **kw}
    cache = build_image_cache(samples, short_side=SHORT, mode=mode, log=lines.append, **kw)
    return cache, lines


def _items(dataset):
    return [dataset[i] for i in range(len(dataset))]


@pytest.mark.parametrize("mode", ["ram", "disk"])
def test_eval_through_the_cache_is_bitwise_the_same(samples, mode):
    cache, lines = _build(samples, mode)
    assert cache.mode == mode and len(cache) == len(samples) and cache.missing == 0
    assert len(lines) == 1 and lines[0].startswith(f"image cache: {mode}") and "7 images" in lines[0]
    plain = _items(ImageDataset(samples, eval_transform(IMG)))
    cached = _items(ImageDataset(samples, eval_transform(IMG), cache=cache))
    for (a, la), (b, lb) in zip(plain, cached, strict=True):
        assert la == lb and a.dtype == b.dtype == torch.uint8 and torch.equal(a, b)
    # Stored at the resize rule's size: short side 36, or as decoded when already smaller.
    raw = _items(ImageDataset(samples))
    for i, (image, _) in enumerate(raw):
        stored = cache.get(i, samples[i][0])
        assert tuple(stored.shape[1:]) == resized_size(*image.shape[1:], SHORT)
        assert min(stored.shape[1:]) == min(SHORT, min(image.shape[1:]))
    assert tuple(cache.get(1, samples[1][0]).shape) == (3, 30, 20)
    assert tuple(cache.get(2, samples[2][0]).shape) == (3, 54, 36)  # EXIF rotation applied before the resize


def test_ram_and_disk_hold_identical_pixels(samples):
    ram, _ = _build(samples, "ram")
    disk, _ = _build(samples, "disk")
    assert ram.nbytes == disk.nbytes
    for i, (path, _) in enumerate(samples):
        assert torch.equal(ram.get(i, path), disk.get(i, path))


def test_train_transforms_run_on_cached_images_without_touching_the_cache(samples):
    cache, _ = _build(samples)
    before = cache.data.clone()
    torch.manual_seed(0)
    dataset = ImageDataset(samples, train_transform(IMG, ["trivialaugment", "erasing"]), cache=cache)
    for image, _label in _items(dataset) * 3:
        assert image.dtype == torch.uint8 and tuple(image.shape) == (3, IMG, IMG)
    assert torch.equal(cache.data, before)


def test_key_follows_files_and_resize(samples, tmp_path):
    paths = [p for p, _ in samples]
    key = cache_key(paths, SHORT)
    assert cache_key(list(paths), SHORT) == key
    assert cache_key(paths, SHORT + 1) != key
    assert cache_key(paths[::-1], SHORT) != key
    copy = tmp_path / "copy.png"
    copy.write_bytes(Path(paths[1]).read_bytes())
    other = [*paths[:-1], str(copy)]
    before = cache_key(other, SHORT)
    st = copy.stat()
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cache_key(other, SHORT) != before  # touched
    after_touch = cache_key(other, SHORT)
    with open(copy, "ab") as f:
        f.write(b"\0")
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same mtime, other size
    assert cache_key(other, SHORT) != after_touch


def test_interrupted_build_leaves_nothing_that_looks_complete(samples, monkeypatch):
    calls = []

    def dying(path):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed mid-fill
        return real(path)

    real = imagecache.decode_image
    monkeypatch.setattr(imagecache, "decode_image", dying)
    with pytest.raises(KeyboardInterrupt):
        _build(samples, "disk")
    key = cache_key([p for p, _ in samples], SHORT)
    assert open_disk_cache(key) is None
    assert not [p for p in image_cache_dir().iterdir() if p.is_dir()]  # its build folder is gone too


def test_leftovers_of_a_killed_build_are_never_reused(samples):
    key = cache_key([p for p, _ in samples], SHORT)
    root = image_cache_dir()
    # kill -9 mid-build: a temp folder (data, no index) and, from some older writer, a keyed
    # folder without its index. Neither may be read.
    stale = root / f".{key}.tmp-dead"
    half = root / key
    for folder in (stale, half):
        folder.mkdir(parents=True)
        (folder / "data.u8").write_bytes(b"\xff" * 100)
    os.utime(stale, (0, 0))
    os.utime(stale / "data.u8", (0, 0))
    assert open_disk_cache(key) is None
    cache, lines = _build(samples, "disk")
    assert cache.folder == half and "reused" not in lines[0]
    assert not stale.exists()  # a stale build folder is cleaned up
    plain = _items(ImageDataset(samples, eval_transform(IMG)))
    for (a, _), (b, _) in zip(plain, _items(ImageDataset(samples, eval_transform(IMG), cache=cache)), strict=True):
        assert torch.equal(a, b)


def test_complete_disk_cache_is_reused_read_only(samples, monkeypatch):
    first, _ = _build(samples, "disk")
    data = first.folder / "data.u8"
    before = (data.stat().st_ino, data.stat().st_mtime_ns, data.read_bytes())

    def no_decoding(*args, **kwargs):
        raise AssertionError("a complete cache must not be rebuilt")

    monkeypatch.setattr(imagecache, "_fill", no_decoding)
    for mode in ("disk", "auto"):  # auto prefers an existing disk cache over building one in RAM
        again, lines = _build(samples, mode)
        assert again.mode == "disk" and again.folder == first.folder and "reused" in lines[0]
    again.data[:10] = 0  # a private (copy-on-write) mapping: the file cannot change
    assert (data.stat().st_ino, data.stat().st_mtime_ns, data.read_bytes()) == before


def test_unreadable_images_are_reported_as_before(samples, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image at all")
    mixed = [samples[0], (str(bad), 1)]
    for mode in ("ram", "disk"):
        cache, lines = _build(mixed, mode)
        assert cache.missing == 1 and "1 unreadable" in lines[0]
        item = ImageDataset(mixed, eval_transform(IMG), skip_unreadable=True, cache=cache)[1]
        assert isinstance(item, Unreadable) and item.path == str(bad) and item.label == 1
        assert item.reason == ImageDataset(mixed, skip_unreadable=True)[1].reason
        with pytest.raises(ImageDecodeError, match="broken.jpg"):
            ImageDataset(mixed, cache=cache)[1]


def test_header_that_lies_falls_back_to_the_file(samples, monkeypatch):
    sizes = imagecache.estimate_bytes([p for p, _ in samples], SHORT)
    monkeypatch.setattr(imagecache, "estimate_bytes", lambda paths, short, workers=0: sizes - 3)
    cache, lines = _build(samples)
    assert "7 read from their files" in lines[0]
    plain = _items(ImageDataset(samples, eval_transform(IMG)))
    for (a, _), (b, _) in zip(plain, _items(ImageDataset(samples, eval_transform(IMG), cache=cache)), strict=True):
        assert torch.equal(a, b)


def test_auto_chooses_by_budget(samples):
    ram, _ = _build(samples, "auto")
    assert ram.mode == "ram" and ram.nbytes == int(imagecache.estimate_bytes([p for p, _ in samples], SHORT).sum())
    disk, lines = _build(samples, "auto", max_gb=0.000001)  # 1 kB
    assert disk.mode == "disk" and lines[0].startswith("image cache: disk in ")


def test_ram_over_budget_and_disk_without_space_are_usage_errors(samples, monkeypatch):
    with pytest.raises(UsageError, match="--cache disk.*--cache-max-gb"):
        _build(samples, "ram", max_gb=0.000001)
    monkeypatch.setattr(imagecache, "DISK_RESERVE", 10**18)
    with pytest.raises(UsageError, match="--cache disk: .*free"):
        _build(samples, "disk")
    cache, lines = _build(samples, "auto", max_gb=0.000001)
    assert cache is None and lines[0].startswith("image cache: off")


def test_none_and_bad_arguments(samples):
    assert _build(samples, "none") == (None, [])
    assert _build([], "ram") == (None, [])
    for kw in ({"mode": "memory"}, {"mode": "ram", "max_gb": 0}, {"mode": "ram", "workers": -1}):
        with pytest.raises(UsageError):
            _build(samples, **kw)
    cache, _ = _build(samples)
    with pytest.raises(UsageError, match="7 images"):
        ImageDataset(samples[:3], cache=cache)
    with pytest.raises(ValueError, match="another image"):
        ImageDataset(samples[::-1], cache=cache)[0]
    first, rest = cache.split(3)
    assert len(first) == 3 and len(rest) == 4
    assert torch.equal(rest.get(0, samples[3][0]), cache.get(3, samples[3][0]))
    tf = eval_transform(IMG)
    assert torch.equal(ImageDataset(samples[3:], tf, cache=rest)[1][0], ImageDataset(samples[3:], tf)[1][0])


def test_pickles_cheaply_for_workers(samples):
    ram, _ = _build(samples, "ram")
    disk, _ = _build(samples, "disk")
    assert ram.data.is_shared() and ram.entries.is_shared()
    assert len(bytes(ForkingPickler.dumps(ram))) < 4096  # shared memory travels by handle, not by value
    assert len(pickle.dumps(disk)) < 4096  # the folder name, not the mapped file
    clone = pickle.loads(pickle.dumps(disk))
    assert torch.equal(clone.get(0, samples[0][0]), disk.get(0, samples[0][0]))


def _batches(loader):
    return [(images, targets) for images, targets, _ in loader]


@pytest.mark.parametrize("mode", ["ram", "disk"])
def test_loader_workers_read_the_cache(samples, mode):
    cache, _ = _build(samples, mode, workers=2)
    def loader(c):
        return make_loader(ImageDataset(samples, eval_transform(IMG), skip_unreadable=True, cache=c), batch_size=3,
                           shuffle=False, workers=2, collate_fn=collate_skipping)
    for (a, ta), (b, tb) in zip(_batches(loader(None)), _batches(loader(cache)), strict=True):
        assert torch.equal(a, b) and torch.equal(ta, tb)


@pytest.mark.integration  # a spawned worker imports torch afresh
def test_spawned_workers_read_the_ram_cache(samples):
    cache, _ = _build(samples, "ram")
    dataset = ImageDataset(samples, eval_transform(IMG), cache=cache)
    loader = DataLoader(dataset, batch_size=len(samples), num_workers=1, multiprocessing_context="spawn",
                        collate_fn=collate_skipping)
    (images, _, _), = list(loader)
    assert torch.equal(images, torch.stack([image for image, _ in _items(ImageDataset(samples, eval_transform(IMG)))]))


def test_config_validates_cache_options():
    assert build_config({}, {"cache": "disk", "cache_max_gb": 2}).cache_max_gb == 2.0
    for bad, message in (({"cache": "memory"}, "--cache"), ({"cache_max_gb": 0}, "--cache-max-gb"),
                         ({"cache_max_gb": -1.5}, "--cache-max-gb")):
        with pytest.raises(UsageError, match=message):
            build_config({}, bad)


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["ram", "disk"])
def test_train_end_to_end_with_cache(runner, image_folder, tmp_path, mode):
    result = runner.invoke(app, ["train", "--data-path", str(image_folder), "--arch", "resnet18", "--no-pretrained",
                                 "--img-size", "32", "--epochs", "1", "--workers", "0", "--device", "cpu",
                                 "--batch-size", "8", "--cache", mode, "--project", str(tmp_path),
                                 *(["--gpu-decode"] if mode == "ram" else [])])
    assert result.exit_code == 0, result.output
    assert f"image cache: {mode}" in result.output and "36 images" in result.output
    assert ("--gpu-decode needs a CUDA device" in result.output) == (mode == "ram")  # falls back on the CPU
    assert (tmp_path / "exp" / "best.pt").is_file()
    if mode == "disk":
        assert len([p for p in image_cache_dir().iterdir() if p.is_dir()]) == 1


def test_train_rejects_bad_cache_options(runner, image_folder, tmp_path):
    for args in (["--cache", "memory"], ["--cache-max-gb", "0"]):
        result = runner.invoke(app, ["train", "--data-path", str(image_folder), *args, "--project", str(tmp_path)])
        assert result.exit_code == 2 and args[0] in result.output and "Traceback" not in result.output


# ---------------------------------------------------------------- --gpu-decode, run on the CPU


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> list[tuple[str, int]]:
    """Plain, grey and every EXIF orientation of JPEG, plus what must take the CPU path."""
    root = tmp_path_factory.mktemp("jpegs")
    items = [(_save(root / "plain.jpg", (70, 50)), 0), (_save(root / "grey.jpeg", (44, 60), "L"), 1),
             (_save(root / "cmyk.jpg", (50, 40), "CMYK"), 2), (_save(root / "png.png", (40, 52)), 0),
             (_save(root / "png_named.jpg", (48, 40)), 1)]
    Image.open(items[-1][0]).save(items[-1][0], format="PNG")  # a PNG behind a .jpg name
    items += [(_save(root / f"orient{o}.jpg", (64, 40), orientation=o), o % 3) for o in range(2, 9)]
    return items


def _gpu_path_batches(samples, transform, workers=0, seeded=False):
    from cnntrain.data.gpu_decode import EncodedImageDataset, collate_encoded
    from cnntrain.data.sampler import EpochSampler, SeededDataset
    from cnntrain.engine import Batcher

    batcher = Batcher(torch.device("cpu"), None)
    out = []
    for dataset_type, collate in ((ImageDataset, collate_skipping), (EncodedImageDataset, collate_encoded)):
        dataset = dataset_type(samples, transform, skip_unreadable=True)
        sampler = None
        if seeded:
            dataset, sampler = SeededDataset(dataset), EpochSampler(samples, shuffle=True, seed=3)
        loader = make_loader(dataset, batch_size=5, shuffle=False, workers=workers, sampler=sampler, collate_fn=collate)
        out.append([batcher(images, targets) for images, targets, _ in loader])
    return out


def test_gpu_decode_path_gives_the_cpu_batches(jpegs):
    from cnntrain.data.gpu_decode import Encoded, EncodedImageDataset

    kinds = [type(EncodedImageDataset(jpegs)[i]) for i in range(len(jpegs))]
    assert kinds[0] is kinds[1] is Encoded and kinds[2] is kinds[3] is kinds[4] is tuple  # CMYK, PNGs: CPU path
    assert all(k is Encoded for k in kinds[5:])  # EXIF orientation is applied on the device
    for transform, workers, seeded in ((eval_transform(IMG), 2, False),
                                       (train_transform(IMG, ["trivialaugment"]), 0, True)):
        cpu, device = _gpu_path_batches(jpegs, transform, workers, seeded)
        assert len(cpu) == len(device) == 3
        for (a, ta), (b, tb) in zip(cpu, device, strict=True):
            assert a.dtype == b.dtype == torch.uint8 and torch.equal(a, b) and torch.equal(ta, tb)


def test_gpu_decode_falls_back_to_the_cpu_decoder(jpegs, tmp_path, monkeypatch, caplog):
    from cnntrain.data import gpu_decode

    bad = tmp_path / "truncated.jpg"
    data = Path(jpegs[0][0]).read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # the header reads fine; the pixels do not
    samples = [*jpegs[:2], (str(bad), 2), *jpegs[5:7]]
    cpu, device = _gpu_path_batches(samples, eval_transform(IMG))
    (a, ta), = cpu
    (b, tb), = device
    assert len(ta) == 4 and torch.equal(a, b) and torch.equal(ta, tb)  # dropped like the CPU path drops it
    assert "truncated.jpg" in caplog.text
    real = gpu_decode._decode_jpegs
    monkeypatch.setattr(gpu_decode, "_decode_jpegs", lambda blobs, device: [None] + real(blobs[1:], device))
    _, again = _gpu_path_batches(jpegs[5:], eval_transform(IMG))  # orient2 refused "by the GPU": PIL decodes it
    cpu_again = _gpu_path_batches(jpegs[5:], eval_transform(IMG))[0]
    assert torch.equal(torch.cat([x for x, _ in again]), torch.cat([x for x, _ in cpu_again]))


def test_gpu_decode_needs_cuda():
    from cnntrain.data.gpu_decode import use_gpu_decode

    lines: list[str] = []
    assert use_gpu_decode(False, "cpu", lines.append) is False and lines == []
    assert use_gpu_decode(True, "cpu", lines.append) is False
    assert len(lines) == 1 and "CUDA" in lines[0]


def test_the_cache_line_says_what_the_resize_did():
    from cnntrain.data.imagecache import _size_note

    def entries(*sizes):
        return torch.tensor([[0, h, w, 0] for h, w in sizes], dtype=torch.int64)

    kept = "kept at their own size (short side up to 64px, within the 256px limit)"
    assert _size_note(entries((64, 64), (64, 80)), 256) == kept
    assert _size_note(entries((256, 300), (400, 256)), 256) == "shrunk to a short side of 256px"
    mixed = _size_note(entries((256, 300), (64, 64), (-1, 0)), 256)  # the unreadable one is not counted
    assert mixed.startswith("1 shrunk to a short side of 256px, 1 smaller")
