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
    """The device ``--device name`` means; a CUDA device with an index is also made current.

    Making it current matters beyond our own ``.to(device)``: ``torch.cuda.synchronize()`` (the
    benchmark timer's), the DataLoader's pin-memory thread, capability queries and new streams all
    use the current device, which otherwise stays GPU 0 whatever ``--device cuda:1`` said."""
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
    if device.type not in ("cpu", "cuda", "mps"):  # torch knows meta, xla, xpu...: nothing here runs on them
        raise UsageError(f"--device {name}: cnntrain runs on cpu, cuda or mps, not {device.type}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("--device mps: Apple's MPS backend is not available here; use --device cpu")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device


# Below this size NHWC costs more on the CPU than it saves (oneDNN's reorders dominate).
CPU_CHANNELS_LAST_MIN_SIZE = 96


def use_channels_last(device: torch.device, img_size: int) -> bool:
    """NHWC convolutions: always with cuDNN; on the CPU only for images of 96 px and more.

    Measured on a 2-core VM (training step, batch 16, NHWC / NCHW time): resnet18 1.41 at 32 px,
    1.12 at 64, 0.93 at 112, 0.95 at 224; shufflenet_v2_x1_0 0.91 at 64, 0.90 at 112; inference
    of shufflenet_v2_x1_0 at 224 px, batch 32: 138 -> 190 images/s. Off on MPS. At 224 px in 20-40
    alternated rounds (2026-12, NCHW / NHWC time): resnet18 1.00 at batch 16, 1.04 at 32;
    shufflenet_v2_x1_0 1.00 and 1.10 with ``models.shuffle``'s layout-keeping shuffle (0.92 and ~0.97
    with torchvision's, which turned every block back to NCHW).
    """
    if device.type == "cuda":
        return True
    return device.type == "cpu" and img_size >= CPU_CHANNELS_LAST_MIN_SIZE


def seed_cpu(seed: int) -> None:
    """Seed the CPU generator only: per-sample augmentation in the main process (``--workers 0``,
    ``--gpu-decode``) must not reseed the CUDA generators, or dropout and stochastic depth on
    the GPU would draw the same numbers every batch (``torch.manual_seed`` seeds every device)."""
    torch.default_generator.manual_seed(seed)


def deterministic_note(device: torch.device, deterministic: bool) -> str | None:
    """What ``--deterministic`` cannot promise on CUDA, said before training starts."""
    if not deterministic or device.type != "cuda":
        return None
    return ("--deterministic on CUDA: operations without a deterministic CUDA kernel (e.g. adaptive average "
            "pooling's backward at outputs other than 1x1, as in VGG and AlexNet) still run, with a warning, "
            "so such a run is not bit-for-bit reproducible")


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: an operation with no deterministic version warns instead of stopping the run
        # (deterministic_note says so on CUDA, where that is common)
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.backends.cudnn.benchmark = True


# bf16 tensor-core convolutions and matrix products start with Ampere (compute capability 8.0).
BF16_MIN_CAPABILITY = (8, 0)


def amp_dtype_for(device: torch.device, amp: bool | None) -> torch.dtype | None:
    """bf16 on GPUs of compute capability 8.0 and up (A100, RTX 30xx, H100...), fp16 with a
    GradScaler below (T4, V100, RTX 20xx); off on CPU and MPS.

    Not ``torch.cuda.is_bf16_supported()``: by default it counts emulation, so it says True on a
    T4, where cuDNN has no bf16 convolutions (slow fallbacks or errors); and it asks about the
    current device rather than ``device``."""
    if device.type != "cuda" or amp is False:
        return None
    if torch.version.hip is not None:  # ROCm numbers its GPUs' capabilities otherwise
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.bfloat16 if torch.cuda.get_device_capability(index) >= BF16_MIN_CAPABILITY else torch.float16


def grad_scaler(amp_dtype: torch.dtype | None) -> torch.amp.GradScaler | None:
    """The loss scaler fp16 autocast needs (its small range underflows gradients); bf16 and fp32
    need none."""
    return torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None


def _cuda_index(device: torch.device | None) -> int | None:
    """The CUDA device whose generator a checkpoint carries: the one this process trains on."""
    if device is not None and device.type != "cuda":
        return None
    if not torch.cuda.is_available():
        return None
    return device.index if device is not None and device.index is not None else torch.cuda.current_device()


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """The RNG states of this process: CPU, Python, NumPy, and the CUDA generator of ``device``
    (None: the current CUDA device, if any).

    One CUDA state, not one per visible GPU: a run resumed where fewer (or more) GPUs are visible
    restores it into the device it trains on, whatever its index."""
    numpy_state = cast(tuple, np.random.get_state())  # the legacy tuple form: (name, keys, pos, ...)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": torch.from_numpy(numpy_state[1].astype(np.int64)),
        "numpy_pos": int(numpy_state[2]),
    }
    index = _cuda_index(device)
    if index is not None:
        state["cuda"] = torch.cuda.get_rng_state(index)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore :func:`rng_state`'s states; the saved CUDA state goes into ``device``'s generator.

    Checkpoints are written by rank 0, so under DDP every rank's GPU resumes from rank 0's GPU
    state, as every rank's GPU started from the same seed. Checkpoints from before cnntrain saved
    one state hold a list (one per GPU then visible): the entry of this device when the list has
    one, else the first."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    index = _cuda_index(device)
    saved = state.get("cuda")
    if saved is None or index is None:
        return
    if isinstance(saved, (list, tuple)):
        if not saved:
            return
        saved = saved[index] if index < len(saved) else saved[0]
    torch.cuda.set_rng_state(saved, index)
