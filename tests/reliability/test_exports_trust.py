"""A TorchScript export is a program: predict loads one only if it is the file its sidecar was written for.

``torch.jit.load`` runs the code a TorchScript file carries, so a file swapped (or re-saved) beside an
old sidecar must be refused before it is loaded, not after its first forward pass. The sidecar
records the file's SHA-256 at export; these tests pin that check and where it happens.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from PIL import Image

from cnntrain import export, exported
from cnntrain.cli import app
from cnntrain.errors import CheckpointError
from cnntrain.fileio import sha256_file

CLASSES = ["cat", "dog", "owl"]


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """Two 3-class TorchScript exports of a tiny network (16 px), with sidecars, exported once."""
    folder = tmp_path_factory.mktemp("exports")
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, len(CLASSES)))
        export.export_model(model, folder / f"model{seed}.torchscript.pt", "torchscript", arch="tiny",
                            classes=CLASSES, img_size=16, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    return folder


def tiny_export(made: Path, folder: Path, seed: int = 0) -> Path:
    """Export ``seed`` and its sidecar, copied into ``folder`` as model.torchscript.pt (+ .json)."""
    path = folder / "model.torchscript.pt"
    shutil.copyfile(made / f"model{seed}.torchscript.pt", path)
    shutil.copyfile(made / f"model{seed}.torchscript.pt.json", exported.sidecar_path(path))
    return path


def refuse_loading(monkeypatch) -> None:
    def load(*args, **kwargs):
        raise AssertionError("torch.jit.load ran: the file was loaded before it was checked")

    monkeypatch.setattr(torch.jit, "load", load)


def test_a_torchscript_export_records_its_files_sha256_and_loads(made, tmp_path):
    path = tiny_export(made, tmp_path)
    meta = json.loads(exported.sidecar_path(path).read_text())
    assert meta["sha256"] == sha256_file(path)
    model = exported.load_exported(path, device="cpu")
    assert model(torch.zeros(2, 3, 16, 16, dtype=torch.uint8)).shape == (2, len(CLASSES))


def test_a_torchscript_file_swapped_beside_its_sidecar_is_refused_before_it_is_loaded(made, tmp_path, monkeypatch,
                                                                                       runner):
    """Same classes, same image size: nothing but the hash tells the two files apart."""
    path = tiny_export(made, tmp_path)
    shutil.copyfile(made / "model1.torchscript.pt", path)  # the sidecar still describes the first export
    refuse_loading(monkeypatch)
    with pytest.raises(CheckpointError, match="is not the file its sidecar model.torchscript.pt.json was written for"):
        exported.load_exported(path, device="cpu")
    image = tmp_path / "x.png"
    Image.new("RGB", (20, 20), (9, 99, 199)).save(image)
    result = runner.invoke(app, ["predict", str(image), "--weights", str(path), "--device", "cpu"])
    assert result.exit_code == 1 and "runs code when loaded" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_sidecar_whose_sha256_is_not_a_digest_is_damaged(made, tmp_path, monkeypatch):
    path = tiny_export(made, tmp_path)
    side = exported.sidecar_path(path)
    side.write_text(json.dumps({**json.loads(side.read_text()), "sha256": "not a digest"}))
    refuse_loading(monkeypatch)
    with pytest.raises(CheckpointError, match="is damaged: sha256 must be 64 hex digits"):
        exported.load_exported(path, device="cpu")


def test_a_sidecar_from_before_the_hash_was_recorded_still_loads(made, tmp_path):
    path = tiny_export(made, tmp_path)
    side = exported.sidecar_path(path)
    meta = json.loads(side.read_text())
    del meta["sha256"]
    side.write_text(json.dumps(meta))
    assert exported.load_exported(path, device="cpu").classes == CLASSES
