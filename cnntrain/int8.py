"""``cnntrain export --format onnx --int8``: a statically quantized ONNX model, verified before it is kept.

The steps, each done by onnxruntime's own quantization tools, not by hand:

1. the fp32 ONNX export (:func:`cnntrain.export.export_model`, verified against PyTorch as always),
   into a temporary folder;
2. ``quant_pre_process``: shape inference and graph optimisation, as onnxruntime recommends before
   quantizing (it folds what can be folded, so fewer tensors need ranges);
3. ``quantize_static`` in QDQ format (what onnxruntime's CPU kernels are optimised for since 1.11),
   int8 weights per output channel (CNN filters differ in range by orders of magnitude, so one scale
   per tensor would flatten the small ones), uint8 activations, full 8-bit weights: onnxruntime
   suggests 7-bit ones (``reduce_range``) for x86 CPUs without VNNI, but on this project's AVX2
   machine they changed the top-1 of 1 in 75 images of a ResNet-18 where 8 bits changed none, and
   step 4 below checks the result either way. The layer that computes the logits stays float
   (:func:`logit_layer`). Activation ranges are calibrated (MinMax) on training images, read and
   preprocessed the way the checkpoint's eval transform does it, fed as the uint8 batches the
   exported graph takes;
4. verification: top-1 of the int8 file against the fp32 file on the validation split, through the
   code predict runs them with (:func:`cnntrain.exported.open_exported`). Less than ``1 -
   accept_drop`` agreement (99% by default) is an error and nothing is kept: int8 exports that
   silently lose accuracy are a known trap;
5. the speed-up: latency at batch 1 and throughput, fp32 against int8, timed back to back
   (:func:`cnntrain.bench_files.time_model`, as ``bench --weights`` times files).

The int8 file and its sidecar are then published together; the sidecar is the fp32 one plus an
``int8`` entry holding what was done and measured (see :meth:`Int8Report.as_dict`).
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cnntrain import fileio
from cnntrain.bench_files import Speed, cpu_name, time_model
from cnntrain.errors import CnnTrainError, DataError, UsageError, first_line

Log = Callable[[str], None]
Samples = list[tuple[str, int]]

DEFAULT_CALIB_IMAGES = 200
#: The agreement an int8 model must keep with its fp32 original unless ``--accept-drop`` says otherwise.
DEFAULT_ACCEPT_DROP = 0.01
#: Speed is measured at this batch (throughput) and at batch 1 (latency), median of TIMING_RUNS.
TIMING_BATCH, TIMING_RUNS = 32, 5
_PER_CHANNEL, _REDUCE_RANGE = True, False


class Int8Error(CnnTrainError):
    """The int8 model disagrees with its fp32 original more than accepted, or quantization failed."""


def check_int8_request(fmt: str, calib_images: int | None, accept_drop: float | None, int8: bool) -> None:
    """What can be wrong with the request itself, checked before the checkpoint is read."""
    if not int8:
        given = [name for name, value in (("--calib-images", calib_images), ("--accept-drop", accept_drop))
                 if value is not None]
        if given:
            raise UsageError(f"{' and '.join(given)} {'go' if len(given) > 1 else 'goes'} with --int8")
        return
    if fmt != "onnx":
        raise UsageError(f"--int8 quantizes ONNX models (with onnxruntime); use --format onnx, not {fmt}")
    if calib_images is not None and calib_images < 1:
        raise UsageError(f"--calib-images must be at least 1, not {calib_images}; "
                         f"the default is {DEFAULT_CALIB_IMAGES}")
    if accept_drop is not None and not 0 <= accept_drop <= 1:
        raise UsageError(f"--accept-drop is a fraction between 0 and 1 (e.g. 0.02 for 2%), not {accept_drop:g}")


def default_int8_output(weights: str | Path) -> Path:
    """``best.pt`` -> ``best.int8.onnx``, beside the fp32 ``best.onnx`` rather than over it."""
    weights = Path(weights)
    return weights.with_name(weights.stem + ".int8.onnx")


# ----------------------------------------------------------------------------------- results


@dataclass
class Agreement:
    """Top-1 of the int8 model against the fp32 one on ``images`` held-out images."""

    images: int
    agree: int
    fp32_correct: int  # against the labels, for the record: agreement is what is checked
    int8_correct: int
    split: str

    @property
    def fraction(self) -> float:
        return self.agree / self.images

    def within(self, accept_drop: float) -> bool:
        """At most ``accept_drop`` of the images may change their top-1 class (counted, not in floats)."""
        return self.images - self.agree <= int(accept_drop * self.images + 1e-9)


@dataclass
class Int8Report:
    calib_images: int
    agreement: Agreement
    accept_drop: float
    fp32: Speed
    int8: Speed
    fp32_bytes: int
    int8_bytes: int

    @property
    def latency_speedup(self) -> float:
        return self.fp32.latency_ms / self.int8.latency_ms

    @property
    def throughput_speedup(self) -> float:
        return self.int8.images_per_s / self.fp32.images_per_s

    def as_dict(self) -> dict[str, Any]:
        """The sidecar's ``int8`` entry."""
        a = self.agreement
        return {
            "quantizer": "onnxruntime.quantization.quantize_static", "format": "QDQ", "calibration": "MinMax",
            "activations": "uint8", "weights": "int8" + (" per channel" if _PER_CHANNEL else ""),
            "reduce_range": _REDUCE_RANGE, "calibration_images": self.calib_images,
            "agreement": {"top1": round(a.fraction, 5), "images": a.images, "split": a.split,
                          "required": round(1 - self.accept_drop, 5),
                          "fp32_top1": round(a.fp32_correct / a.images, 5),
                          "int8_top1": round(a.int8_correct / a.images, 5)},
            "speed": {"fp32": self.fp32.as_dict(), "int8": self.int8.as_dict(),
                      "latency_speedup": round(self.latency_speedup, 3),
                      "throughput_speedup": round(self.throughput_speedup, 3),
                      "runtime": "onnxruntime CPU", "cpu": cpu_name()},
            "size_bytes": {"fp32": self.fp32_bytes, "int8": self.int8_bytes},
        }


