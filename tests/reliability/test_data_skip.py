"""A file that turns unreadable after the scan is skipped, reported, and never hangs an epoch."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image

from cnntrain.data import ImageDataset, Unreadable, collate_skipping, eval_transform, make_loader
from cnntrain.data.sampler import EpochSampler, SeededDataset
from cnntrain.errors import DataError


def make_samples(folder: Path, n: int = 10) -> list[tuple[str, int]]:
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(n):
        path = folder / f"{i:02d}.jpg"
        Image.new("RGB", (20 + i, 18), (10 * i, 100, 200)).save(path)
        samples.append((str(path), i % 3))
    return samples


def break_files(samples: list[tuple[str, int]]) -> set[str]:
    """Delete one file, truncate another, and replace a whole batch's worth at the end."""
    Path(samples[2][0]).unlink()
    data = Path(samples[7][0]).read_bytes()
    Path(samples[7][0]).write_bytes(data[: len(data) // 3])
    Path(samples[8][0]).write_text("not an image any more")
    Path(samples[9][0]).unlink()
    return {samples[i][0] for i in (2, 7, 8, 9)}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_files_are_skipped_through_a_real_loader(tmp_path, workers):
    samples = make_samples(tmp_path / "imgs")
    dataset = SeededDataset(ImageDataset(samples, eval_transform(16), skip_unreadable=True))
    sampler = EpochSampler(samples, shuffle=False, seed=0)
    loader = make_loader(dataset, batch_size=2, shuffle=False, workers=workers, sampler=sampler,
                         collate_fn=collate_skipping)
    broken = break_files(samples)  # after the dataset and loader exist, as mid-run

    seen_targets, skipped, empty_batches = [], [], 0
    for images, targets, skipped_paths in loader:
        assert images.dtype == torch.uint8 and targets.dtype == torch.long
        assert images.shape[0] == targets.shape[0]
        if images.shape[0] == 0:
            empty_batches += 1
            assert tuple(images.shape) == (0, 3, 0, 0)
        else:
            assert tuple(images.shape[1:]) == (3, 16, 16)
        seen_targets += targets.tolist()
        skipped += skipped_paths
    assert set(skipped) == broken and len(skipped) == 4
    assert seen_targets == [label for path, label in samples if path not in broken]
    assert empty_batches == 1  # samples 8 and 9 share the last batch


def test_decode_failure_is_logged_on_one_line(tmp_path, caplog):
    odd = tmp_path / "two\nlines.jpg"
    Image.new("RGB", (8, 8)).save(odd, format="JPEG")
    dataset = ImageDataset([(str(odd), 5)], skip_unreadable=True)
    odd.write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="cnntrain"):
        item = dataset[0]
    assert item == Unreadable(5, str(odd), "empty file (0 bytes)")
    (record,) = [r for r in caplog.records if r.name.startswith("cnntrain")]
    message = record.getMessage()
    assert "\n" not in message and "lines.jpg" in message and "empty file" in message


def test_unreadable_marker_passes_seeded_dataset_and_pickles(tmp_path):
    samples = make_samples(tmp_path, n=1)
    Path(samples[0][0]).unlink()
    item = SeededDataset(ImageDataset(samples, skip_unreadable=True))[(123, 0)]
    assert isinstance(item, Unreadable) and item.path == samples[0][0] and item.label == 0
    assert pickle.loads(pickle.dumps(item)) == item  # crosses worker processes


def test_unreadable_file_raises_unless_skipping_is_on(tmp_path):
    samples = make_samples(tmp_path, n=1)
    Path(samples[0][0]).unlink()
    with pytest.raises(DataError, match="file not found"):
        ImageDataset(samples)[0]


def test_collate_skipping_without_failures_matches_default(tmp_path):
    samples = make_samples(tmp_path, n=3)
    dataset = ImageDataset(samples, eval_transform(8), skip_unreadable=True)
    images, targets, skipped = collate_skipping([dataset[i] for i in range(3)])
    default_images, default_targets = torch.utils.data.default_collate([dataset[i] for i in range(3)])
    assert torch.equal(images, default_images) and torch.equal(targets, default_targets) and skipped == []
