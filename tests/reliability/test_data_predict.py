"""`cnntrain predict` over a folder with a few bad files: an error row for each, every good
file predicted, exit code 1. No training: the checkpoint is written straight from a fresh model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from cnntrain import checkpoint
from cnntrain.cli import app
from cnntrain.models import get_model

CLASSES = ["blue", "green", "red"]


@pytest.fixture
def weights(tmp_path) -> Path:
    model = get_model("resnet18", num_classes=len(CLASSES))
    payload = checkpoint.make_checkpoint(
        model, arch="resnet18", classes=CLASSES, img_size=32, mean=[0.485, 0.456, 0.406],
        std=[0.229, 0.224, 0.225], config={}, epoch=1, metrics={},
    )
    return checkpoint.save(tmp_path / "best.pt", payload)


def photo_folder(root: Path) -> tuple[list[Path], list[Path]]:
    root.mkdir(parents=True)
    good = []
    for i in range(6):
        path = root / f"good{i}.{'jpg' if i % 2 else 'png'}"
        Image.new("RGB", (40 + i, 36), (40 * i, 100, 200 - 30 * i)).save(path)
        good.append(path)
    jpeg = good[1].read_bytes()
    bad = [root / "truncated.jpg", root / "empty.jpg", root / "readme.jpg"]
    bad[0].write_bytes(jpeg[: len(jpeg) // 2])
    bad[1].write_bytes(b"")
    bad[2].write_text("this is text, not a photo\n")
    return good, bad


@pytest.mark.timeout(120)
def test_predict_gives_error_rows_and_predicts_the_rest(tmp_path, runner, weights):
    good, bad = photo_folder(tmp_path / "photos")
    result = runner.invoke(app, ["predict", str(tmp_path / "photos"), "--weights", str(weights),
                                 "--format", "json", "--device", "cpu", "--batch-size", "4"])
    assert result.exit_code == 1, result.output
    rows = json.loads(result.stdout)
    assert len(rows) == 9
    by_path = {Path(r["path"]).name: r for r in rows}
    assert set(by_path) == {p.name for p in good + bad}
    for path in bad:
        row = by_path[path.name]
        assert row["error"] and "\n" not in row["error"] and row["predictions"] == []
    for path in good:
        row = by_path[path.name]
        assert not row["error"]
        assert len(row["predictions"]) == 3 and {p["class"] for p in row["predictions"]} == set(CLASSES)
        assert abs(sum(p["prob"] for p in row["predictions"]) - 1) < 1e-3
    assert "empty file" in by_path["empty.jpg"]["error"]
    assert "file is truncated" in by_path["truncated.jpg"]["error"]
