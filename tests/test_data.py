"""cnntrain.data: scanning, splits, decoding, transforms, loaders, shapes, downloads.

Everything is generated in tmp_path; downloads come from a loopback HTTP server.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import os
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnntrain.data import (
    BUILTIN_DATASETS,
    DatasetSplits,
    ImageDataset,
    Normalize,
    decode_image,
    download_verified,
    eval_transform,
    extract_tar,
    load_builtin,
    load_folder,
    make_loader,
    scan_classes,
    train_transform,
)
from cnntrain.data import builtins as builtins_mod
from cnntrain.data import shapes as shapes_mod
from cnntrain.errors import DataError, UsageError, first_line
from cnntrain.paths import cache_root, datasets_dir


def write_image(path: Path, size=(12, 10), colour=(200, 30, 30), mode="RGB", fmt=None, **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, colour)
    if mode == "I;16":
        img = Image.fromarray(np.full(size[::-1], 40000, dtype=np.uint16))
    elif mode != "RGB":
        img = img.convert(mode)
    img.save(path, format=fmt, **save)
    return path


def make_folder(root: Path, counts: dict[str, int], ext=".png") -> Path:
    for cls, n in counts.items():
        for i in range(n):
            write_image(root / cls / f"{i:03d}{ext}", colour=(i * 7 % 256, 50, 100))
    return root


# ---------------------------------------------------------------- scanning


def test_scan_sorts_classes_and_ignores_hidden_and_non_images(tmp_path):
    make_folder(tmp_path, {"zebra": 2, "apple": 1, "mango": 1})
    (tmp_path / ".ipynb_checkpoints" / "x").mkdir(parents=True)
    write_image(tmp_path / ".ipynb_checkpoints" / "a.png")
    write_image(tmp_path / "__MACOSX" / "apple" / "a.png")
    write_image(tmp_path / "apple" / "._a.jpg", fmt="PNG")
    write_image(tmp_path / "apple" / ".hidden" / "b.png")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "apple" / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "apple" / "notes.txt").write_text("x")
    (tmp_path / "LICENSE.txt").write_text("x")
    write_image(tmp_path / "mango" / "UPPER.JPG", fmt="JPEG")
    write_image(tmp_path / "mango" / "nested" / "deep" / "Mixed.Jpeg", fmt="JPEG")
    write_image(tmp_path / "zebra" / "Z.PNG", fmt="PNG")

    classes, samples = scan_classes(tmp_path)

    assert classes == ["apple", "mango", "zebra"]
    names = {(Path(p).relative_to(tmp_path).as_posix(), label) for p, label in samples}
    assert names == {
        ("apple/000.png", 0),
        ("mango/000.png", 1), ("mango/UPPER.JPG", 1), ("mango/nested/deep/Mixed.Jpeg", 1),
        ("zebra/000.png", 2), ("zebra/001.png", 2), ("zebra/Z.PNG", 2),
    }
    assert samples == sorted(samples, key=lambda s: (s[1], s[0]))
    assert all(isinstance(p, str) for p, _ in samples)


@pytest.mark.parametrize("case", ["missing", "file", "no_classes", "no_images"])
def test_scan_errors(tmp_path, case):
    target = tmp_path / "data"
    if case == "file":
        write_image(target, fmt="PNG")
    elif case == "no_classes":
        write_image(target / "loose.png")
    elif case == "no_images":
        (target / "a").mkdir(parents=True)
        (target / "a" / "readme.txt").write_text("x")
    with pytest.raises(DataError) as err:
        scan_classes(target)
    msg = str(err.value)
    assert "\n" not in msg and str(target) in msg
    if case == "no_classes":
        assert "one sub-folder per class" in msg


def test_scan_names_the_empty_class(tmp_path):
    make_folder(tmp_path, {"cat": 2, "dog": 2})
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DataError, match="'empty_class'"):
        scan_classes(tmp_path)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_scan_symlink_loop_is_an_error(tmp_path):
    make_folder(tmp_path, {"cat": 1, "dog": 1})
    os.symlink(tmp_path / "cat", tmp_path / "cat" / "again")
    with pytest.raises(DataError, match="symlink loop"):
        scan_classes(tmp_path)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_scan_follows_symlinks_that_are_not_loops(tmp_path):
    make_folder(tmp_path / "store", {"x": 2})
    (tmp_path / "data" / "cat").mkdir(parents=True)
    os.symlink(tmp_path / "store" / "x", tmp_path / "data" / "cat" / "linked")
    make_folder(tmp_path / "data", {"dog": 1})
    classes, samples = scan_classes(tmp_path / "data")
    assert classes == ["cat", "dog"]
    assert [label for _, label in samples] == [0, 0, 1]


# ---------------------------------------------------------------- splits


def test_split_is_deterministic_and_stratified(tmp_path):
    make_folder(tmp_path, {"a": 20, "b": 10, "c": 2, "d": 1})
    s1 = load_folder(tmp_path, val_split=0.2, seed=3)
    s2 = load_folder(tmp_path, val_split=0.2, seed=3)
    assert (s1.train, s1.val) == (s2.train, s2.val)
    assert isinstance(s1, DatasetSplits) and s1.classes == ["a", "b", "c", "d"]
    val_counts = np.bincount([label for _, label in s1.val], minlength=4).tolist()
    assert val_counts == [4, 2, 1, 0]  # c (2 images) still gets one; d (1 image) stays in train
    train_counts = np.bincount([label for _, label in s1.train], minlength=4).tolist()
    assert train_counts == [16, 8, 1, 1]
    assert not set(s1.train) & set(s1.val)
    assert "split 80/20" in s1.description and "seed 3" in s1.description
    summary = s1.summary()
    assert "train:" in summary and "26 images" in summary and "7 images" in summary


def test_split_changes_with_seed_and_val_split_zero(tmp_path):
    make_folder(tmp_path, {"a": 30, "b": 30})
    s0 = load_folder(tmp_path, val_split=0.2, seed=0)
    s1 = load_folder(tmp_path, val_split=0.2, seed=1)
    assert set(s0.val) != set(s1.val) and len(s0.val) == len(s1.val) == 12
    none = load_folder(tmp_path, val_split=0)
    assert none.val == [] and len(none.train) == 60


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, "0.1", True])
def test_bad_val_split_is_a_usage_error(tmp_path, bad):
    make_folder(tmp_path, {"a": 2})
    with pytest.raises(UsageError, match=r"\[0, 1\)"):
        load_folder(tmp_path, val_split=bad)


@pytest.mark.parametrize("val_name", ["val", "valid", "test"])
def test_presplit_folders_are_used_as_is(tmp_path, val_name):
    make_folder(tmp_path / "train", {"cat": 3, "dog": 2})
    make_folder(tmp_path / val_name, {"cat": 1, "dog": 1})
    splits = load_folder(tmp_path, val_split=0.5)
    assert splits.classes == ["cat", "dog"]
    assert len(splits.train) == 5 and len(splits.val) == 2
    assert all(f"{os.sep}train{os.sep}" in p for p, _ in splits.train)
    assert all(f"{os.sep}{val_name}{os.sep}" in p for p, _ in splits.val)
    assert "pre-split" in splits.description and f"{val_name}/" in splits.description


def test_presplit_prefers_val_over_test(tmp_path):
    make_folder(tmp_path / "train", {"cat": 1})
    make_folder(tmp_path / "test", {"cat": 2})
    make_folder(tmp_path / "val", {"cat": 3})
    assert len(load_folder(tmp_path).val) == 3


def test_presplit_class_mismatch_names_the_class(tmp_path):
    make_folder(tmp_path / "train", {"cat": 1, "dog": 1, "emu": 1})
    make_folder(tmp_path / "val", {"cat": 1, "dog": 1})
    with pytest.raises(DataError, match="emu"):
        load_folder(tmp_path)


# ---------------------------------------------------------------- decoding


@pytest.mark.parametrize("mode,fmt", [("RGB", "PNG"), ("L", "PNG"), ("P", "PNG"), ("RGBA", "PNG"),
                                      ("CMYK", "JPEG"), ("RGB", "JPEG"), ("I;16", "PNG")])
def test_image_dataset_returns_uint8_rgb(tmp_path, mode, fmt):
    path = write_image(tmp_path / f"img.{fmt.lower()}", size=(12, 10), mode=mode, fmt=fmt)
    ds = ImageDataset([(str(path), 4)])
    image, label = ds[0]
    assert label == 4 and len(ds) == 1
    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 10, 12)
    if fmt == "PNG" and mode in ("RGB", "RGBA"):
        assert image[:, 0, 0].tolist() == [200, 30, 30]
    if mode == "I;16":  # scaled from 16 bits, not clipped to white
        assert image[:, 0, 0].tolist() == [40000 // 257] * 3


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (10, 200, 10))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif)
    assert tuple(decode_image(path).shape) == (3, 40, 20)


def test_unreadable_image_is_a_data_error(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match="broken.jpg"):
        decode_image(bad)


def test_image_dataset_applies_transform(tmp_path):
    path = write_image(tmp_path / "a.png", size=(50, 30))
    image, _ = ImageDataset([(str(path), 0)], transform=eval_transform(16))[0]
    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 16, 16)


# ---------------------------------------------------------------- transforms


@pytest.mark.parametrize("aug", [(), ("trivialaugment", "erasing"), ("randaugment",), ("none",)])
def test_train_transform_gives_square_uint8(aug):
    torch.manual_seed(0)
    x = torch.randint(0, 256, (3, 45, 70), dtype=torch.uint8)
    y = train_transform(32, aug)(x)
    assert y.dtype == torch.uint8 and tuple(y.shape) == (3, 32, 32)


def test_eval_transform_is_deterministic_square_uint8():
    x = torch.randint(0, 256, (3, 45, 70), dtype=torch.uint8)
    t = eval_transform(32)
    y = t(x)
    assert y.dtype == torch.uint8 and tuple(y.shape) == (3, 32, 32)
    assert torch.equal(y, t(x))
    assert torch.equal(train_transform(32, ["none"])(x), y)


@pytest.mark.parametrize("aug", [("mixup",), ("none", "erasing"), ("trivialaugment", "randaugment")])
def test_bad_augmentations_are_usage_errors(aug):
    with pytest.raises(UsageError, match="trivialaugment|randaugment|none"):
        train_transform(32, aug)


def test_train_transform_crop_scale():
    x = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    assert train_transform(16, scale=(0.5, 1.0))(x).shape == (3, 16, 16)
    with pytest.raises(UsageError, match="scale"):
        train_transform(16, scale=(0.0, 1.0))


def test_normalize_constant_image():
    mean, std = (0.5, 0.25, 0.0), (0.5, 0.25, 1.0)
    x = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    y = Normalize(mean, std)(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert torch.allclose(y[:, 0], torch.tensor(1.0)) and torch.allclose(y[:, 1], torch.tensor(3.0))
    assert torch.allclose(y[:, 2], torch.tensor(1.0))
    zero = Normalize(mean, std)(torch.zeros(3, 2, 2, dtype=torch.uint8))
    assert zero.shape == (3, 2, 2) and torch.allclose(zero[0], torch.tensor(-1.0))
    cl = Normalize(mean, std)(x.contiguous(memory_format=torch.channels_last))
    assert cl.is_contiguous(memory_format=torch.channels_last)
    assert Normalize(mean, std).state_dict() == {}


# ---------------------------------------------------------------- loaders


class _Range(torch.utils.data.Dataset):
    def __init__(self, n, random_aug=False):
        self.n, self.random_aug = n, random_aug

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        noise = torch.rand(()) if self.random_aug else torch.tensor(0.0)
        return torch.tensor(i), noise


def test_loader_same_seed_same_first_batch():
    def first(seed):
        return next(iter(make_loader(_Range(50), batch_size=8, shuffle=True, workers=0, seed=seed)))[0]

    assert torch.equal(first(7), first(7))
    assert not torch.equal(first(7), first(8))


def test_loader_sees_every_sample_once_and_keeps_the_tail():
    loader = make_loader(_Range(23), batch_size=5, shuffle=True, workers=0, seed=1)
    for _ in range(2):
        seen = torch.cat([batch for batch, _ in loader])
        assert sorted(seen.tolist()) == list(range(23))
    assert len(loader) == 5
    big = make_loader(_Range(3), batch_size=64, shuffle=False, workers=0)
    assert [b.tolist() for b, _ in big] == [[0, 1, 2]]


def test_loader_workers_reproduce_augmentation():
    def epochs(seed):
        loader = make_loader(_Range(12, random_aug=True), batch_size=4, shuffle=True, workers=2, seed=seed)
        assert loader.persistent_workers and not loader.pin_memory and loader.drop_last is False
        return [[(i.tolist(), r.tolist()) for i, r in loader] for _ in range(2)]

    first, second = epochs(5), epochs(5)
    assert first == second  # same order and same random draws in the workers
    assert first[0] != first[1]  # but each epoch gets fresh ones


def test_loader_rejects_bad_options():
    with pytest.raises(UsageError):
        make_loader(_Range(4), batch_size=0, shuffle=False, workers=0)
    sampler = torch.utils.data.SequentialSampler(range(4))
    with pytest.raises(UsageError):
        make_loader(_Range(4), batch_size=2, shuffle=True, workers=0, sampler=sampler)
    loader = make_loader(_Range(4), batch_size=2, shuffle=False, workers=0, sampler=sampler, device="cuda")
    assert loader.pin_memory and loader.sampler is sampler


# ---------------------------------------------------------------- built-ins


def test_first_line_escapes_text_and_takes_an_exceptions_first_line():
    assert first_line("two\nlines\r.jpg") == "two\\nlines\\r.jpg"  # a path stays whole and recognisable
    assert first_line("x" * 400, 300) == "x" * 297 + "..."
    assert first_line(RuntimeError("  \n worker died  \nTraceback ...\n")) == "worker died"
    assert first_line(ValueError("bad\nmore"), with_type=True) == "ValueError: bad"
    assert first_line(KeyError(), with_type=True) == first_line(KeyError()) == "KeyError"
    assert first_line(OSError("y" * 50), 20, with_type=True) == "OSError: yyyyyyyy..."


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("CNNTRAIN_HOME", str(tmp_path))
    assert cache_root() == tmp_path
    assert datasets_dir() == tmp_path / "datasets" and datasets_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("CNNTRAIN_HOME")
    assert cache_root() == Path.home() / ".cache" / "cnntrain"


def test_unknown_builtin_lists_the_builtins(tmp_path):
    with pytest.raises(UsageError) as err:
        load_builtin("imagenet", root=tmp_path)
    assert all(name in str(err.value) for name in BUILTIN_DATASETS)


def test_shapes_generation_is_deterministic_and_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("CNNTRAIN_HOME", str(tmp_path / "home"))
    splits = load_builtin("shapes")
    root = tmp_path / "home" / "datasets" / "shapes-v1"
    assert splits.classes == ["circle", "cross", "square", "star", "triangle"]
    assert len(splits.train) == 5 * 160 and len(splits.val) == 5 * 40
    assert sorted(p.name for p in (tmp_path / "home" / "datasets").iterdir()) == ["shapes-v1"]
    sample = root / "train" / "star" / "0007.png"
    first_bytes, first_mtime = sample.read_bytes(), sample.stat().st_mtime_ns
    image = decode_image(sample)
    assert image.shape == (3, 64, 64) and image.dtype == torch.uint8

    def boom(*a, **k):
        raise AssertionError("regenerated")

    monkeypatch.setattr(shapes_mod, "draw_shape", boom)
    again = load_builtin("shapes")  # cached: must not draw anything
    assert again.train == splits.train and sample.stat().st_mtime_ns == first_mtime
    monkeypatch.undo()

    other = shapes_mod.generate_shapes(tmp_path / "copy", train_per_class=8, val_per_class=0)
    assert (other / "train" / "star" / "0007.png").read_bytes() == first_bytes


def test_shapes_replaces_a_stale_or_partial_copy(tmp_path):
    dest = tmp_path / "shapes"
    (dest / "train" / "circle").mkdir(parents=True)  # e.g. from an older design: no marker
    shapes_mod.generate_shapes(dest, train_per_class=2, val_per_class=1)
    assert len(list((dest / "train" / "circle").iterdir())) == 2
    shapes_mod.generate_shapes(dest, train_per_class=3, val_per_class=1)  # other arguments
    assert len(list((dest / "train" / "circle").iterdir())) == 3
    assert sorted(os.listdir(tmp_path)) == ["shapes"]


# ---------------------------------------------------------------- downloads


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(tmp_path):
    """Serve tmp_path/www on 127.0.0.1 (a free port); yields (folder, base URL)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield www, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_download_verified_good_file(http_root, tmp_path):
    www, url = http_root
    payload = os.urandom(3 * (1 << 20) + 5)
    (www / "blob.bin").write_bytes(payload)
    dest = tmp_path / "out" / "blob.bin"
    sha = hashlib.sha256(payload).hexdigest()
    assert download_verified(f"{url}/blob.bin", dest, sha, len(payload), progress=False) == dest
    assert dest.read_bytes() == payload
    assert os.listdir(dest.parent) == ["blob.bin"]
    (www / "blob.bin").unlink()  # a verified file is reused without the network
    assert download_verified(f"{url}/blob.bin", dest, sha, len(payload), progress=False) == dest