# ----------------------------------------------------------------------------------- data


def _images_of(samples: Samples, img_size: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """uint8 NCHW batches (the checkpoint's eval preprocessing) and labels; unreadable files skipped."""
    from cnntrain.data import ImageDataset, default_workers, eval_transform, make_loader
    from cnntrain.data.loader import collate_skipping

    dataset = ImageDataset(samples, eval_transform(img_size), skip_unreadable=True)
    loader = make_loader(dataset, batch_size=batch_size, shuffle=False, workers=min(default_workers(), 2),
                         collate_fn=collate_skipping)
    for images, labels, _ in loader:
        if len(labels):
            yield images, labels


def _split_for_int8(splits: Any, calib_images: int, seed: int) -> tuple[Samples, Samples, str]:
    """Calibration images (a seeded sample of the train split, so every class is in it) and the images
    to check agreement on: the val split, or, with nothing held out, the training images left over."""
    if not splits.train:
        raise DataError(f"{splits.description} has no training images to calibrate the int8 model on; "
                        "give --data-path DIR (class folders)")
    train = list(splits.train)
    random.Random(seed).shuffle(train)
    calib, rest = train[:calib_images], train[calib_images:]
    if splits.val:
        return calib, list(splits.val), "val"
    if rest:
        return calib, rest, "train images not used for calibration"
    raise DataError(f"{splits.description} holds out no validation images and --calib-images {calib_images} uses "
                    "all the training images: nothing is left to check the int8 model on; lower --calib-images "
                    "or give --data-path DIR")


class _CalibrationReader:
    """onnxruntime's ``CalibrationDataReader`` protocol (``get_next``: one input dict, None at the end)."""

    def __init__(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], input_name: str) -> None:
        self.batches, self.input_name, self.images = batches, input_name, 0

    def get_next(self) -> dict[str, Any] | None:
        batch = next(self.batches, None)
        if batch is None:
            return None
        self.images += len(batch[0])
        return {self.input_name: batch[0].contiguous().numpy()}


# ----------------------------------------------------------------------------------- steps


