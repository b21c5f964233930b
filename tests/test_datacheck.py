"""cnntrain check-data and train's leakage line: planted copies are found, nothing else is.

The images are drawn here rather than taken from conftest's colour squares: those differ in
colour and a grey bar, which perceptual hashes (computed on grey thumbnails) cannot tell apart.
Each image is a seeded random field (coarse blobs under finer texture), so two unrelated
images differ in about half of the 128 hash bits, as photos do.
"""

from __future__ import annotations

import importlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnntrain.cli import app
from cnntrain.data import load_folder
from cnntrain.datacheck import NEAR_THRESHOLD, findings, hashing, report
from cnntrain.datacheck.findings import check_data, exact_leaks, leak_line, near_pairs

CLASSES = ("cat", "dog", "fox")


def textured(seed: int, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    fine = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    return Image.blend(coarse, fine, 0.35)


def make_split_folder(root: Path, train: int = 8, val: int = 3, seed: int = 0) -> Path:
    """root/{train,val}/{cat,dog,fox}/<class><n>.jpg, every image a different picture."""
    n = seed * 1000
    for split, count in (("train", train), ("val", val)):
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                textured(n).save(folder / f"{name[0]}{i}.jpg", quality=90)
                n += 1
    return root


def _open(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A pre-split folder with one planted copy of each kind; returns (root, {(pair, kind)}, bad file)."""
    root = make_split_folder(tmp_path_factory.mktemp("planted") / "data")
    t, v = root / "train", root / "val"
    expected: set[tuple[frozenset[str], str]] = set()

    def plant(original: Path, copy: Path, kind: str, make=None) -> None:
        if make is None:
            shutil.copyfile(original, copy)
        else:
            make(_open(original)).save(copy, **({"quality": 90} if copy.suffix == ".jpg" else {}))
        expected.add((frozenset({str(original), str(copy)}), kind))

    plant(t / "cat/c0.jpg", t / "cat/c0_copy.jpg", "exact")  # a duplicate within train
    plant(t / "cat/c1.jpg", t / "cat/c1_small.png", "near", lambda im: im.resize((48, 48), Image.LANCZOS))
    plant(t / "dog/d0.jpg", t / "dog/d0_q40.jpg", "near", lambda im: _reencoded(im, 40))
    plant(t / "dog/d1.jpg", t / "dog/d1_crop.jpg", "near", lambda im: im.crop((2, 2, 62, 62)))
    plant(t / "fox/f0.jpg", v / "fox/f0_leak.jpg", "exact")  # leaks
    plant(t / "fox/f1.jpg", v / "fox/f1_big.jpg", "near", lambda im: im.resize((96, 96), Image.BICUBIC))
    plant(t / "cat/c2.jpg", t / "dog/c2.jpg", "exact")  # label conflicts: within train, and across splits
    plant(t / "dog/d2.jpg", v / "cat/d2_crop.jpg", "near", lambda im: im.crop((3, 0, 64, 64)))
    bad = t / "fox/broken.jpg"
    bad.write_bytes((t / "fox/f2.jpg").read_bytes()[:200])  # a truncated download
    return root, expected, bad


def _reencoded(im: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    im.save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    return _open(buffer)  # type: ignore[arg-type]


def _pairs(matches) -> set[tuple[frozenset[str], str]]:
    return {(frozenset({m.a.path, m.b.path}), m.kind) for m in matches}


def test_check_data_finds_every_planted_copy_and_no_other_pair(planted):
    root, expected, bad = planted
    result = check_data(load_folder(root))
    found = _pairs(result.matches)
    true = found & expected
    precision, recall = len(true) / len(found), len(true) / len(expected)
    assert (precision, recall) == (1.0, 1.0), (found - expected, expected - found)
    assert all(m.a.split == "train" and m.b.split == "val" for m in result.leaks)
    assert {Path(m.b.path).name for m in result.leaks} == {"f0_leak.jpg", "f1_big.jpg", "d2_crop.jpg"}
    assert {Path(m.b.path).name for m in result.conflicts} == {"c2.jpg", "d2_crop.jpg"}
    assert {Path(m.b.path).name for m in result.duplicates} == {"c0_copy.jpg", "c1_small.png", "d0_q40.jpg",
                                                              "d1_crop.jpg", "c2.jpg"}
    assert [(u.path, u.split) for u in result.unreadable] == [(str(bad), "train")]
    assert "truncated" in result.unreadable[0].reason
    train = result.splits[0]
    assert train.per_class == {"cat": 10, "dog": 11, "fox": 8}  # readable images; broken.jpg left out
    assert (train.width.low, train.width.high) == (48, 64)  # c1_small.png; the crops are 60 and 61 wide
    assert result.splits[1].width.high == 96 and result.near_threshold == NEAR_THRESHOLD


def test_unrelated_images_are_far_apart_and_the_threshold_sits_between(planted):
    """The margins behind the defaults, on the hashes alone: the farthest planted copy against the
    closest unrelated pair, in bits and in colour."""
    root, expected, _ = planted
    splits = load_folder(root)
    paths = [p for p, _ in splits.train + splits.val]
    hashes = hashing.hash_files(paths, pictures=True)
    paths = [p for p in paths if p in hashes.pictures]  # broken.jpg is not
    shown = [hashes.pictures[p] for p in paths]
    pairs = near_pairs(findings.signatures(shown), 127)  # every pair, with its distance
    colours = findings.colour_distances(shown, pairs)
    near_planted = {p for p, kind in expected if kind == "near"}
    bits = {frozenset({paths[i], paths[j]}): (d, c) for (i, j, d), c in zip(pairs, colours)}
    planted_far = max(bits[p][0] for p in near_planted)
    planted_colour = max(bits[p][1] for p in near_planted)
    exact = {p for p, kind in expected if kind == "exact"}
    unrelated = [v for p, v in bits.items() if p not in near_planted | exact and v[0] > 0]
    assert planted_far <= NEAR_THRESHOLD < min(d for d, _ in unrelated)
    assert planted_colour <= findings.COLOUR_LIMIT


def test_the_same_shapes_in_other_colours_are_not_near_duplicates(tmp_path):
    """Perceptual hashes see grey only: a red and a blue print of one pattern hash alike, and the
    colour thumbnails keep them apart (a shape at the same place in another colour is another picture)."""
    grey = np.asarray(textured(7).convert("L"), dtype=np.float64)
    for split, name, weights in (("train", "cat", (1, 0.3, 0.3)), ("val", "dog", (0.3, 0.3, 1))):
        folder = tmp_path / "d" / split / name
        folder.mkdir(parents=True)
        Image.fromarray(np.stack([grey * w for w in weights], axis=-1).astype(np.uint8)).save(folder / "x.png")
        other = tmp_path / "d" / split / ("dog" if name == "cat" else "cat")  # both splits need both classes
        other.mkdir()
        textured(8 if split == "train" else 9).save(other / "y.png")
    splits = load_folder(tmp_path / "d")
    pictures = hashing.hash_files([p for p, _ in splits.train + splits.val], pictures=True).pictures
    red, blue = pictures[str(tmp_path / "d/train/cat/x.png")], pictures[str(tmp_path / "d/val/dog/x.png")]
    [(_, _, bits)] = near_pairs(findings.signatures([red, blue]), 127)
    assert bits <= NEAR_THRESHOLD and findings.colour_distances([red, blue], [(0, 1, bits)])[0] > 40
    assert check_data(splits).matches == []


def test_near_pairs_are_every_pair_within_the_threshold():
    rng = np.random.default_rng(1)
    sig = rng.integers(0, 2**63, (700, 2), dtype=np.uint64)  # more rows than one block
    sig[650] = sig[3]
    sig[650, 0] ^= np.uint64(0b1011)  # 3 bits from row 3
    sig[699] = sig[650]  # 0 bits from row 650
    bits = np.unpackbits(sig.view(np.uint8), axis=1)  # an independent count: 128 bits per row
    distance = (bits[:, None, :] != bits[None, :, :]).sum(axis=-1)
    brute = {(i, j, int(distance[i, j])) for i, j in zip(*np.nonzero(distance <= 40)) if i < j}
    assert set(near_pairs(sig, 40)) == brute and len(brute) >= 2
    assert (3, 650, 3) in near_pairs(sig, 3) and (650, 699, 0) in near_pairs(sig, 0)


def test_hashes_are_cached_per_file_and_a_changed_file_is_read_again(tmp_path):
    root = make_split_folder(tmp_path / "d", train=2, val=1)
    paths = sorted(str(p) for p in root.rglob("*.jpg"))
    first = hashing.hash_files(paths, pictures=True)
    assert first.read == len(paths) and len(first.pictures) == len(paths)
    again = hashing.hash_files(paths, pictures=True)
    assert again.read == 0 and again.content == first.content and again.pictures == first.pictures
    assert hashing.hash_files(paths).read == 0  # the content hashes check-data stored serve train too
    textured(99).save(paths[0], quality=90)
    changed = hashing.hash_files(paths, pictures=True)
    assert changed.read == 1 and changed.content[paths[0]] != first.content[paths[0]]


def test_leak_line_counts_validation_copies_of_training_images(planted, tmp_path):
    root, _, _ = planted
    line = leak_line(load_folder(root))
    assert line is not None and "\n" not in line
    assert line.startswith("warning: 1 of 12 validation images is an exact copy of a training image (train/val")
    leaks = exact_leaks(load_folder(root))
    assert [m.b.path for m in leaks] == [str(root / "val/fox/f0_leak.jpg")]
    assert leak_line(load_folder(root), leaks) == line  # what train passes when it keeps the pairs too
    clean = make_split_folder(tmp_path / "clean", train=2, val=1, seed=1)
    assert leak_line(load_folder(clean)) is None
    assert leak_line(load_folder(clean / "train", val_split=0)) is None  # no validation split: nothing leaks


def test_train_warns_about_the_leak_before_building_the_model(planted, tmp_path, monkeypatch):
    from cnntrain.config import TrainConfig
    from cnntrain.train.progress import Reporter

    fit_module = importlib.import_module("cnntrain.train.fit")  # the package exports the function under this name

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(fit_module, "build_run_model", stop)
    stream = io.StringIO()
    cfg = TrainConfig(data_path=str(planted[0]), arch="resnet18", pretrained=False, project=str(tmp_path / "runs"))
    with pytest.raises(Stop):
        fit_module.fit(cfg, reporter=Reporter(quiet=True, stream=stream))
    leaks = [line for line in stream.getvalue().splitlines() if "train/val leakage" in line]
    assert leaks == [leak_line(load_folder(planted[0]))]  # shown even with --quiet, once


def test_cli_table_json_and_strict_exit_codes(planted, tmp_path, runner):
    root, expected, _ = planted
    plot = tmp_path / "counts.png"
    table = runner.invoke(app, ["check-data", "--data-path", str(root), "--plot", str(plot)])
    assert table.exit_code == 0, table.output
    assert "train/val leaks" in table.output and "found 1 unreadable" in table.output
    assert plot.stat().st_size > 0 and Image.open(plot).size[0] > 300
    result = runner.invoke(app, ["check-data", "--data", str(root), "--format", "json", "--no-plot", "--strict"])
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert set(data) >= {"source", "classes", "splits", "counts", "unreadable", "duplicates", "leaks", "conflicts",
                         "near_checked", "near_threshold", "found", "plot"}
    assert data["found"] is True and data["plot"] is None and data["classes"] == list(CLASSES)
    assert data["counts"] == {"unreadable": 1, "exact_duplicates": 2, "near_duplicates": 3, "exact_leaks": 1,
                              "near_leaks": 2, "exact_conflicts": 1, "near_conflicts": 1}
    exact_leak = next(m for m in data["leaks"] if m["kind"] == "exact")
    assert exact_leak["a"] == {"path": str(root / "train/fox/f0.jpg"), "split": "train", "class": "fox"}
    assert exact_leak["b"]["path"] == str(root / "val/fox/f0_leak.jpg") and exact_leak["distance"] == 0
    assert data["splits"]["val"]["per_class"] == {"cat": 4, "dog": 3, "fox": 5}
    assert len(data["duplicates"]) + len(data["leaks"]) == len(expected)
    clean = make_split_folder(tmp_path / "clean", train=2, val=1, seed=2)
    ok = runner.invoke(app, ["check-data", "--data-path", str(clean), "--strict", "--no-plot"])
    assert ok.exit_code == 0 and "nothing found in 9 images" in ok.output


def test_without_imagehash_exact_checks_run_and_one_line_says_what_to_install(planted, runner, monkeypatch):
    monkeypatch.setattr(hashing, "imagehash_version", lambda: None)
    result = runner.invoke(app, ["check-data", "--data-path", str(planted[0]), "--format", "json", "--no-plot"])
    assert result.exit_code == 0
    assert result.stderr.strip() == report.NEAR_NOTICE and "pip install 'cnntrain[check]'" in result.stderr
    data = json.loads(result.stdout)
    assert data["near_checked"] is False and data["counts"]["near_leaks"] == 0 and data["counts"]["exact_leaks"] == 1


@pytest.mark.parametrize("case", ["missing", "empty", "no images", "format", "threshold"])
def test_bad_input_is_one_line_with_a_nonzero_exit(case, tmp_path, runner):
    (tmp_path / "empty").mkdir()
    (tmp_path / "classes/cat").mkdir(parents=True)
    argv, code, words = {
        "missing": (["--data-path", str(tmp_path / "nope")], 1, "does not exist"),
        "empty": (["--data-path", str(tmp_path / "empty")], 1, "no class folders"),
        "no images": (["--data-path", str(tmp_path / "classes")], 1, "no images"),
        "format": (["--format", "xml"], 2, "--format must be one of table, json"),
        "threshold": (["--near-threshold", "200"], 2, "--near-threshold must be"),
    }[case]
    result = runner.invoke(app, ["check-data", *argv, "--no-plot"])
    assert result.exit_code == code
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], result.output
    assert result.stdout == ""


def test_the_default_threshold_is_one_number(runner):
    """The CLI reads it from the package without loading torch; the library uses the same."""
    import inspect

    assert inspect.signature(findings.check_data).parameters["near_threshold"].default == NEAR_THRESHOLD
    assert f"[default: {NEAR_THRESHOLD}]" in runner.invoke(app, ["check-data", "--help"]).output
