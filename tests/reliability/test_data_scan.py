"""The pre-training scan finds unreadable files, drops or refuses them, and caches verdicts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from cnntrain.data import ScanResult, scan_classes, scan_samples
from cnntrain.data import scan as scan_mod
from cnntrain.errors import DataError, UsageError
from cnntrain.paths import scan_cache_dir


def write_good(path: Path, size=(24, 20), fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.effect_noise(size, 40).convert("RGB").save(path, format=fmt)
    return path


def write_bad_files(folder: Path) -> dict[str, Path]:
    """One of each kind of unreadable file users meet in scraped and phone folders."""
    folder.mkdir(parents=True, exist_ok=True)
    jpeg = write_good(folder / "_tmp.jpg", size=(64, 48)).read_bytes()
    (folder / "_tmp.jpg").unlink()
    bad = {
        "truncated": folder / "truncated.jpg",
        "empty": folder / "empty.jpg",
        "text": folder / "notes.jpg",
        "svg": folder / "vector.png",
        "tiff": folder / "scan.tif",
    }
    bad["truncated"].write_bytes(jpeg[: len(jpeg) // 2])
    bad["empty"].write_bytes(b"")
    bad["text"].write_text("<html><body>404 Not Found</body></html>\n")
    bad["svg"].write_text('<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>')
    bad["tiff"].write_bytes(b"II*\x00\x08\x00\x00\x00" + b"\xff" * 40)  # TIFF magic, garbage IFD
    return bad


@pytest.fixture
def dataset(tmp_path) -> tuple[list[tuple[str, int]], dict[str, Path]]:
    for i in range(4):
        write_good(tmp_path / "ds" / "cat" / f"{i}.jpg")
        write_good(tmp_path / "ds" / "dog" / f"{i}.png")
    bad = write_bad_files(tmp_path / "ds" / "dog")
    _, samples = scan_classes(tmp_path / "ds")
    assert len(samples) == 13
    return samples, bad


def test_scan_reports_each_bad_file_with_a_reason(dataset):
    samples, bad = dataset
    result = scan_samples(samples, workers=0)
    assert isinstance(result, ScanResult)
    assert {p for p, _ in result.bad} == {str(p) for p in bad.values()}
    assert result.good == [s for s in samples if Path(s[0]) not in bad.values()]  # order kept
    assert result.cached == 0 and result.total == 13
    reasons = dict(result.bad)
    assert "file is truncated" in reasons[str(bad["truncated"])]
    assert "empty file" in reasons[str(bad["empty"])]
    assert "not an image" in reasons[str(bad["text"])]
    assert all("\n" not in r and r for r in reasons.values())


def test_scan_is_a_full_decode_not_verify(dataset):
    """PIL's verify() accepts a truncated JPEG; the scan must not."""
    _, bad = dataset
    with Image.open(bad["truncated"]) as img:
        img.verify()  # passes: that is why the scan decodes
    result = scan_samples([(str(bad["truncated"]), 0)], workers=0)
    assert result.good == [] and len(result.bad) == 1


def test_warning_lists_the_first_files_and_counts_the_rest(tmp_path):
    good = [(str(write_good(tmp_path / "ok.png")), 0)]
    bad = []
    for i in range(25):
        p = tmp_path / f"bad{i:02d}.jpg"
        p.write_bytes(b"")
        bad.append((str(p), 0))
    result = scan_samples(good + bad, workers=0)
    message = result.warning()
    assert message is not None and message.startswith("skipping 25 of 26 images")
    assert "bad00.jpg" in message and "bad19.jpg" in message and "bad20.jpg" not in message
    assert message.splitlines()[-1].strip() == "... and 5 more"
    assert scan_samples(good, workers=0).warning() is None


def test_strict_raises_naming_bad_files(dataset):
    samples, bad = dataset
    with pytest.raises(DataError) as info:
        scan_samples(samples, strict=True, workers=0)
    message = str(info.value)
    assert "\n" not in message and message.startswith("5 of 13 images cannot be read")
    assert "and 2 more" in message and str(bad["empty"]) in message
    # strict with a clean dataset is silent
    good = [s for s in samples if Path(s[0]) not in bad.values()]
    assert len(scan_samples(good, strict=True, workers=0).good) == 8


def test_second_scan_is_cached_and_does_not_decode(dataset, monkeypatch):
    samples, bad = dataset
    first = scan_samples(samples, workers=0)
    files = list(scan_cache_dir().glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["files"]

    def no_decode(path):
        raise AssertionError(f"decoded {path} although its verdict is cached")

    monkeypatch.setattr(scan_mod, "decode_image", no_decode)
    second = scan_samples(samples, workers=0)
    assert second.cached == 13
    assert (second.good, second.bad) == (first.good, first.bad)


def test_changed_file_is_rechecked(dataset, monkeypatch):
    samples, bad = dataset
    scan_samples(samples, workers=0)
    # fix the truncated file, and break a good one (same size would not matter: mtime changes)
    broken_good = Path(samples[0][0])
    broken_good.write_bytes(broken_good.read_bytes()[:40])
    write_good(bad["truncated"], fmt="JPEG")
    stamp = os.stat(bad["truncated"]).st_mtime_ns + 5_000_000_000
    os.utime(bad["truncated"], ns=(stamp, stamp))  # mtime surely differs on coarse file systems

    decoded = []
    real = scan_mod.decode_image
    monkeypatch.setattr(scan_mod, "decode_image", lambda p: decoded.append(p) or real(p))
    result = scan_samples(samples, workers=0)
    assert sorted(decoded) == sorted([str(broken_good), str(bad["truncated"])])
    assert result.cached == 11
    bad_paths = {p for p, _ in result.bad}
    assert str(broken_good) in bad_paths and str(bad["truncated"]) not in bad_paths


def test_deleted_file_is_bad_not_a_crash(dataset):
    samples, _ = dataset
    scan_samples(samples, workers=0)
    Path(samples[1][0]).unlink()
    result = scan_samples(samples, workers=0)
    assert (samples[1][0], "file not found (deleted or moved?)") in result.bad


def test_scan_cache_can_be_off_and_survives_damage(dataset):
    samples, _ = dataset
    scan_samples(samples, cache=False, workers=0)
    assert not scan_cache_dir().exists()
    scan_samples(samples, workers=0)
    (cache_file,) = scan_cache_dir().glob("*.json")
    cache_file.write_text("{not json")
    result = scan_samples(samples, workers=0)
    assert result.cached == 0 and len(result.bad) == 5
    assert json.loads(cache_file.read_text())["version"] == scan_mod.CACHE_VERSION


def test_worker_processes_give_the_same_verdicts(dataset):
    samples, _ = dataset
    inline = scan_samples(samples, workers=0, cache=False)
    pooled = scan_samples(samples, workers=2, cache=False)
    assert (pooled.good, pooled.bad) == (inline.good, inline.bad)
    with pytest.raises(UsageError):
        scan_samples(samples, workers=-1)


def test_fifo_named_jpg_does_not_hang(tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    result = scan_samples([(str(fifo), 0)], workers=0)
    assert result.bad == [(str(fifo), "not a regular file")]


def test_empty_sample_list_scans_to_nothing():
    result = scan_samples([], workers=0)
    assert (result.good, result.bad, result.cached, result.warning()) == ([], [], 0, None)
