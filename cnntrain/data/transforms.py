"""Train and eval presets on uint8 CHW tensors, and the on-device ``Normalize``.

The presets never convert to float: batches cross to the device as uint8 (4x smaller) and
:class:`Normalize` turns them into normalised float32 there. Train, eval and predict all share
:func:`eval_transform`, so a checkpoint's image size is the only thing predict needs to know.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torchvision.transforms import v2

from cnntrain.choices import AUGMENTATIONS  # the names train_transform(aug=...) accepts
from cnntrain.errors import UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Eval resizes the short side to img_size / CROP_RATIO, then centre-crops img_size (224 -> 256).
CROP_RATIO = 0.875


def _check_size(img_size: int) -> int:
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1:
        raise UsageError(f"image size must be a positive integer, got {img_size!r}; e.g. 224")
    return img_size


def _parse_aug(aug: Sequence[str] | str) -> list[str]:
    names = [aug] if isinstance(aug, str) else list(aug)
    names = [str(n).strip().lower() for n in names if str(n).strip()]
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown:
        raise UsageError(
            f"unknown augmentation {', '.join(repr(n) for n in unknown)}; "
            f"choose from {', '.join(AUGMENTATIONS)}"
        )
    if "none" in names and len(set(names)) > 1:
        raise UsageError("augmentation 'none' cannot be combined with others; pass it alone")
    if "trivialaugment" in names and "randaugment" in names:
        raise UsageError("choose one of trivialaugment and randaugment, not both")
    return list(dict.fromkeys(names))


@dataclass(frozen=True)
class Augment:
    """The random part of the training transform: what fits the data (``--hflip``, ``--crop-scale``...).

    The defaults are the ``photo`` preset (ImageNet's RandomResizedCrop and a mirror half the
    time). Digits, text, arrows and road signs change class when mirrored, and small or centred
    objects vanish from an 8% crop: those need other values (see ``choices.AUG_PRESETS``)."""

    hflip: float = 0.5  # probability of a left-right mirror
    vflip: float = 0.0  # probability of an upside-down flip
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop's range of area kept
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # ...and of aspect ratio
    rotate: float = 0.0  # degrees, either way
    color_jitter: float = 0.0  # brightness, contrast and saturation, each by up to this fraction

    def check(self) -> Augment:
        for name in ("hflip", "vflip"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UsageError(f"--{name} is a probability in [0, 1], not {getattr(self, name)!r}")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise UsageError(f"--crop-scale must satisfy 0 < MIN <= MAX <= 1, got {lo:g},{hi:g}; e.g. 0.08,1")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise UsageError(f"--crop-ratio must satisfy 0 < MIN <= MAX, got {self.crop_ratio}; e.g. 0.75,1.333")
        if not 0 <= self.rotate <= 180 or not 0 <= self.color_jitter <= 1:
            raise UsageError("--rotate takes 0 to 180 degrees and --color-jitter 0 to 1")
        return self

    def describe(self) -> str:
        """One line for the start-up summary: the effective random transform."""
        lo, hi = self.crop_scale
        parts = [f"crop {lo:g}-{hi:g} of the area (ratio {self.crop_ratio[0]:.2f}-{self.crop_ratio[1]:.2f})",
                 f"hflip {self.hflip:g}"]
        parts += [f"vflip {self.vflip:g}"] if self.vflip else []
        parts += [f"rotate +-{self.rotate:g} deg"] if self.rotate else []
        parts += [f"colour jitter {self.color_jitter:g}"] if self.color_jitter else []
        return ", ".join(parts)


def train_transform(img_size: int, aug: Sequence[str] = (), *, scale: tuple[float, float] | None = None,
                    augment: Augment | None = None) -> v2.Compose:
    """Training preset on uint8 tensors: RandomResizedCrop and flips as ``augment`` says, plus ``aug``.

    ``augment`` (default: the ``photo`` preset) sets the crop's area and aspect ranges, the flip
    probabilities, a rotation and a colour jitter; ``scale`` overrides its crop area alone.

    ``aug`` may name ``"trivialaugment"`` or ``"randaugment"`` (after the crop and flip) and
    ``"erasing"`` (RandomErasing, applied last, filling with the ImageNet mean colour, which is
    what erasing to 0 after normalisation would give). ``"none"`` means no random augmentation
    at all: the deterministic :func:`eval_transform` is returned instead, e.g. to check that a
    model can overfit or to cache features. Unknown names raise :class:`UsageError`.
    """
    img_size = _check_size(img_size)
    names = _parse_aug(aug)
    augment = augment or Augment()
    if scale is not None:
        augment = dataclasses.replace(augment, crop_scale=tuple(scale))  # type: ignore[arg-type]
    augment.check()
    if names == ["none"]:
        return eval_transform(img_size)
    steps: list[torch.nn.Module] = [
        v2.RandomResizedCrop(img_size, scale=augment.crop_scale, ratio=augment.crop_ratio, antialias=True)]
    if augment.hflip:
        steps.append(v2.RandomHorizontalFlip(p=augment.hflip))
    if augment.vflip:
        steps.append(v2.RandomVerticalFlip(p=augment.vflip))
    if augment.rotate:
        steps.append(v2.RandomRotation(augment.rotate))
    if augment.color_jitter:
        j = augment.color_jitter
        steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j))
    if "trivialaugment" in names:
        steps.append(v2.TrivialAugmentWide())
    if "randaugment" in names:
        steps.append(v2.RandAugment())
    if "erasing" in names:
        steps.append(v2.RandomErasing(value=[round(m * 255) for m in IMAGENET_MEAN]))
    return v2.Compose(steps)


def eval_transform(img_size: int) -> v2.Compose:
    """Eval/predict preset on uint8 tensors: resize short side to ``img_size / 0.875``, centre crop."""
    img_size = _check_size(img_size)
    return v2.Compose([
        v2.Resize(int(img_size / CROP_RATIO), antialias=True),
        v2.CenterCrop(img_size),
    ])


class Normalize(torch.nn.Module):
    """uint8 NCHW (or CHW) batch -> float32 ``(x / 255 - mean) / std``; runs on the device.

    Floating-point input is taken as already scaled to [0, 1]. Memory format (e.g.
    channels_last) is preserved. ``mean``/``std`` are non-persistent buffers, so ``.to(device)``
    moves them and they never end up in a model's state dict.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        std_t = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
        if mean_t.shape != std_t.shape or mean_t.numel() not in (1, 3):
            raise UsageError(f"normalisation needs 3 means and 3 stds, got {list(mean)} and {list(std)}")
        if bool((std_t <= 0).any()):
            raise UsageError(f"normalisation std must be positive, got {list(std)}")
        self.register_buffer("mean", mean_t, persistent=False)
        self.register_buffer("std", std_t, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeeze = x.dim() == 3
        if squeeze:
            x = x.unsqueeze(0)
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        x = (x - self.mean) / self.std
        return x.squeeze(0) if squeeze else x

    def extra_repr(self) -> str:
        fmt = lambda t: "(" + ", ".join(f"{v:.4g}" for v in t.flatten().tolist()) + ")"  # noqa: E731
        return f"mean={fmt(self.mean)}, std={fmt(self.std)}"
