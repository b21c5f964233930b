"""Augmentation that fits the data: flips, crop ranges and presets, seeded per sample, saved per run."""

from __future__ import annotations

import pytest
import torch
import yaml

from cnntrain import choices
from cnntrain.config import build_config, load_yaml, save_yaml
from cnntrain.data.transforms import Augment, train_transform
from cnntrain.errors import UsageError

WHOLE = {"crop_scale": (1.0, 1.0), "crop_ratio": (1.0, 1.0)}  # the crop keeps the whole (square) image


def _arrow() -> torch.Tensor:
    """A 32 px image whose left half is bright and whose top half is red: every flip shows."""
    x = torch.zeros(3, 32, 32, dtype=torch.uint8)
    x[:, :, :16] = 200
    x[0, :16, :] = 255
    return x


def _mirrored(y: torch.Tensor) -> bool:
    return bool(y[1, :, :8].float().mean() < y[1, :, -8:].float().mean())


def _upside_down(y: torch.Tensor) -> bool:
    return bool(y[0, :8].float().mean() < y[0, -8:].float().mean())


def _outputs(augment: Augment, n: int = 60) -> list[torch.Tensor]:
    tf = train_transform(32, augment=augment)
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        out.append(tf(_arrow()))
    return out


def test_hflip_0_never_mirrors_and_1_always_does():
    assert not any(_mirrored(y) for y in _outputs(Augment(hflip=0.0, **WHOLE)))
    assert all(_mirrored(y) for y in _outputs(Augment(hflip=1.0, **WHOLE)))
    halves = sum(_mirrored(y) for y in _outputs(Augment(hflip=0.5, **WHOLE), n=200))
    assert 70 < halves < 130


def test_vflip_1_always_turns_the_image_upside_down():
    outputs = _outputs(Augment(hflip=0.0, vflip=1.0, **WHOLE))
    assert all(_upside_down(y) for y in outputs) and not any(_mirrored(y) for y in outputs)
    assert not any(_upside_down(y) for y in _outputs(Augment(**WHOLE)))


def test_crops_keep_an_area_within_the_crop_scale():
    """Each pixel carries its own coordinates, so a crop's extent can be read off its output."""
    side = 64
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    coded = torch.stack([xs * 4, ys * 4, torch.zeros_like(xs)]).to(torch.uint8)
    tf = train_transform(side, augment=Augment(hflip=0.0, crop_scale=(0.3, 0.4), crop_ratio=(1.0, 1.0)))
    for seed in range(30):
        torch.manual_seed(seed)
        y = tf(coded).float() / 4
        width, height = y[0].max() - y[0].min() + 1, y[1].max() - y[1].min() + 1
        area = float(width * height) / side**2
        assert 0.25 < area < 0.45, (seed, area)


def test_the_same_seed_gives_the_same_augmentation():
    augment = Augment(hflip=0.5, rotate=15.0, color_jitter=0.3, crop_scale=(0.5, 1.0))
    a, b = _outputs(augment, n=5), _outputs(augment, n=5)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("bad, says", [({"hflip": 1.5}, "--hflip"), ({"crop_scale": (0.0, 1.0)}, "--crop-scale"),
                                       ({"crop_ratio": (2.0, 1.0)}, "--crop-ratio"), ({"rotate": 400.0}, "--rotate")])
def test_impossible_values_are_usage_errors(bad, says):
    with pytest.raises(UsageError, match=says):
        Augment(**bad).check()


def test_a_preset_sets_every_value_and_options_change_one_each():
    cfg = build_config({"data_path": "x"}, {"aug_preset": "no-mirror", "rotate": 5.0, "crop_scale": "0.7,1"})
    assert cfg.hflip == 0.0 and cfg.vflip == 0.0 and cfg.rotate == 5.0
    assert cfg.crop_scale == [0.7, 1.0] and cfg.crop_ratio == list(choices.AUG_PRESETS["no-mirror"]["crop_ratio"])
    photo = build_config({"data_path": "x"})
    assert (photo.aug_preset, photo.hflip, photo.crop_scale) == ("photo", 0.5, [0.08, 1.0])
    with pytest.raises(UsageError, match="--aug-preset must be one of photo, no-mirror, light"):
        build_config({"data_path": "x"}, {"aug_preset": "digits"})


def test_the_effective_transform_is_saved_and_a_rerun_or_resume_uses_it(tmp_path, monkeypatch):
    """config.yaml holds the resolved values, not just the preset's name: changing what a preset
    means later does not change a saved run."""
    cfg = build_config({"data_path": "x"}, {"aug_preset": "no-mirror", "hflip": 0.25})
    path = tmp_path / "config.yaml"
    path.write_text(save_yaml(cfg))
    saved = yaml.safe_load(path.read_text())
    assert saved["hflip"] == 0.25 and saved["rotate"] == 10.0 and saved["crop_scale"] == [0.6, 1.0]
    monkeypatch.setitem(choices.AUG_PRESETS, "no-mirror", {**choices.AUG_PRESETS["no-mirror"], "rotate": 90.0})
    again = build_config(load_yaml(path))
    assert (again.hflip, again.rotate, again.crop_scale) == (0.25, 10.0, [0.6, 1.0])


def test_the_cli_takes_the_augmentation_options(config_of):
    cfg = config_of("--dataset", "shapes", "--aug-preset", "light", "--hflip", "0", "--crop-ratio", "1,1",
                    "--color-jitter", "0.3")
    assert (cfg.aug_preset, cfg.hflip, cfg.crop_ratio, cfg.color_jitter) == ("light", 0.0, [1.0, 1.0], 0.3)
    assert cfg.crop_scale == [0.5, 1.0]
