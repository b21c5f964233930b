"""A first run decodes each image once before its first training step, not once to check it and
once to cache it; bad files are still reported (or refused) before that step; a second run on a
disk cache decodes nothing."""

from __future__ import annotations

import functools
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.data import DataLoader

from cnntrain.cli import app
from cnntrain.data import datasets, gpu_decode, imagecache, pool, scan
from cnntrain.data.decode import decode_image
from cnntrain.data.imagecache import build_image_cache
from cnntrain.data.scan import scan_samples

TINY = ["--arch", "resnet18", "--no-pretrained", "--img-size", "32", "--batch-size", "8", "--workers", "0",
        "--device", "cpu", "--epochs", "1"]


@pytest.fixture
def folder(tmp_path) -> tuple[Path, list[Path], list[Path]]:
    """12 small images in 3 classes plus a truncated PNG and a text file named .jpg."""
    from conftest import make_image_folder

    root = make_image_folder(tmp_path / "data", per_class=4, size=20)
    good = sorted(root.rglob("*.png"))
    truncated, text = root / "red" / "truncated.png", root / "blue" / "notes.jpg"
    truncated.write_bytes(good[0].read_bytes()[: good[0].stat().st_size // 2])
    text.write_text("this is text, not a photo")
    return root, good, [truncated, text]


@pytest.fixture
def decodes(monkeypatch) -> Counter[str]:
    """Calls of decode_image by path, from every module that decodes files for training."""
    counts: Counter[str] = Counter()

    def counting(path):
        counts[str(Path(path).resolve())] += 1
        return decode_image(path)

    for module in (scan, imagecache, datasets, gpu_decode):
        monkeypatch.setattr(module, "decode_image", counting)
    return counts


class UpToFirstStep:
    """What had happened when the first optimiser step was taken: decodes so far, output so far."""

    def __init__(self, decodes: Counter[str]) -> None:
        self.decodes, self.seen = decodes, None

    def __enter__(self) -> UpToFirstStep:
        def hook(optimizer, args, kwargs):
            if self.seen is None:
                sys.stdout.flush()
                sys.stderr.flush()
                said = sys.stdout.buffer.getvalue() + sys.stderr.buffer.getvalue()  # the runner's streams
                self.seen = (Counter(self.decodes), said.decode(errors="replace"))

        self.handle = register_optimizer_step_pre_hook(hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


def _train(runner, decodes, data: Path, tmp_path: Path, *args: str):
    with UpToFirstStep(decodes) as first:
        result = runner.invoke(app, ["train", "--data-path", str(data), *TINY, "--project", str(tmp_path / "runs"),
                                     *args])
    return result, first.seen


@pytest.mark.parametrize("mode", ["ram", "disk"])
def test_first_run_decodes_each_image_once_and_reports_bad_files_before_the_first_step(
        runner, folder, decodes, tmp_path, mode):
    data, good, bad = folder
    result, seen = _train(runner, decodes, data, tmp_path, "--cache", mode)
    assert result.exit_code == 0, result.output
    assert seen is not None, "no training step was taken"
    counts, said = seen
    assert counts == Counter({str(p.resolve()): 1 for p in good + bad})  # the check and the cache: one decode
    assert "skipping 2 of 14 images that cannot be read" in said and all(str(p) in said for p in bad)

    decodes.clear()
    again, seen = _train(runner, decodes, data, tmp_path, "--cache", mode)
    assert again.exit_code == 0 and seen is not None, again.output
    counts, said = seen
    # RAM is refilled from the files the scan knows to be good; a disk cache is reused whole.
    assert counts == (Counter() if mode == "disk" else Counter({str(p.resolve()): 1 for p in good}))
    assert "skipping 2 of 14 images that cannot be read" in said
    assert ("reused" in said) == (mode == "disk")


@pytest.mark.parametrize("mode", ["ram", "disk"])
def test_strict_refuses_bad_files_before_the_first_step(runner, folder, decodes, tmp_path, mode):
    data, _, bad = folder
    result, seen = _train(runner, decodes, data, tmp_path, "--cache", mode, "--strict")
    assert result.exit_code == 1 and "2 of 14 images cannot be read" in result.stderr
    assert seen is None and not (tmp_path / "runs").exists()  # refused before the run folder was claimed


def test_a_class_left_without_readable_images_is_an_error_before_training(runner, folder, decodes, tmp_path):
    data, good, _ = folder
    for path in good:
        if path.parent.name == "green":
            path.write_bytes(b"")
    result, seen = _train(runner, decodes, data, tmp_path, "--cache", "ram")
    assert result.exit_code == 1 and "class green has no readable training images left" in result.stderr
    assert seen is None


def test_frozen_backbone_features_read_the_first_pass_cache(runner, folder, decodes, tmp_path):
    data, good, bad = folder
    result, seen = _train(runner, decodes, data, tmp_path, "--freeze-layers", "--aug", "none")
    assert result.exit_code == 0, result.output
    assert "the head trains on cached features" in result.output and seen is not None
    assert seen[0] == Counter({str(p.resolve()): 1 for p in good + bad})


def test_cache_none_still_scans_up_front(runner, folder, decodes, tmp_path):
    data, good, bad = folder
    result, seen = _train(runner, decodes, data, tmp_path, "--cache", "none")
    assert result.exit_code == 0 and seen is not None, result.output
    assert "image cache" not in result.output and "skipping 2 of 14 images" in seen[1]
    assert all(seen[0][str(p.resolve())] == 1 for p in bad)  # checked by the scan, never trained on


def test_scan_takes_the_readers_verdicts_and_caches_them(folder, decodes):
    data, good, bad = folder
    samples = [(str(p), 0) for p in good[:3] + bad]
    first = scan_samples(samples, workers=0)  # a scan of its own first: the text file is known bad
    assert len(first.bad) == 2
    later = good[3:6]
    samples += [(str(p), 0) for p in later]
    calls = []

    def reader(given, known_bad):
        calls.append(dict(known_bad))
        assert given == samples
        return {5: None, 6: "a reason of the reader's"}  # says nothing of later[2]: the scan decodes it

    decodes.clear()
    result = scan_samples(samples, workers=0, reader=reader)
    assert calls == [{3: first.bad[0][1], 4: first.bad[1][1]}]  # the files known to be bad, not to be opened
    assert decodes == Counter({str(later[2].resolve()): 1})
    assert [p for p, _ in result.bad] == [str(p) for p in bad] + [str(later[1])]
    assert dict(result.bad)[str(later[1])] == "a reason of the reader's"
    decodes.clear()
    again = scan_samples(samples, workers=0)  # the reader's verdicts were cached like the scan's own
    assert decodes == Counter() and again.bad == result.bad and again.cached == len(samples)


@pytest.mark.parametrize("mode", ["ram", "disk"])
def test_cache_build_never_opens_known_bad_files_and_says_what_it_found(folder, decodes, monkeypatch, mode):
    data, good, bad = folder
    samples = [(str(p), 0) for p in [good[0], bad[0], bad[1], good[1]]]
    opened = []
    real = imagecache._header_bytes
    monkeypatch.setattr(imagecache, "_header_bytes", lambda path, short: opened.append(path) or real(path, short))
    cache = build_image_cache(samples, short_side=36, mode=mode, max_gb=None, workers=0, log=lambda s: None,
                              known_bad={2: "known reason"})
    assert cache is not None and str(bad[1]) not in opened + [*decodes]
    verdicts = cache.verdicts()
    assert verdicts[0] is None and verdicts[3] is None and verdicts[2] == "known reason"
    assert "truncated" in (verdicts[1] or "")
    picked = cache.select([3, 0])
    assert picked.get(0, samples[3][0]).shape == cache.get(3, samples[3][0]).shape
    assert picked.get(1, samples[0][0]).equal(cache.get(0, samples[0][0]))


@pytest.mark.integration  # a spawned worker imports torch afresh
@pytest.mark.parametrize("context, mode", [("fork", "ram"), ("fork", "disk"), ("spawn", "disk")])
def test_workers_write_the_pixels_in_place(folder, monkeypatch, context, mode):
    """Workers store each image in the cache's buffer themselves: shared memory (which a spawned
    worker reaches by handle, as test_imagecache's reading test shows), or the disk cache's file,
    mapped again in each worker, so nothing written is lost with spawn either."""
    _, good, _ = folder
    samples = [(str(p), 0) for p in good[:4]]
    reference = build_image_cache(samples, short_side=36, mode="ram", max_gb=None, workers=0, log=lambda s: None)
    monkeypatch.setattr(pool, "DataLoader", functools.partial(DataLoader, multiprocessing_context=context))
    built = build_image_cache(samples, short_side=36, mode=mode, max_gb=None, workers=1, log=lambda s: None)
    assert built is not None and reference is not None and built.mode == mode
    assert torch.equal(built.entries, reference.entries) and torch.equal(built.data, reference.data)
    assert int(reference.data.sum()) > 0
