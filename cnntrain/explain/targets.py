"""Which layer Grad-CAM looks at: the last spatial feature map before the pooling and the head.

No table per family: the layer is found by watching one forward pass. Every module's output is
recorded in the order the modules finish; the candidates are the modules whose output is an
NCHW map larger than 1x1, called once, that are not pooling layers themselves. Going back from
the last candidate, the first one that is a *bottleneck* wins: with its output cut off from the
graph (detached), the logits no longer depend on the input at all, so everything the head sees
passes through it. That one rule gives ``layer4`` for ResNets, ``features`` for VGG, DenseNet,
MobileNet, EfficientNet and ConvNeXt, ``trunk_output`` for RegNet, ``conv5`` for ShuffleNetV2,
the class maps of SqueezeNet, and the last NCHW map of Swin and MaxViT; a side branch that finishes
late (an attention map) is never taken for the trunk.

A vision transformer (ViT) turns the image into a sequence of tokens after its first layer:
the only spatial map is the patch embedding, far from the head, and Grad-CAM there means
little. Such a model, recognised by the 3-D token outputs after its last map, is refused with
one line, as is any model without a spatial map at the given input size.

The probe runs on the model's own device; on the meta device it costs nothing (shapes only),
which is how the tests walk the whole registry.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from cnntrain.errors import UsageError

_POOLING = (nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
            nn.modules.pooling._AvgPoolNd, nn.modules.pooling._MaxPoolNd)
MAX_TRIES = 8  # bottleneck checks before giving up (the first candidate passes for every registered model)


@dataclass(frozen=True)
class TargetLayer:
    """The layer Grad-CAM reads, and the shape of its output (C, H, W) at the probed size."""

    name: str
    module: nn.Module
    shape: tuple[int, int, int]


@dataclass
class _Call:
    name: str
    shape: tuple[int, ...]
    grad_fn: object  # the autograd node that made the output (None for a tensor outside the graph)
    calls: int = 1


def find_target_layer(model: nn.Module, img_size: int | tuple[int, int], *, arch: str | None = None) -> TargetLayer:
    """The last spatial feature map of ``model`` that everything the head sees goes through.

    ``img_size``: the input the model is used at (the map must be larger than 1x1 there).
    ``arch`` only names the model in errors. Raises UsageError for token-sequence transformers
    and models with no usable map."""
    what = arch or type(model).__name__
    size = (img_size, img_size) if isinstance(img_size, int) else img_size
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    probe = torch.zeros(1, 3, *size, device=device, requires_grad=True)
    with eval_mode(model):
        calls, logits = _record_outputs(model, probe)
    candidates = [i for i, c in enumerate(calls) if _is_map(c) and c.calls == 1
                  and not isinstance(model.get_submodule(c.name), _POOLING)]
    if not candidates:
        raise UsageError(f"Grad-CAM needs a spatial feature map and {what} has none larger than 1x1 at "
                         f"{size[0]}x{size[1]} px; it explains CNNs at their training size")
    if any(len(c.shape) == 3 and c.shape[1] > 1 for c in calls[candidates[-1] + 1:]):
        raise UsageError(f"Grad-CAM is for CNNs: {what} turns the image into a sequence of tokens (a vision "
                         "transformer), so it has no feature map before its head to explain; use a "
                         "convolutional architecture")
    for index in reversed(candidates[-MAX_TRIES:]):
        call = calls[index]
        if not _reaches(logits.grad_fn, probe, avoiding=call.grad_fn):
            c, h, w = call.shape[1:]
            return TargetLayer(call.name, model.get_submodule(call.name), (c, h, w))
    raise UsageError(f"could not find the layer of {what} that its head reads all of its input through "
                     "(Grad-CAM's target); it explains CNNs whose head follows one feature map")


def _is_map(call: _Call) -> bool:
    return len(call.shape) == 4 and call.shape[2] * call.shape[3] > 1


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (BatchNorm statistics and dropout untouched by the probe), then as it was."""
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in was_training.items():
            module.training = training


def _record_outputs(model: nn.Module, probe: torch.Tensor) -> tuple[list[_Call], torch.Tensor]:
    """Every submodule's output, in the order the modules finished (a module's last call counts),
    and the logits, whose autograd graph says what depends on what."""
    calls: dict[str, _Call] = {}

    def hook(name: str):
        def record(module: nn.Module, args: object, output: object) -> None:
            previous = calls.pop(name, None)  # re-inserted: the dict's order is that of the last finish
            tensor = output if isinstance(output, torch.Tensor) else None
            calls[name] = _Call(name, tuple(tensor.shape) if tensor is not None else (),
                                tensor.grad_fn if tensor is not None else None,
                                previous.calls + 1 if previous else 1)
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        with torch.enable_grad():
            logits = model(probe)
    finally:
        for handle in handles:
            handle.remove()
    return list(calls.values()), logits


def _reaches(node: object, leaf: torch.Tensor, avoiding: object) -> bool:
    """Whether the autograd graph below ``node`` still accumulates a gradient into ``leaf`` with
    the node ``avoiding`` (a layer's output, recorded as it was made) taken out: False means
    the layer is a bottleneck, every path from the input to the logits goes through it."""
    seen: set[int] = {id(avoiding)} if avoiding is not None else set()
    stack = [node]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if getattr(current, "variable", None) is leaf:
            return True
        stack.extend(next_node for next_node, _ in getattr(current, "next_functions", ()))
    return False