@pytest.mark.parametrize("problem", ["sha", "size", "404"])
def test_download_verified_failures_leave_nothing(http_root, tmp_path, problem):
    www, url = http_root
    payload = b"x" * 1000
    (www / "blob.bin").write_bytes(payload)
    sha = hashlib.sha256(payload).hexdigest()
    size = len(payload)
    name = "blob.bin"
    if problem == "sha":
        sha = "0" * 64
    elif problem == "size":
        size = 999
    else:
        name = "missing.bin"
    out = tmp_path / "out"
    with pytest.raises(DataError) as err:
        download_verified(f"{url}/{name}", out / "blob.bin", sha, size, progress=False)
    assert "\n" not in str(err.value) and "by hand" in str(err.value)
    assert os.listdir(out) == []


def _tgz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _png_bytes(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_flowers_downloads_extracts_and_splits(http_root, tmp_path, monkeypatch):
    www, url = http_root
    members = {"flower_photos/LICENSE.txt": b"CC-BY"}
    for cls in ("daisy", "roses"):
        for i in range(5):
            members[f"flower_photos/{cls}/{i}.jpg"] = _png_bytes((i * 40, 10, 10))
    archive = _tgz(members)
    (www / "flower_photos.tgz").write_bytes(archive)
    monkeypatch.setattr(builtins_mod, "FLOWERS_URL", f"{url}/flower_photos.tgz")
    monkeypatch.setattr(builtins_mod, "FLOWERS_SIZE", len(archive))
    monkeypatch.setattr(builtins_mod, "FLOWERS_SHA256", hashlib.sha256(archive).hexdigest())
    root = tmp_path / "cache"
    with pytest.raises(DataError, match="downloading is off"):
        load_builtin("flowers", root=root, download=False)
    splits = load_builtin("flowers", val_split=0.2, root=root)
    assert splits.classes == ["daisy", "roses"]
    assert len(splits.train) == 8 and len(splits.val) == 2
    assert sorted(os.listdir(root)) == ["flower_photos"]  # archive and temp folders are gone
    assert load_builtin("flowers", val_split=0.2, root=root, download=False).val == splits.val


def test_extract_tar_refuses_unsafe_paths(tmp_path):
    archive = tmp_path / "evil.tgz"
    archive.write_bytes(_tgz({"top/ok.txt": b"1", "top/../../escape.txt": b"2"}))
    with pytest.raises(DataError, match="unsafe path"):
        extract_tar(archive, tmp_path / "out", "top")
    assert os.listdir(tmp_path / "out") == [] and not (tmp_path / "escape.txt").exists()


def test_cifar_is_exported_to_png_folders(tmp_path, monkeypatch):
    import torchvision

    class FakeCIFAR10:
        classes = ["airplane", "cat"]

        def __init__(self, root, train=True, download=True):
            n = 6 if train else 2
            self.data = np.full((n, 32, 32, 3), 9, dtype=np.uint8)
            self.targets = [i % 2 for i in range(n)]

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    splits = load_builtin("cifar10", root=tmp_path)
    assert splits.classes == ["airplane", "cat"]
    assert len(splits.train) == 6 and len(splits.val) == 2
    assert (tmp_path / "cifar10-png" / "test" / "cat" / "00001.png").is_file()
    assert decode_image(splits.val[0][0]).shape == (3, 32, 32)
