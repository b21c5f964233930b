"""Label files (issue 13, part 3): a CSV of path,label[,split] instead of class folders, for train,
eval and check-data, giving the same splits, classes and checkpoints a folder gives."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from cli_helpers import invoke, one_line_error
from conftest import make_image_folder

from cnntrain.data import load_folder, load_label_file
from cnntrain.errors import DataError, UsageError
from cnntrain.train.splits import load_splits

TINY = ["--arch", "squeezenet1_1", "--no-pretrained", "--img-size", "32", "--batch-size", "4", "--workers", "0",
        "--epochs", "1", "--device", "cpu", "--quiet"]


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def flat(tmp_path_factory) -> tuple[Path, list[list[str]]]:
    """A class folder tree's images, listed as flat ``images/<class>_<n>.png`` rows of path,label."""
    root = tmp_path_factory.mktemp("labels")
    tree = make_image_folder(root / "tree", per_class=5, size=16)
    images = root / "images"
    images.mkdir()
    rows = []
    for file in sorted(tree.glob("*/*.png")):
        name = f"{file.parent.name}_{file.stem}.png"
        shutil.copy(file, images / name)
        rows.append([f"images/{name}", file.parent.name])
    return root, rows


def test_a_label_file_gives_the_folders_classes_and_stratified_split(flat):
    root, rows = flat
    splits = load_label_file(write_csv(root / "labels.csv", ["path", "label"], rows), val_split=0.2, seed=3)
    folder = load_folder(root / "tree", val_split=0.2, seed=3)
    assert splits.classes == folder.classes == ["blue", "green", "red"]
    assert (len(splits.train), len(splits.val)) == (len(folder.train), len(folder.val)) == (12, 3)
    assert sorted(label for _, label in splits.val) == [0, 1, 2]  # one held out per class
    assert all(Path(p).is_file() and Path(p).parent == root / "images" for p, _ in splits.train + splits.val)
    assert "label file" in splits.description and "seed 3" in splits.description


def test_a_split_column_decides_and_test_rows_stand_in_for_val(flat):
    root, rows = flat
    marked = [[*row, "val" if i % 5 == 0 else "train"] for i, row in enumerate(rows)]
    splits = load_label_file(write_csv(root / "split.csv", ["Path", "Label", "Split"], marked))
    assert (len(splits.train), len(splits.val)) == (12, 3)
    as_test = [[p, label, "TEST" if s == "val" else s] for p, label, s in marked]
    assert len(load_label_file(write_csv(root / "test.csv", ["path", "label", "split"], as_test)).val) == 3
    only_train = [[p, label, "train"] for p, label, _ in marked]
    assert len(load_label_file(write_csv(root / "train.csv", ["path", "label", "split"], only_train),
                               val_split=0.2).val) == 3  # split here, as a folder with only train/ is


def test_paths_are_relative_to_data_path_when_given(flat, tmp_path):
    root, rows = flat
    table = write_csv(tmp_path / "elsewhere.csv", ["label", "path"], [[label, p] for p, label in rows])
    splits = load_label_file(table, root, val_split=0)
    assert len(splits.train) == 15 and splits.root == str(root)
    with pytest.raises(DataError, match="none of the 15 images .* exists under"):
        load_label_file(table)  # relative to the CSV's own folder, where they are not


@pytest.mark.parametrize("header, rows, message", [
    (["file", "label"], [["a.png", "x"]], "no 'path' column .*'file', 'label'"),
    (["path", "class"], [["a.png", "x"]], "no 'label' column"),
    (["path", "label"], [["images/blue_000.png", ""]], "line 2: .* empty label"),
    (["path", "label"], [["images/blue_000.png", "blue"], ["", "red"]], "line 3: empty path"),
    (["path", "label", "split"], [["images/blue_000.png", "blue", "holdout"]], "split 'holdout' is not one of"),
    (["path", "label", "split"], [["images/blue_000.png", "blue", ""]], "an empty split is not one of"),
    (["path", "label"], [], "no rows"),
    (["path", "label", "split"], [["images/blue_000.png", "blue", "train"], ["images/red_000.png", "red", "val"]],
     "'red' has validation rows but no training rows"),
])
def test_what_is_wrong_with_a_label_file_is_said_by_line(flat, header, rows, message):
    root, _ = flat
    with pytest.raises(DataError, match=message):
        load_label_file(write_csv(root / "bad.csv", header, rows))


def test_a_listed_file_that_is_missing_is_skipped_with_the_unreadable_warning(flat, tmp_path):
    root, rows = flat
    table = write_csv(root / "missing.csv", ["path", "label"], [*rows, ["images/gone.png", "red"]])
    warnings: list[str] = []
    splits = load_splits(None, None, labels=str(table), val_split=0, seed=0, strict=False, warn=warnings.append)
    assert len(splits.train) == 15 and "gone.png: file not found" in warnings[0]
    with pytest.raises(DataError, match="cannot be read: .*gone.png"):
        load_splits(None, None, labels=str(table), val_split=0, seed=0, strict=True)


def test_labels_and_a_builtin_dataset_are_one_choice_too(tmp_path):
    from cnntrain.config import build_config

    with pytest.raises(UsageError, match="--labels .* not with --dataset"):
        build_config({}, {"labels": "x.csv", "dataset": "shapes"})
    from cnntrain.data import load_data

    with pytest.raises(UsageError, match="--labels .* not with --dataset"):
        load_data(None, "shapes", "x.csv")  # eval's choice of data comes here unvalidated by a config
    recipe = build_config({"dataset": "shapes"}, {"labels": "x.csv"})  # the command line's data replaces the file's
    assert (recipe.dataset, recipe.labels, recipe.img_size) == (None, "x.csv", 224)  # not shapes' 64 px


@pytest.mark.integration
def test_train_eval_and_check_data_read_the_same_label_file(flat, tmp_path):
    root, rows = flat
    table = write_csv(root / "cli.csv", ["path", "label"], rows)
    invoke("train", "--labels", str(table), "--val-split", "0.2", *TINY, "--project", str(tmp_path / "runs"))
    best = tmp_path / "runs" / "exp" / "best.pt"
    report = json.loads(invoke("eval", "--weights", str(best), "--format", "json", "--workers", "0",
                               "--device", "cpu").stdout)  # no data options: the checkpoint's own label file
    assert report["images"] == 3 and "label file" in report["data"]
    checked = json.loads(invoke("check-data", "--labels", str(table), "--val-split", "0.2", "--format", "json",
                                "--no-plot").stdout)
    assert (checked["splits"]["train"]["images"], checked["splits"]["val"]["images"]) == (12, 3)
    bad = invoke("train", "--labels", str(root / "nope.csv"), *TINY, code=1)
    assert "label file" in one_line_error(bad) and "does not exist" in one_line_error(bad)


def test_eval_falls_back_on_the_label_file_trained_on_only_while_it_is_there(tmp_path):
    from cnntrain.evaluation import DataChoice, data_of

    listed = write_csv(tmp_path / "list.csv", ["path", "label"], [["a.png", "cat"]])
    ckpt = {"config": {"labels": str(listed), "data_path": None}}
    said: list[str] = []
    assert data_of(ckpt, "best.pt", DataChoice(), said.append) == DataChoice(None, None, listed)
    assert "scoring on" in said[0] and str(listed) in said[0]
    assert data_of(ckpt, "best.pt", DataChoice(dataset="shapes")) == DataChoice(dataset="shapes")  # given wins
    listed.unlink()
    with pytest.raises(UsageError, match="no --labels given, and .* is not there any more; give --data-path DIR"):
        data_of(ckpt, "best.pt", DataChoice())