def _quantize(fp32: Path, out: Path, reader: _CalibrationReader) -> None:
    """Pre-process, calibrate and quantize ``fp32`` into ``out`` with onnxruntime's tools."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = fp32.with_name("prepared.onnx")
    quant_pre_process(str(fp32), str(prepared))
    quantize_static(str(prepared), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=_PER_CHANNEL,
                    reduce_range=_REDUCE_RANGE, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=logit_layer(prepared))
    # No CalibMaxIntermediateOutputs: calibration keeps only each tensor's min and max per batch (small), and
    # in onnxruntime 1.32 that option drops the batches collected so far instead of merging their ranges.


# Ops that only move or reshape values: between the last real layer and the graph's output.
_PASS_THROUGH = {"Flatten", "Reshape", "Squeeze", "Identity", "Dropout", "Cast"}


def logit_layer(path: Path) -> list[str]:
    """The nodes from the graph's output back to the last layer that computes it (e.g. the final Gemm).

    They stay in float: quantized, the logits themselves would be rounded to 256 levels across their
    calibrated range, and classes whose logits lie closer than one step would tie, so top-1 changes
    exactly where the model is least sure. Keeping one layer in float costs next to nothing.
    """
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    names, tensor = [], graph.output[0].name
    while tensor in producer:
        node = producer[tensor]
        names.append(node.name)
        if node.op_type not in _PASS_THROUGH or not node.input:
            break
        tensor = node.input[0]
    return names


def measure_agreement(fp32: Callable[[torch.Tensor], torch.Tensor], int8: Callable[[torch.Tensor], torch.Tensor],
                      batches: Iterator[tuple[torch.Tensor, torch.Tensor]], split: str) -> Agreement:
    """Top-1 of both models on every batch: how often they agree, and how often each is right."""
    images = agree = fp32_correct = int8_correct = 0
    for batch, labels in batches:
        a, b = fp32(batch).argmax(1), int8(batch).argmax(1)
        images += len(labels)
        agree += int((a == b).sum())
        fp32_correct += int((a == labels).sum())
        int8_correct += int((b == labels).sum())
    if not images:
        raise DataError(f"none of the {split} images could be read, so the int8 model cannot be checked")
    return Agreement(images, agree, fp32_correct, int8_correct, split)


def _refused(a: Agreement, accept_drop: float) -> Int8Error:
    drop = 1 - a.fraction
    return Int8Error(f"the int8 model agrees with the fp32 one on {a.fraction:.1%} of {a.images} {a.split} images "
                     f"(top-1; {a.images - a.agree} changed, accuracy {a.fp32_correct / a.images:.1%} -> "
                     f"{a.int8_correct / a.images:.1%}), below the {1 - accept_drop:.1%} required; nothing was "
                     f"written; --accept-drop {_round_up(drop)} accepts it")


def _round_up(drop: float) -> str:
    """The smallest 3-decimal fraction that is at least ``drop``, for the message's suggestion."""
    return f"{min(1.0, -(-round(drop * 1e6) // 1000) / 1000):.3f}"


# ----------------------------------------------------------------------------------- export


