"""``--batch-size auto``: the largest batch that fits the GPU, measured, not guessed.

Ultralytics' AutoBatch fits memory against batch size from a few small batches and trusts the
line; users then run out of memory later (#1451, #4679), because the fit ignores what the run
adds afterwards (the optimiser's state, an EMA copy) and the allocator's fragmentation. Here:

1. a real forward and backward at two small sizes gives the peak memory per image and the fixed
   cost (the model, its gradients, the CUDA context);
2. the batch for ``fraction`` of the memory, less what the run will add later (optimiser state,
   the EMA copy), is computed from that line and rounded down to a multiple of 8;
3. that batch is then *verified* with one more real forward and backward; if it does not fit (or
   peaks above the budget) it shrinks by a fifth and is verified again.

The measurement leaves no trace: BatchNorm statistics, gradients and the RNG are put back. On
the CPU there is no memory to fill in this sense: one line says so and the default is used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from cnntrain.errors import CnnTrainError

#: Share of the GPU's memory (free when the run starts) that training may plan to use.
FRACTION = 0.85
MULTIPLE = 8
LIMIT = 1024
CPU_DEFAULT = 32

Measure = Callable[[int], int]  # batch size -> peak bytes of one training step (raises on OOM)


@dataclass
class BatchChoice:
    batch_size: int
    peak_bytes: int  # the verified step's peak
    budget_bytes: int
    tried: list[int]

    def describe(self) -> str:
        return (f"--batch-size auto: {self.batch_size} (a verified step peaked at {self.peak_bytes / 2**30:.2f} GiB "
                f"of a {self.budget_bytes / 2**30:.2f} GiB budget; sizes tried {', '.join(map(str, self.tried))})")


def _round(batch: float) -> int:
    batch = int(batch)
    return max(1, batch - batch % MULTIPLE if batch >= MULTIPLE else batch)


def choose_batch_size(measure: Measure, budget: int, *, start: int = 8, limit: int = LIMIT,
                      attempts: int = 6) -> BatchChoice:
    """The largest verified batch whose step peaks within ``budget`` bytes (see the module's steps)."""
    tried: list[int] = []

    def fits(batch: int) -> int | None:
        tried.append(batch)
        try:
            peak = measure(batch)
        except torch.OutOfMemoryError:
            return None
        return peak if peak <= budget else None

    small, large = start, 2 * start
    peak_small, peak_large = fits(small), fits(large)
    if peak_small is None:
        raise CnnTrainError(f"--batch-size auto: not even {small} images fit in the GPU's memory; give a smaller "
                            "--batch-size (or --img-size) by hand")
    if peak_large is None:
        return BatchChoice(small, peak_small, budget, tried)
    per_image = max((peak_large - peak_small) / (large - small), 1.0)
    intercept = peak_small - per_image * small  # the model, its gradients, the context
    candidate = max(min(_round((budget - intercept) / per_image), limit), large)
    for _ in range(attempts):
        if candidate == large:
            break
        peak = fits(candidate)
        if peak is not None:
            return BatchChoice(candidate, peak, budget, tried)
        candidate = max(_round(candidate * 0.8), large)  # fragmentation, or a non-linear layer: a fifth less
    return BatchChoice(large, peak_large, budget, tried)


def cuda_step_peak(model: nn.Module, criterion: nn.Module, img_size: int, num_classes: int, device: torch.device,
                   channels_last: bool, amp_dtype: torch.dtype | None) -> Measure:
    """``batch -> peak bytes`` of a real forward and backward of ``model`` on ``device``; BatchNorm
    statistics, gradients and the RNG are as they were afterwards."""

    def measure(batch: int) -> int:
        buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
        was_training = model.training
        try:
            with torch.random.fork_rng(devices=[device]):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                x = torch.randn(batch, 3, img_size, img_size, device=device)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                y = torch.randint(0, num_classes, (batch,), device=device)
                model.train()
                with torch.autocast("cuda", dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss = criterion(model(x), y)
                loss.backward()
                torch.cuda.synchronize(device)
                return int(torch.cuda.max_memory_allocated(device))
        finally:
            model.zero_grad(set_to_none=True)
            with torch.no_grad():
                for name, b in model.named_buffers():
                    b.copy_(buffers[name])
            model.train(was_training)
            torch.cuda.empty_cache()

    return measure


def later_bytes(model: nn.Module, opt: str, momentum: float, ema: bool) -> int:
    """What the run allocates after the measurement: the optimiser's state and the EMA copy."""
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    everything = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    slots = 2 if opt in ("adam", "adamw") else (1 if momentum > 0 else 0)
    return slots * trainable + (everything if ema else 0)


def auto_batch_size(model: nn.Module, criterion: nn.Module, *, img_size: int, num_classes: int,
                    device: torch.device, channels_last: bool, amp_dtype: torch.dtype | None, opt: str,
                    momentum: float, ema: bool, log: Callable[[str], None]) -> int:
    """The batch size ``--batch-size auto`` trains with on ``device``."""
    if device.type != "cuda":
        log(f"--batch-size auto: sizes a batch to the GPU's memory; on {device.type} it is the default, "
            f"{CPU_DEFAULT}")
        return CPU_DEFAULT
    free, _ = torch.cuda.mem_get_info(device)
    budget = int(FRACTION * (free + torch.cuda.memory_allocated(device))) - later_bytes(model, opt, momentum, ema)
    measure = cuda_step_peak(model, criterion, img_size, num_classes, device, channels_last, amp_dtype)
    choice = choose_batch_size(measure, budget)
    log(choice.describe())
    return choice.batch_size
