"""Low-rank residual adapters on convolutions (setting `trainable: lora`, `lora_rank` r).

LoRA (Hu et al., "LoRA: Low-rank adaptation of large language models", ICLR 2022; under DP: Yu et al.,
"Differentially private fine-tuning of language models", ICLR 2022) on a convolution W (k×k, C_in → C_out):

    y = W * x + B * (A * x),    A: k×k conv C_in → r (same stride, padding, dilation as W),  B: 1×1 conv r → C_out

B starts at zero, so training starts from the public network's function. Both factors are ordinary convolutions, so
both per-case gradient engines handle them as they handle any convolution. The sum is linear in x, hence one
convolution with the merged kernel (exact, float rounding aside):

    conv:            W'[o, i, ...] = W[o, i, ...] + sum_r B[o, r] A[r, i, ...]
    transposed conv: W'[i, o, ...] = W[i, o, ...] + sum_r A[i, r, ...] B[o, r]     (torch's layout: in, out, ...)

The adapted layer presents itself as the plain convolution: its state_dict holds the merged kernel under the plain
keys (`weight`, `bias`), so checkpoints are ordinary nnU-Net checkpoints that `nnUNetv2_predict` loads into the plain
network the plans build, and nnU-Net's `load_pretrained_weights` sees the keys it expects. Loading a plain state
keeps the function it describes: W = W' − B·A for the current factors. The factors themselves travel separately
(`factors` / `load_factors`) so that a resumed training continues them exactly.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_TRANSPOSED = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
FACTOR_NAMES = ("lora_a", "lora_b")


class LoRAConv(nn.Module):
    """A frozen-or-not convolution `base` plus the low-rank residual B(A(x)); see the module docstring."""

    def __init__(self, base: _ConvNd, rank: int) -> None:
        super().__init__()
        dims = len(base.kernel_size)
        self.transposed = isinstance(base, _ConvTransposeNd)
        self.base = base
        common = {"kernel_size": base.kernel_size, "stride": base.stride, "padding": base.padding,
                  "dilation": base.dilation, "bias": False, "device": base.weight.device, "dtype": base.weight.dtype}
        if self.transposed:
            self.lora_a = _TRANSPOSED[dims](base.in_channels, rank, output_padding=base.output_padding, **common)
        else:
            self.lora_a = _CONV[dims](base.in_channels, rank, **common)
        self.lora_b = _CONV[dims](rank, base.out_channels, 1, bias=False, device=base.weight.device,
                                  dtype=base.weight.dtype)
        nn.init.zeros_(self.lora_b.weight)
        self.register_state_dict_post_hook(_plain_state)
        self.register_load_state_dict_pre_hook(_from_plain_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_b(self.lora_a(x))

    def delta(self) -> torch.Tensor:
        """B·A in the layout of base.weight."""
        a, b = self.lora_a.weight, self.lora_b.weight.flatten(1)  # b: (C_out, r)
        if self.transposed:  # a: (C_in, r, *k)
            return torch.einsum("ir...,or->io...", a, b)
        return torch.einsum("or,ri...->oi...", b, a)  # a: (r, C_in, *k)


def _plain_state(module: LoRAConv, state: dict[str, Any], prefix: str, _meta: Any) -> None:
    """state_dict post-hook: the merged kernel under the plain convolution's keys, no factor keys."""
    base_weight = state.pop(prefix + "base.weight")
    for name in FACTOR_NAMES:
        state.pop(prefix + name + ".weight")
    state[prefix + "weight"] = base_weight + module.delta().detach().to(base_weight.dtype)
    if prefix + "base.bias" in state:
        state[prefix + "bias"] = state.pop(prefix + "base.bias")


def _from_plain_state(module: LoRAConv, state: dict[str, Any], prefix: str, *_args: Any) -> None:
    """load_state_dict pre-hook: a plain kernel W' becomes base = W' − B·A for the current factors (the loaded state
    describes the function); the factors keep their values."""
    if prefix + "weight" not in state:
        return  # a state with the adapter's own keys (or missing keys: load_state_dict reports them)
    merged = state.pop(prefix + "weight")
    with torch.no_grad():
        state[prefix + "base.weight"] = merged - module.delta().detach().to(merged.device, merged.dtype)
    if prefix + "bias" in state:
        state[prefix + "base.bias"] = state.pop(prefix + "bias")
    for name in FACTOR_NAMES:
        state[prefix + name + ".weight"] = getattr(module, name).weight.detach().clone()


def add_adapters_(model: nn.Module, rank: int, *, skip: Any = ()) -> list[LoRAConv]:
    """Replace every convolution of `model` (except the modules in `skip`) by a LoRAConv of rank `rank`, at every
    place the model holds it (nnU-Net's blocks hold each conv twice: `.conv` and `.all_modules[0]`). Returns the
    adapters in model order. Grouped convolutions are refused (nnU-Net's have none)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"lora rank must be an integer >= 1, got {rank!r}")
    skipped = {id(m) for m in skip}
    wrapped: dict[int, LoRAConv] = {}
    for parent in list(model.modules()):
        if isinstance(parent, LoRAConv):
            continue
        for name, child in list(parent._modules.items()):
            if not isinstance(child, _ConvNd) or id(child) in skipped:
                continue
            if child.groups != 1 or child.padding_mode != "zeros":
                raise ValueError(f"lora: convolution {type(child).__name__} with groups={child.groups}, padding_mode="
                                 f"{child.padding_mode!r} is not supported (groups=1, zero padding only)")
            if id(child) not in wrapped:
                wrapped[id(child)] = LoRAConv(child, rank)
            parent._modules[name] = wrapped[id(child)]
    return list(dict.fromkeys(m for m in model.modules() if isinstance(m, LoRAConv)))


def adapters(model: nn.Module) -> Iterator[tuple[str, LoRAConv]]:
    """(first name, adapter) of every LoRAConv in `model`."""
    for name, module in model.named_modules():
        if isinstance(module, LoRAConv):
            yield name, module


def factor_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [getattr(m, n).weight for _, m in adapters(model) for n in FACTOR_NAMES]


def factors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The factors and the base kernels, by adapter name: what a resumed training needs besides the plain state."""
    out = {}
    for name, module in adapters(model):
        for part in ("base", *FACTOR_NAMES):
            out[f"{name}.{part}.weight"] = getattr(module, part).weight.detach().cpu().clone()
    return out


@torch.no_grad()
def load_factors(model: nn.Module, saved: Mapping[str, torch.Tensor]) -> None:
    """Restore `factors(model)` exactly (base kernels included). Missing or extra names are an error."""
    expected = factors(model)
    if set(saved) != set(expected):
        missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
        raise ValueError(f"lora factors do not fit this network: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, module in adapters(model):
        for part in ("base", *FACTOR_NAMES):
            weight = getattr(module, part).weight
            weight.copy_(saved[f"{name}.{part}.weight"].to(weight.device, weight.dtype))


def num_factor_parameters(model: nn.Module, rank: int, *, skip: Any = ()) -> int:
    """d of the factors `add_adapters_(model, rank, skip=skip)` would add: r·(C_in·prod(k) + C_out) per convolution
    (counted once however often the model holds it)."""
    skipped = {id(m) for m in skip}
    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, _ConvNd) and id(module) not in skipped and id(module) not in seen:
            seen.add(id(module))
            k = 1
            for size in module.kernel_size:
                k *= size
            total += rank * (module.in_channels * k + module.out_channels)
    return total
