"""What only a real GPU can confirm (scripts/gpu_check.sh runs these; without CUDA they skip).

test_cuda_paths.py pins each CUDA defect on the CPU with mocks; these run the same paths on the
device: the precision chosen for it (item 1), nvjpeg's outputs under a busy stream (4), the
current device following ``--device cuda:N`` (5) and validation without per-batch reads (10).
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
import torch.nn as nn
from PIL import Image

from cnntrain import engine, runtime

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)")]


def test_the_precision_fits_the_gpu_and_a_step_runs_in_it():
    device = runtime.resolve_device("cuda:0")
    dtype = runtime.amp_dtype_for(device, None)
    major, _ = torch.cuda.get_device_capability(0)
    assert dtype == (torch.bfloat16 if major >= 8 else torch.float16)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(16, 4)).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = runtime.grad_scaler(dtype)
    x = torch.randn(8, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 4, (8,), device=device)
    with torch.autocast("cuda", dtype=dtype):
        loss = nn.functional.cross_entropy(model(x), y)
    engine.backward_and_step(model, loss, optimizer, scaler)
    assert torch.isfinite(loss).item()


def _jpeg(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(96, 128, 3, generator=g) * 255).to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def test_nvjpeg_results_are_right_while_the_stream_is_busy():
    from torchvision.io import decode_jpeg

    from cnntrain.data import gpu_decode

    device = torch.device("cuda", 0)
    blobs = [_jpeg(i) for i in range(16)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = [decode_jpeg(b, device=device).cpu() for b in blobs]
    for _ in range(5):
        busy = torch.randn(4096, 4096, device=device)
        for _ in range(20):  # kernels queued on the main stream that read memory freed below
            busy = busy @ busy / 4096
        del busy
        got = gpu_decode._decode_jpegs(blobs, device)
        for a, b in zip(expected, got, strict=True):
            assert b is not None and torch.equal(a, b.cpu())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_the_device_named_is_the_current_one():
    assert runtime.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert torch.cuda.current_device() == 1
    torch.cuda.set_device(0)


def test_validation_reads_the_device_once_per_pass():
    device = torch.device("cuda", 0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)).to(device)
    batches = [(torch.randint(0, 255, (16, 3, 8, 8), dtype=torch.uint8), torch.randint(0, 10, (16,)), [])
               for _ in range(6)]
    batcher = engine.Batcher(device, None)
    batches = [(images.float().pin_memory(), targets.pin_memory(), skipped) for images, targets, skipped in batches]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = engine.evaluate(model, batches, nn.CrossEntropyLoss(), batcher, 10)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    assert result.images == 96
    assert len(syncs) <= 2, [str(w.message) for w in syncs]  # the figures and the matrix, read at the end