def export_int8(weights: str | Path, output: str | Path | None = None, *, calib_images: int | None = None,
                accept_drop: float | None = None, data_path: str | Path | None = None,
                dynamic_batch: bool = False, opset: int | None = None, log: Log = lambda s: None) -> Any:
    """Export ``weights`` as a verified int8 ONNX model; returns an ExportResult with ``int8`` set."""
    from cnntrain import checkpoint, export
    from cnntrain.evaluation import DataChoice, checkpoint_splits
    from cnntrain.exported import open_exported, sidecar_path

    check_int8_request("onnx", calib_images, accept_drop, True)
    calib_images = DEFAULT_CALIB_IMAGES if calib_images is None else calib_images
    accept_drop = DEFAULT_ACCEPT_DROP if accept_drop is None else accept_drop
    output = Path(output) if output is not None else default_int8_output(weights)
    export.check_request("onnx", opset, output)
    ckpt = checkpoint.require_full(checkpoint.load(weights), weights)
    splits = checkpoint_splits(ckpt, weights, DataChoice(data_path), log)
    calib, check, split = _split_for_int8(splits, calib_images, int((ckpt.get("config") or {}).get("seed", 0)))
    img_size = int(ckpt["img_size"])
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cnntrain-int8-") as tmp:
        fp32 = export.export_loaded(ckpt, weights, Path(tmp) / "fp32.onnx", "onnx", dynamic_batch=dynamic_batch,
                                    opset=opset)
        meta = json.loads(fp32.sidecar.read_text(encoding="utf-8"))
        quantized = Path(tmp) / "int8.onnx"
        reader = _CalibrationReader(_images_of(calib, img_size, 8 if dynamic_batch else 1), export.INPUT_NAME)
        log(f"calibrating on {len(calib)} training images of {splits.description} ...")
        try:
            _quantize(fp32.path, quantized, reader)
        except Exception as exc:  # onnxruntime raises many types; each means this graph did not quantize
            raise Int8Error(f"onnxruntime could not quantize the {ckpt['arch']} export "
                            f"({first_line(exc, with_type=True)}); nothing was written") from None
        fp32_model, int8_model = (open_exported("onnx", path, meta, "cpu") for path in (fp32.path, quantized))
        log(f"checking int8 against fp32 on {len(check)} {split} images ...")
        agreement = measure_agreement(fp32_model, int8_model, _images_of(check, img_size, 16), split)
        if not agreement.within(accept_drop):
            raise _refused(agreement, accept_drop)
        log(f"timing fp32 and int8 back to back (batch 1 and batch {TIMING_BATCH}) ...")
        fp32_speed, int8_speed = (time_model(m, img_size, batch_size=TIMING_BATCH, runs=TIMING_RUNS)
                                  for m in (fp32_model, int8_model))
        report = Int8Report(reader.images, agreement, accept_drop, fp32_speed, int8_speed, fp32.path.stat().st_size,
                            quantized.stat().st_size)
        meta.update(model_file=output.name, int8=report.as_dict())
        meta["verification"]["of"] = "the fp32 graph, before quantization"
        _publish(quantized, output, meta)
    if "sha256" in meta:  # the fp32 file's: this sidecar describes the int8 one
        meta["sha256"] = fileio.sha256_file(output)
    sidecar = sidecar_path(output)
    fileio.atomic_write_text(sidecar, json.dumps(meta, indent=2) + "\n")
    return export.ExportResult(output, sidecar, "onnx", fp32.max_abs_diff, fp32.allowed, fp32.batch_sizes,
                               time.perf_counter() - start, int8=report)


def _publish(quantized: Path, output: Path, meta: dict[str, Any]) -> None:
    """The int8 graph under its final name, with the sidecar's facts in its metadata as the fp32 export has."""
    import onnx

    from cnntrain.export import METADATA_KEYS

    proto = onnx.load(str(quantized))
    props = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items() if k in METADATA_KEYS}
    props["quantization"] = "int8 (onnxruntime quantize_static, QDQ)"
    onnx.helper.set_model_props(proto, props)
    proto.doc_string = f"cnntrain {meta['arch']} int8: uint8 RGB NCHW in, logits out; see the .json sidecar"
    try:
        with fileio.atomic_path(output) as tmp:
            onnx.save(proto, str(tmp))
    except OSError as exc:
        raise Int8Error(f"could not write {output}: {exc.strerror or exc}") from None


def describe(report: Int8Report) -> Sequence[str]:
    """The lines ``export --int8`` prints: agreement, speed-up, size."""
    a, f, q = report.agreement, report.fp32, report.int8
    return [
        f"int8 agrees with fp32 on {a.fraction:.1%} of {a.images} {a.split} images (top-1; required "
        f"{1 - report.accept_drop:.1%}); accuracy {a.fp32_correct / a.images:.1%} fp32, "
        f"{a.int8_correct / a.images:.1%} int8; calibrated on {report.calib_images} training images",
        f"latency (batch 1): {f.latency_ms:.2f} ms fp32 -> {q.latency_ms:.2f} ms int8 ({report.latency_speedup:.2f}x); "
        f"throughput (batch {f.batch_size}): {f.images_per_s:.1f} -> {q.images_per_s:.1f} images/s "
        f"({report.throughput_speedup:.2f}x); onnxruntime CPU, median of {f.runs} runs",
        f"size: {report.fp32_bytes / 1e6:.1f} MB fp32 -> {report.int8_bytes / 1e6:.1f} MB int8",
    ]
