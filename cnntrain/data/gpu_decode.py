"""``--gpu-decode``: JPEGs travel to the GPU as bytes and are decoded and augmented there.

When the loader workers cannot decode fast enough for the GPU (many GPUs, few cores, big
photos), decoding with nvjpeg moves the heaviest step off the CPU. The workers then only read
each file and check its header; the main process decodes a whole batch with one
``torchvision.io.decode_jpeg(list, device=...)`` call and runs the very same v2 transforms on
the device, per image (sizes differ until the crop), before stacking the uint8 batch that
:class:`~cnntrain.engine.Batcher` normalises as usual.

Everything else takes the usual CPU path in the worker, so results never depend on what
nvjpeg supports: non-JPEG files, CMYK JPEGs, images over the size limits, and any JPEG that
fails on the device (decoded again with :func:`~cnntrain.data.decode.decode_image`). EXIF
orientation is applied on the device. Random augmentations draw from the same per-sample
seed as on the CPU (the seed travels with the bytes), so runs stay reproducible.

Nothing here needs a GPU to run: with ``device="cpu"`` the same path decodes with
libjpeg-turbo, which is how the tests check it against the CPU pipeline.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from cnntrain.data import decode
from cnntrain.data.datasets import ImageDataset, Unreadable
from cnntrain.data.decode import TEXT_LIMIT, ImageDecodeError, decode_image
from cnntrain.data.loader import collate_skipping
from cnntrain.errors import first_line
from cnntrain.runtime import seed_cpu

logger = logging.getLogger(__name__)

Transform = Callable[[torch.Tensor], torch.Tensor]
#: Files worth reading as bytes; the header decides whether they really are plain JPEGs.
JPEG_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif")

# EXIF orientation -> the same operation as decode.py's PIL transposes, on a C x H x W tensor.
_ORIENT: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    2: lambda t: t.flip(-1),
    3: lambda t: t.flip(-1, -2),
    4: lambda t: t.flip(-2),
    5: lambda t: t.transpose(-1, -2),
    6: lambda t: torch.rot90(t, -1, (-2, -1)),
    7: lambda t: t.transpose(-1, -2).flip(-1, -2),
    8: lambda t: torch.rot90(t, 1, (-2, -1)),
}


def use_gpu_decode(requested: bool, device: torch.device | str, log: Callable[[str], None]) -> bool:
    """Whether to decode on ``device``: only when asked and it is CUDA (one info line either way)."""
    if not requested:
        return False
    device = torch.device(device)
    if device.type != "cuda":
        log(f"--gpu-decode needs a CUDA device; {device.type} decodes on the CPU as usual")
        return False
    log(f"--gpu-decode: JPEGs are decoded and augmented on {device}; other images on the CPU (image cache off)")
    return True


@dataclass
class Encoded:
    """One JPEG's bytes, to be decoded and transformed on the device.

    ``seed`` is the torch seed the worker ran under (the sampler's per-sample seed), so the
    transform's random draws are the ones the CPU path would have made.
    """

    data: torch.Tensor  # 1-D uint8, the file's bytes
    label: int
    path: str
    seed: int
    orientation: int
    transform: Transform | None


def _plain_jpeg(path: str, data: bytes) -> int | None:
    """The EXIF orientation if ``data`` is a JPEG nvjpeg can decode to RGB within our limits, else None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                    return None
                decode._check_geometry(path, img.size)
                return decode._orientation(img)
    except Exception:  # noqa: BLE001 - anything odd: the CPU path decides, with its own error message
        return None


class EncodedImageDataset(ImageDataset):
    """:class:`ImageDataset` whose plain JPEGs come out as :class:`Encoded` bytes.

    Other files (and JPEGs that cannot be read) go through ``ImageDataset`` unchanged: decoded
    and transformed here, or :class:`Unreadable`. Pair it with :func:`collate_encoded`.
    """

    def __getitem__(self, index: int) -> Encoded | tuple[torch.Tensor, int] | Unreadable:  # type: ignore[override]
        path, label = self.samples[index]
        if not str(path).lower().endswith(JPEG_EXTENSIONS):
            return super().__getitem__(index)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            data = b""
        orientation = _plain_jpeg(str(path), data) if data else None
        if orientation is None:
            return super().__getitem__(index)
        tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return Encoded(tensor, label, str(path), torch.initial_seed(), orientation, self.transform)


class EncodedBatch:
    """A batch of CPU-ready images (already transformed) and JPEG bytes, in loader order.

    :meth:`decode_on` turns it into the uint8 ``N x 3 x H x W`` batch on the device; the
    ``Batcher`` calls it first thing, so the engine loops need not know about it.
    """

    def __init__(self, items: list[torch.Tensor | Encoded]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def pin_memory(self) -> EncodedBatch:
        """Called by DataLoader(pin_memory=True): pin the bytes and pixels for async copies."""
        for item in self.items:
            if isinstance(item, Encoded):
                item.data = item.data.pin_memory()
        self.items = [i.pin_memory() if isinstance(i, torch.Tensor) else i for i in self.items]
        return self

    def decode_on(self, device: torch.device | str, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(uint8 images on device, targets)``; an image that cannot be decoded at all is
        dropped with a warning (its target too). When none can be, the batch is empty, as the
        CPU path's is, and the loops skip it (under DDP every rank then skips that step)."""
        device = torch.device(device)
        jpegs = [i for i, item in enumerate(self.items) if isinstance(item, Encoded)]
        decoded = dict(zip(jpegs, _decode_jpegs([self.items[i].data for i in jpegs], device)))
        out: list[torch.Tensor] = []
        keep: list[int] = []
        for i, item in enumerate(self.items):
            if isinstance(item, torch.Tensor):
                out.append(item.to(device, non_blocking=device.type == "cuda"))
            else:
                image = decoded[i]
                if image is None:  # nvjpeg refused it: the CPU decoder, which also applies EXIF
                    try:
                        image = decode_image(item.path).to(device)
                    except ImageDecodeError as e:
                        logger.warning("skipping unreadable image %s: %s", first_line(item.path, TEXT_LIMIT), e.reason)
                        continue
                else:
                    image = _ORIENT.get(item.orientation, lambda t: t)(image)
                out.append(_transform(image, item))
            keep.append(i)
        if not out:
            return torch.empty((0, 3, 0, 0), dtype=torch.uint8, device=device), targets[:0]
        targets = targets if len(keep) == len(self.items) else targets[torch.as_tensor(keep)]
        return torch.stack(out), targets


def _decode_jpegs(blobs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """Decode on ``device`` in one call; if that fails, one by one (None for each that fails).

    Out of memory is not a failure to decode: it goes up, so that training says to try a smaller
    ``--batch-size`` instead of quietly decoding every batch on the CPU."""
    if not blobs:
        return []
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(data: torch.Tensor | list[torch.Tensor]) -> Any:
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError as exc:
            _raise_if_out_of_memory(exc)
            raise

    def decode_all() -> list[torch.Tensor | None]:
        try:
            return list(decode(blobs))
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:
            pass
        results: list[torch.Tensor | None] = []
        for blob in blobs:
            try:
                results.append(decode(blob))
            except torch.OutOfMemoryError:
                raise
            except RuntimeError:
                results.append(None)
        return results

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision 0.29 deprecates its decoders in favour of TorchCodec
        return in_stream_order(decode_all, device)


def _raise_if_out_of_memory(exc: RuntimeError) -> None:
    """torchvision wraps whatever fails inside nvjpeg, the allocator's out-of-memory included, in
    a plain RuntimeError ("Error while decoding JPEG images: CUDA out of memory ...")."""
    if isinstance(exc, torch.OutOfMemoryError):
        raise exc
    if "out of memory" in str(exc).lower():
        raise torch.OutOfMemoryError(first_line(exc)) from exc


#: One side stream per GPU for the decoder's output allocations (see in_stream_order).
_SIDE_STREAMS: dict[int, Any] = {}


def in_stream_order(decode: Callable[[], Sequence[torch.Tensor | None]], device: torch.device
                    ) -> list[torch.Tensor | None]:
    """Run ``decode`` (nvjpeg) so that its outputs cannot overwrite memory queued kernels still read.

    torchvision's ``decode_jpegs_cuda`` (torchvision/csrc/io/image/cuda/decode_jpegs_cuda.cpp)
    allocates the output tensors on the caller's current stream, decodes into them on a stream of
    its own, and only then makes the current stream wait for its stream. Its stream never waits
    for the current one. The caching allocator hands out a block as soon as a tensor on that
    stream is freed, while the kernels that read it (the previous step, whose loss is read only
    every 20 steps) may still be queued, so nvjpeg could write into memory they still read.

    So the decode runs with a side stream current: its outputs come from that stream's blocks. The
    main stream waits for the side stream, and each output is recorded on the main stream, so
    the allocator gives its block out again only after the main stream's work with it is done."""
    if device.type != "cuda":
        return list(decode())
    index = device.index if device.index is not None else torch.cuda.current_device()
    main = torch.cuda.current_stream(index)
    side = _SIDE_STREAMS.get(index)
    if side is None:
        side = _SIDE_STREAMS[index] = torch.cuda.Stream(index)
    with torch.cuda.stream(side):
        images = list(decode())
    main.wait_stream(side)
    for image in images:
        if image is not None:
            image.record_stream(main)
    return images


def _transform(image: torch.Tensor, item: Encoded) -> torch.Tensor:
    """``item.transform`` on the device, with the random draws the worker would have made."""
    if item.transform is None:
        return image
    with torch.random.fork_rng(devices=[]):
        seed_cpu(item.seed)  # v2 transforms draw on the CPU; the CUDA generators stay the model's
        return item.transform(image)


def collate_encoded(batch: list[Any]) -> tuple[Any, torch.Tensor, list[str]]:
    """:func:`collate_skipping` for :class:`EncodedImageDataset`: a plain uint8 batch when no
    item is encoded, else an :class:`EncodedBatch` (unreadable items dropped and reported)."""
    if not any(isinstance(item, Encoded) for item in batch):
        return collate_skipping(batch)
    skipped = [item.path for item in batch if isinstance(item, Unreadable)]
    good = [item for item in batch if not isinstance(item, Unreadable)]
    items = [item if isinstance(item, Encoded) else item[0] for item in good]
    targets = torch.as_tensor([int(item.label if isinstance(item, Encoded) else item[1]) for item in good],
                              dtype=torch.long)
    return EncodedBatch(items), targets, skipped
