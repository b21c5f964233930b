"""Where and how this process computes: the device, seeding, mixed precision, and the RNG
state a checkpoint carries so a resumed run draws the same random numbers.

Shared by train, predict, eval, bench and export, so they choose devices the same way.
"""

from __future__ import annotations

import os
import random
from typing import Any, cast

import numpy as np
import torch

from cnntrain.errors import UsageError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown --device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("--device mps: Apple's MPS backend is not available here; use --device cpu")
    return device


# Below this size NHWC costs more on the CPU than it saves (oneDNN's reorders dominate).
CPU_CHANNELS_LAST_MIN_SIZE = 96


def use_channels_last(device: torch.device, img_size: int) -> bool:
    """NHWC convolutions: always with cuDNN; on the CPU only for images of 96 px and more.

    Measured on a 2-core VM (training step, batch 16, NHWC / NCHW time): resnet18 1.41 at 32 px,
    1.12 at 64, 0.93 at 112, 0.95 at 224; shufflenet_v2_x1_0 0.91 at 64, 0.90 at 112; inference
    of shufflenet_v2_x1_0 at 224 px, batch 32: 138 -> 190 images/s. Off on MPS.
    """
    if device.type == "cuda":
        return True
    return device.type == "cpu" and img_size >= CPU_CHANNELS_LAST_MIN_SIZE


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.backends.cudnn.benchmark = True


def amp_dtype_for(device: torch.device, amp: bool | None) -> torch.dtype | None:
    """bf16 where the GPU supports it, else fp16 (which needs a GradScaler); off on CPU/MPS."""
    if device.type != "cuda" or amp is False:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def rng_state() -> dict[str, Any]:
    numpy_state = cast(tuple, np.random.get_state())  # the legacy tuple form: (name, keys, pos, ...)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": torch.from_numpy(numpy_state[1].astype(np.int64)),
        "numpy_pos": int(numpy_state[2]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
