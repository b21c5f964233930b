"""Find and replace the classifier head, and freeze everything else.

One rule serves every family (``fc``, ``classifier[-1]``, ``heads.head``, SqueezeNet's 1x1
conv): the head is the last Linear or 1x1 Conv2d, in module order, whose output size is
the model's class count. No per-family tables, so new architectures need nothing here.
"""

from __future__ import annotations

import torch.nn as nn

from cnntrain.errors import UsageError


def _out_features(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1:
        return module.out_channels
    return None


def find_head(model: nn.Module, num_classes: int) -> str:
    """Qualified name of the final classification layer (e.g. ``fc``, ``classifier.1``)."""
    found = [name for name, m in model.named_modules() if _out_features(m) == num_classes]
    if not found:
        raise UsageError(
            f"{type(model).__name__} has no Linear or 1x1 conv layer with {num_classes} outputs to use as head"
        )
    return found[-1]


def replace_head(model: nn.Module, old_classes: int, num_classes: int) -> str:
    """Swap the head for a freshly initialised one with ``num_classes`` outputs; returns its name."""
    name = find_head(model, old_classes)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    if isinstance(old, nn.Linear):
        new: nn.Module = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, kernel_size=1, bias=old.bias is not None)
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    setattr(parent, attr, new)
    # SqueezeNet (and anything like it) keeps its class count as an attribute used in forward.
    if getattr(model, "num_classes", None) == old_classes:
        model.num_classes = num_classes  # type: ignore[assignment]  # a plain int attribute
    return name


def is_head(name: str, head: str) -> bool:
    """True for the head module ``head`` itself and for anything inside it (``fc``, ``fc.weight``),
    but not for a sibling that merely shares the prefix (``fc2``): the one test of "is this the head"
    for parameters, modules and state-dict keys alike."""
    return name == head or name.startswith(head + ".")


def freeze_backbone(model: nn.Module, head: str) -> None:
    """Train only ``head``; pair with ``keep_frozen_bn_eval`` so BatchNorm statistics stay fixed too."""
    for name, param in model.named_parameters():
        param.requires_grad_(is_head(name, head))


def unfreeze(model: nn.Module) -> None:
    for param in model.parameters():
        param.requires_grad_(True)


def keep_frozen_bn_eval(model: nn.Module, head: str) -> None:
    """Call after ``model.train()`` while the backbone is frozen: BatchNorm outside the
    head stays in eval mode, so fine-tuning the head does not drift the backbone's statistics."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not is_head(name, head):
            module.eval()
