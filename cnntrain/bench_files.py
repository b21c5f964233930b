"""``cnntrain bench --weights FILE``: how fast does this very file run here, as predict runs it?

``bench --arch`` times architectures from random init; deployment asks about a file: an fp32
export against its int8 quantization, or a checkpoint against its export. Each file is opened
with the code that predict uses (:func:`cnntrain.exported.load_exported` for ``.onnx`` and
TorchScript, so onnxruntime gets predict's session options and thread settings;
:func:`cnntrain.checkpoint.on_device` for checkpoints) and fed what predict feeds it: a uint8 NCHW
batch at the file's own image size. Latency is at batch 1; throughput is images/s at ``batch_size``
(an export without ``--dynamic-batch`` takes one image per call, so there it is that many calls,
as predict would make them). Both are medians of ``runs`` timed blocks after a warm-up
(:func:`cnntrain.bench._median_seconds`, the same clock as ``bench --arch``).

:func:`time_model` is what ``export --int8`` uses to measure its speed-up, so the figures in the
int8 sidecar and the ones ``bench --weights`` prints are taken the same way.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cnntrain.errors import UsageError

Runner = Callable[[torch.Tensor], Any]


@dataclass
class Speed:
    """Latency at batch 1 and throughput at ``batch_size``, both medians."""

    latency_ms: float
    images_per_s: float
    batch_size: int
    runs: int

    def as_dict(self) -> dict[str, Any]:
        return {"latency_ms": round(self.latency_ms, 3), "images_per_s": round(self.images_per_s, 2),
                "batch_size": self.batch_size, "runs": self.runs}


def _images(batch: int, img_size: int) -> torch.Tensor:
    """Fixed-seed uint8 noise: the timing of a CNN does not depend on the pixel values."""
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (batch, 3, img_size, img_size), dtype=torch.uint8, generator=gen)


def time_model(run: Runner, img_size: int, *, batch_size: int, runs: int) -> Speed:
    """Time ``run`` (uint8 NCHW batch -> logits) at batch 1 and at ``batch_size``."""
    from cnntrain.bench import _median_seconds

    one, many = _images(1, img_size), _images(batch_size, img_size)
    latency = _median_seconds(lambda: run(one), runs)
    per_batch = _median_seconds(lambda: run(many), runs)
    return Speed(1000 * latency, batch_size / per_batch, batch_size, runs)


def _onnx_quantized(path: Path) -> bool:
    """Whether an ONNX graph holds quantized operators (QDQ pairs or QLinear* / integer ops)."""
    try:
        import onnx
    except ImportError:  # onnxruntime alone runs the file; without onnx the row just does not say
        return False
    ops = {node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node}
    return bool(ops & {"QuantizeLinear", "DequantizeLinear", "ConvInteger", "MatMulInteger"}
                or any(op.startswith("QLinear") for op in ops))


def _open(path: Path, device: str) -> tuple[Runner, dict[str, Any]]:
    """The file as predict runs it, and the facts of it the row reports."""
    from cnntrain.exported import detect_format, load_exported

    fmt = detect_format(path)
    if fmt is not None:
        exported = load_exported(path, device)
        meta = exported.meta
        facts = {"format": fmt, "arch": meta.get("arch"), "img_size": exported.img_size,
                 "file_batch": "dynamic" if exported.fixed_batch is None else exported.fixed_batch,
                 "int8": fmt == "onnx" and _onnx_quantized(path), "device": _device_of(exported, device)}
        return exported, facts

    from cnntrain import checkpoint
    from cnntrain.runtime import resolve_device

    ckpt = checkpoint.require_full(checkpoint.load(path), path)
    dev = resolve_device(device)
    model, batcher = checkpoint.on_device(ckpt, dev)
    no_targets = torch.zeros(0, dtype=torch.long)

    @torch.no_grad()
    def run(images: torch.Tensor) -> torch.Tensor:
        inputs, _ = batcher(images, no_targets)
        with batcher.autocast():
            logits = model(inputs)
        return logits.float().cpu()  # to the host, as predict needs it: also waits for a GPU

    facts = {"format": "checkpoint", "arch": ckpt["arch"], "img_size": int(ckpt["img_size"]),
             "file_batch": "dynamic", "int8": False, "device": str(dev)}
    return run, facts


def _device_of(exported: Any, asked: str) -> str:
    """Where an export runs: onnxruntime's first provider (``auto`` picks one), or the TorchScript device."""
    from cnntrain.exported import OnnxModel

    if isinstance(exported, OnnxModel):
        return "cuda" if exported.session.get_providers()[0].startswith("CUDA") else "cpu"
    return str(getattr(exported, "device", asked))


def bench_files(paths: Sequence[str | os.PathLike[str]], *, batch_size: int = 32, runs: int = 5,
                device: str = "auto", log: Callable[[str], None] = lambda s: None) -> list[dict[str, Any]]:
    """One row per file: its format, size, latency at batch 1 and images/s at ``batch_size``."""
    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if runs < 1:
        raise UsageError("--runs must be at least 1")
    files = [Path(p) for p in paths]
    for path in files:  # every name checked before the first (slow) measurement
        if not path.is_file():
            raise UsageError(f"--weights {path} is not a file")
    rows = []
    for path in files:
        log(f"benchmarking {path} ...")
        run, facts = _open(path, device)
        speed = time_model(run, facts["img_size"], batch_size=batch_size, runs=runs)
        rows.append({"weights": str(path), **facts, "size_mb": round(path.stat().st_size / 1e6, 3),
                     "batch_size": batch_size, "latency_ms": speed.latency_ms,
                     "infer_images_per_s": speed.images_per_s, "torch_threads": torch.get_num_threads(),
                     "cpu": cpu_name(), "runs": runs})
    return rows


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux) and core count, for the record."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def files_table(rows: list[dict[str, Any]]):
    """A rich Table of :func:`bench_files` rows."""
    from rich.table import Table

    first = rows[0]
    table = Table(title=f"{first['cpu']}; latency at batch 1, throughput at batch {first['batch_size']}, "
                        f"median of {first['runs']} runs")
    cols = [("file", "weights", "{}"), ("format", "format", "{}"), ("int8", "int8", "{}"),
            ("arch", "arch", "{}"), ("px", "img_size", "{}"), ("MB", "size_mb", "{:.1f}"),
            ("latency (ms)", "latency_ms", "{:.2f}"), ("img/s", "infer_images_per_s", "{:.1f}")]
    for title, _, _ in cols:
        table.add_column(title, justify="left" if title in ("file", "format", "arch") else "right",
                         overflow="fold" if title == "file" else "ellipsis")
    for r in rows:
        table.add_row(*(("yes" if r[key] else "no") if key == "int8" else fmt.format(r[key]) for _, key, fmt in cols))
    return table
