"""DP-Morph inside training (setting `morph_in_training`): differentiable class-wise opening/closing on the network's
output, before the loss and at inference.

DP-Morph (Parsarad et al., AISec 2025) put morphological operations inside the training pipeline so that the network
learns masks whose morphology repairs DP noise. Here the operations act on each foreground class's logit map z_c:

    dilation D(z) = max over the k-neighbourhood (max-pool, stride 1),   erosion E(z) = -D(-z)
    closing = E(D(z)),   opening = D(E(z))

Grey-scale morphology commutes with increasing maps (max(f(z)) = f(max(z))), so on a class's logits it is the same
operation as on that class's evidence before the softmax. Max-pooling is exact and its gradient flows to the
arg-max voxel of each window (the "hard" variant; no temperature to tune). Every case is filtered on its own: nothing
couples cases, and per-case gradients stay exact in both engines (tests/test_morph.py). Outside the image the
dilation sees -inf and the erosion +inf: a structure touching the border is neither grown nor cut there.

The operation is part of the network nnU-Net builds from the plans: the DP trainer writes `morph_network` (this
module) as the plans' network class, with the original class and the operations as arguments. It builds the
original network (same parameters and state_dict keys, so public weights load unchanged) and registers a forward
hook that filters its outputs; `nnUNetv2_predict` rebuilds the same from the results folder's plans. Deep-supervision
outputs are filtered with the kernel scaled to their resolution (odd, at least 1: identity when it falls below 3).
"""
from __future__ import annotations

import math
import pydoc
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

MorphOp = Literal["none", "open", "close"]
MORPH_NETWORK_PATH = "nnunet_dp.morph.morph_network"
_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def dilate(z: torch.Tensor, kernel: Sequence[int]) -> torch.Tensor:
    """Grey-scale dilation of (B, C, *spatial) over an odd box `kernel` (stride 1, same size)."""
    if all(k == 1 for k in kernel):
        return z
    return _POOL[len(kernel)](z, kernel_size=tuple(kernel), stride=1, padding=tuple(k // 2 for k in kernel))


def erode(z: torch.Tensor, kernel: Sequence[int]) -> torch.Tensor:
    return -dilate(-z, kernel)


def apply_op(z: torch.Tensor, op: MorphOp, kernel: Sequence[int]) -> torch.Tensor:
    if op == "close":
        return erode(dilate(z, kernel), kernel)
    if op == "open":
        return dilate(erode(z, kernel), kernel)
    return z


def scaled_kernel(kernel: Sequence[int], factors: Sequence[float]) -> tuple[int, ...]:
    """`kernel` at a resolution `factors` times the full one (per axis): the largest odd size <= k * f, at least 1."""
    out = []
    for k, f in zip(kernel, factors, strict=True):
        size = max(1, math.floor(k * f))
        out.append(size if size % 2 else size - 1)
    return tuple(out)


def filter_logits(z: torch.Tensor, ops: Mapping[int, tuple[MorphOp, Sequence[int]]],
                  factors: Sequence[float] | None = None) -> torch.Tensor:
    """z (B, C, *spatial) with class c's channel replaced by its opening/closing for every c in `ops` (channels not
    named, e.g. background, unchanged). `factors`: this output's resolution relative to the full one."""
    if not ops:
        return z
    channels = list(z.unbind(1))
    for c, (op, kernel) in ops.items():
        k = tuple(kernel) if factors is None else scaled_kernel(kernel, factors)
        channels[c] = apply_op(channels[c].unsqueeze(1), op, k).squeeze(1)
    return torch.stack(channels, 1)


def _filter_outputs(ops: Mapping[int, tuple[MorphOp, Sequence[int]]]) -> Any:
    def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
        if isinstance(output, (list, tuple)):  # deep supervision: full resolution first
            full = output[0].shape[2:]
            filtered = [filter_logits(o, ops, [s / f for s, f in zip(o.shape[2:], full)]) for o in output]
            return type(output)(filtered)
        return filter_logits(output, ops)
    return hook


def parse_ops(morph_ops: Mapping[str, Any], num_classes: int) -> dict[int, tuple[MorphOp, tuple[int, ...]]]:
    """{"1": ["close", [3, 3]], ...} (JSON keys are strings) -> {1: ("close", (3, 3))}; 'none' entries dropped."""
    out: dict[int, tuple[MorphOp, tuple[int, ...]]] = {}
    for key, (op, kernel) in morph_ops.items():
        c = int(key)
        if not 0 < c < num_classes or op not in ("none", "open", "close"):
            raise ValueError(f"morph_ops entry {key!r}: {op!r}: a foreground class in 1..{num_classes - 1} and one of "
                             "'none', 'open', 'close'")
        if any(int(k) < 1 or int(k) % 2 == 0 for k in kernel):
            raise ValueError(f"morph_ops entry {key!r}: kernel {kernel!r} must hold odd sizes >= 1")
        if op != "none":
            out[c] = (op, tuple(int(k) for k in kernel))
    return out


def morph_network(input_channels: int, num_classes: int, *, morph_base_network: str,
                  morph_ops: Mapping[str, Any], **kwargs: Any) -> nn.Module:
    """The plans' network class `morph_base_network` built with `kwargs`, its outputs filtered by `morph_ops` (a
    forward hook: the network, its parameters and its state_dict are the original class's)."""
    cls = pydoc.locate(morph_base_network)
    if cls is None:
        raise ImportError(f"morph_network: network class {morph_base_network!r} not found")
    network = cls(input_channels=input_channels, num_classes=num_classes, **kwargs)
    ops = parse_ops(morph_ops, num_classes)
    network.register_forward_hook(_filter_outputs(ops))
    network.dp_morph_ops = ops  # what the hook applies (for logs and tests)
    return network
