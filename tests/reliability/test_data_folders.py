"""Odd folder layouts give a clear error or work; tiny datasets never crash."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from cnntrain.data import (
    ImageDataset,
    collate_skipping,
    eval_transform,
    load_folder,
    make_loader,
    scan_classes,
    scan_samples,
    split_samples,
)
from cnntrain.errors import DataError


def image(path: Path, colour=(120, 60, 30), fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (14, 12), colour).save(path, format=fmt)
    return path


def folder(root: Path, counts: dict[str, int]) -> Path:
    for cls, n in counts.items():
        for i in range(n):
            image(root / cls / f"{i:03d}.png", colour=(i * 20 % 256, 80, 160))
    return root


# ---------------------------------------------------------------- folder layouts


def test_empty_class_folder_is_named(tmp_path):
    folder(tmp_path, {"daisy": 3, "rose": 3})
    (tmp_path / "tulip").mkdir()
    for load in (scan_classes, load_folder):
        with pytest.raises(DataError) as info:
            load(tmp_path)
        assert "'tulip'" in str(info.value) and "no images" in str(info.value)
        assert "daisy" not in str(info.value) and "\n" not in str(info.value)


def test_no_class_folders_says_what_is_expected(tmp_path):
    image(tmp_path / "flat1.jpg")  # images straight in the root: a common mistake
    with pytest.raises(DataError, match="no class folders.*expected one sub-folder per class"):
        load_folder(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="expected one sub-folder per class"):
        load_folder(empty)


def test_missing_path_says_what_is_expected(tmp_path):
    with pytest.raises(DataError) as info:
        load_folder(tmp_path / "nope")
    message = str(info.value)
    assert "does not exist" in message and "expected one sub-folder per class" in message
    with pytest.raises(DataError, match="is a file, not a folder"):
        load_folder(image(tmp_path / "one.png"))


@pytest.mark.timeout(30)
def test_symlink_loop_is_an_error_not_an_endless_walk(tmp_path):
    folder(tmp_path, {"a": 2, "b": 2})
    try:
        os.symlink(tmp_path / "a", tmp_path / "a" / "again", target_is_directory=True)
        os.symlink(tmp_path, tmp_path / "b" / "root", target_is_directory=True)
    except (OSError, NotImplementedError):
        pytest.skip("cannot create symlinks here")
    with pytest.raises(DataError, match="symlink loop"):
        load_folder(tmp_path)
    os.unlink(tmp_path / "a" / "again")
    with pytest.raises(DataError, match="symlink loop"):
        load_folder(tmp_path)


def test_dangling_symlink_is_a_bad_file_not_a_crash(tmp_path):
    folder(tmp_path, {"a": 2})
    try:
        os.symlink(tmp_path / "gone.jpg", tmp_path / "a" / "link.jpg")
    except (OSError, NotImplementedError):
        pytest.skip("cannot create symlinks here")
    _, samples = scan_classes(tmp_path)
    result = scan_samples(samples, workers=0)
    assert len(result.good) == 2 and result.bad[0][0].endswith("link.jpg")


def test_non_ascii_and_spaces_in_paths_work_end_to_end(tmp_path):
    root = tmp_path / "données"
    image(root / "tulipe rouge" / "été 1.jpg", colour=(200, 20, 20))
    image(root / "tulipe rouge" / "été 2.jpg", colour=(200, 20, 20))
    image(root / "日本 の 花" / "桜 1.png", colour=(250, 200, 220))
    image(root / "日本 の 花" / "桜 2.png", colour=(250, 200, 220))
    splits = load_folder(root, val_split=0.5, seed=0)
    assert splits.classes == ["tulipe rouge", "日本 の 花"]
    assert len(splits.train) == len(splits.val) == 2
    everything = splits.train + splits.val
    assert any(p.endswith("été 1.jpg") for p, _ in everything)
    first = scan_samples(everything, workers=0)
    second = scan_samples(everything, workers=0)  # through the JSON cache and back
    assert len(first.good) == 4 and not first.bad and second.cached == 4 and second.good == first.good
    images = [ImageDataset(everything, eval_transform(8))[i][0] for i in range(4)]
    assert all(t.shape == (3, 8, 8) and t.dtype == torch.uint8 for t in images)


# ---------------------------------------------------------------- tiny datasets


def test_one_image_per_class_all_goes_to_train(tmp_path):
    folder(tmp_path, {"a": 1, "b": 1, "c": 1})
    splits = load_folder(tmp_path, val_split=0.2)
    assert len(splits.train) == 3 and splits.val == []
    summary = splits.summary()
    val_line = next(line for line in summary.splitlines() if line.startswith("val:"))
    assert "0 images" in val_line and "nothing held out" in val_line


def test_class_without_validation_images_is_named(tmp_path):
    folder(tmp_path, {"big": 10, "lonely": 1})
    splits = load_folder(tmp_path, val_split=0.2, seed=1)
    assert {label for _, label in splits.val} == {0}
    assert {label for _, label in splits.train} == {0, 1}
    val_line = next(line for line in splits.summary().splitlines() if line.startswith("val:"))
    assert "no val images of class lonely" in val_line


def test_single_class_keeps_a_training_image_at_any_split(tmp_path):
    folder(tmp_path, {"only": 2})
    splits = load_folder(tmp_path, val_split=0.9)
    assert splits.num_classes == 1 and len(splits.train) == 1 and len(splits.val) == 1
    classes, samples = scan_classes(tmp_path)
    train, val = split_samples(classes, samples, 0.99)
    assert len(train) >= 1  # a class never loses its last training image


@pytest.mark.parametrize("collate", [None, collate_skipping])
def test_fewer_images_than_one_batch_give_one_batch(tmp_path, collate):
    folder(tmp_path, {"a": 2, "b": 1})
    _, samples = scan_classes(tmp_path)
    dataset = ImageDataset(samples, eval_transform(8), skip_unreadable=collate is not None)
    loader = make_loader(dataset, batch_size=64, shuffle=True, workers=0, collate_fn=collate)
    batches = list(loader)
    assert len(loader) == 1 and len(batches) == 1
    assert batches[0][0].shape == (3, 3, 8, 8) and sorted(batches[0][1].tolist()) == [0, 0, 1]
