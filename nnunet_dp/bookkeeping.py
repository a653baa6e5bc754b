"""Book-keeping per-case gradients ("bk"): one batched forward, one backward, exact per-case gradients.

Book-keeping (Bu, Wang, Zha, Karypis, "Differentially private optimization on large model at small cost", ICML 2023):
a layer's per-case parameter gradients follow from its input a_i and output gradient g_i, so the network runs once on
the whole batch instead of once per case. Here:
- each case's loss is nnU-Net's loss on that case alone (a batch of one, sliced from the batched output), exactly as
  in the micro-batch loop; their sum is backpropagated once;
- autograd computes only activation gradients (the gradient is requested for the inputs of the first trained layers,
  not the parameters), so the batched weight gradient that a normal step computes is not computed as well, and a
  frozen front of the network (trainable "decoder": the encoder) is not backpropagated at all;
- a convolution's per-case weight gradients are one convolution_backward over the batch folded into the channels
  (groups x B, as in opacus' expanded weights); bias and norm-affine gradients are sums over space;
- a layer whose per-case weight gradients are larger than its input + output gradient (deep, low-resolution layers)
  keeps only (a, g) and the per-case squared norms; once all norms are known, its share of sum_i s_i g_i is one
  batched weight gradient with g_i scaled by s_i (linearity). Other layers keep their per-case gradients.
  A deferred layer's norms come from "ghost" Gram matrices, sum_{t,t'} (a_t . a_t')(g_t . g_t') over the unfolded
  input and the output gradient (Li et al. 2022; Bu et al. 2023), where that costs fewer multiply-adds than forming
  the per-case weight gradients (few positions T: the deepest layers), else from per-case gradients in chunks;
Exactness guards (an error names the layer): a layer called twice in one forward, a parameter shared by two layers,
an input modified in place before its backward, a layer that reaches the loss but not the input. Layers without a
per-case rule make `unsupported_layers` non-empty, and 'auto' then uses the micro-batch loop.
Augmentation multiplicity (group K > 1, nnunet_dp.bk_groups): the tape sees B*K rows, case-major; per-case gradients
are the sums of each case's K row gradients, formed before the norms (a conv's in one convolution_backward).
Frozen parameters (requires_grad False) get no per-case gradient: not computed, not returned. The layer structure is
read once per model and cached; `refresh_structure` (called by per_sample.scaled_sum every step) reads it again when
the set of trainable parameters changed, and `forget_structure` drops it explicitly (with any `mark_unsupported`).

Longer than ~300 lines on purpose: the engine's exactness guards, the per-case conv paths and the deferred
second pass share one cached structure per model; split, each part would need the others' internals.
"""
from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.modules.instancenorm import _InstanceNorm

from nnunet_dp.bk_groups import (
    case_sums,
    exact_convolutions,
    fold_cases,
    normalised,
    per_row,
    select_cases,
    spatial_sum,
    sq_norms,
    trained,
)

CHUNK_ELEMENTS = 1 << 24  # per-case gradients materialised at once for a layer that only needs its norms (64 MB fp32)
# keep a conv's per-case weight gradients (B x weight) while they are at most KEEP_RATIO x its input + output gradient;
# else keep (a, g) and take the weighted second pass. 1.0: whichever is smaller in memory.
KEEP_RATIO = 1.0
# per-case conv weight gradients: "grouped" (one call, cases folded into groups), "loop" (one call per case),
# "unfold" (im2col + one batched matmul per chunk of cases, for layers with the ghost form; others as "auto"), or
# "auto": grouped on CUDA, loop on CPU (oneDNN's grouped weight gradient is slow for many groups; unfold measured
# 1.35-6.1x slower than loop on CPU; on CUDA it is unmeasured: benchmarks/gpu_bk_variants.py --variants unfold)
PER_CASE_CONV = "auto"
# norms of a deferred conv's per-case weight gradients: "ghost" (Gram matrices of the unfolded input and of the output
# gradient, no per-case weight gradient at all), "materialise" (per-case weight gradients in chunks), or "auto": ghost
# where it costs fewer multiply-adds, K*T*(D_a + D_g) < D_a*D_g (T output positions, K rows per case, D_a = C_in x
# kernel, D_g = C_out): the deep, low-resolution layers
GHOST_NORMS = "auto"


class BookkeepingUnsupported(RuntimeError):
    """'bk' found, during a step, something it cannot compute exactly (a layer called twice, ...). Under 'auto' the
    step falls back to the micro-batch loop and the model is marked (`mark_unsupported`); under 'bk' it is an error."""


Layers = list[tuple[str, nn.Module, list[nn.Parameter]]]
# model -> its parameterised layers and what 'bk' cannot do on it, read once per model (a walk of nnU-Net's module
# tree costs ~0.5 ms, a few % of a GPU step); the layer structure of a model being trained does not change
_STRUCTURE: weakref.WeakKeyDictionary[nn.Module, tuple[Layers, list[str]]] = weakref.WeakKeyDictionary()


def parameterised_layers(model: nn.Module) -> Layers:
    """Each distinct module with trainable parameters of its own (aliases such as nnU-Net's all_modules counted once)."""
    return _structure(model)[0]


def refresh_structure(model: nn.Module, params: list[nn.Parameter]) -> None:
    """Read the model's structure again if its trainable parameters are no longer those it was read with
    (parameters frozen or unfrozen since): a set comparison per step, no module walk."""
    if model in _STRUCTURE and {id(p) for p in params} != {id(p) for _, _, ps in _STRUCTURE[model][0] for p in ps}:
        forget_structure(model)


def forget_structure(model: nn.Module) -> None:
    """Drop the cached structure of `model` (and problems recorded by `mark_unsupported`); read again when needed."""
    _STRUCTURE.pop(model, None)


def _structure(model: nn.Module) -> tuple[Layers, list[str]]:
    if model not in _STRUCTURE:
        layers = [(name, m, ps) for name, m in model.named_modules()
                  if (ps := [p for p in m.parameters(recurse=False) if p.requires_grad])]
        _STRUCTURE[model] = (layers, _problems(layers))
    return _STRUCTURE[model]


def _layer_problem(m: nn.Module) -> str | None:
    if isinstance(m, _ConvNd):
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            return f"padding {m.padding!r} / padding_mode {m.padding_mode!r} (only explicit zero padding)"
        return None
    if isinstance(m, _InstanceNorm):
        return "InstanceNorm with track_running_stats" if m.track_running_stats else None
    if isinstance(m, nn.GroupNorm):
        return None
    return f"{type(m).__name__} has no per-case gradient rule"


def mark_unsupported(model: nn.Module, reason: str) -> None:
    """Remember a problem found during a step, so that 'auto' uses the loop for this model from now on."""
    layers, problems = _structure(model)
    _STRUCTURE[model] = (layers, [*problems, reason])


def unsupported_layers(model: nn.Module) -> list[str]:
    """Why 'bk' cannot run on `model` (empty when it can)."""
    return _structure(model)[1]


def _problems(layers: Layers) -> list[str]:
    problems, owner = [], {}
    for name, m, params in layers:
        if (why := _layer_problem(m)) is not None:
            problems.append(f"{name or type(m).__name__}: {why}")
        for p in params:
            if id(p) in owner:
                problems.append(f"{name}: parameter shared with {owner[id(p)]}")
            owner[id(p)] = name
    return problems


def _conv_weight_grad(m: _ConvNd, a: torch.Tensor, g: torch.Tensor, *, per_case: bool,
                      group: int = 1) -> torch.Tensor:
    """Weight gradient of conv `m` for input a and output gradient g: per case (k, *w), a case being `group`
    consecutive rows whose gradients are summed (the batch sum of convolution_backward), or summed over the batch.
    Per case on CUDA: the k cases folded into the channels, groups x k (one call); on CPU one call per case, which
    measured faster there (oneDNN's grouped weight gradient is slow for many groups)."""
    a = a.to(g.dtype)
    if not per_case:
        return _wgrad(m, a, g, 1)
    k, shape = a.shape[0] // group, m.weight.shape
    mode = PER_CASE_CONV
    if mode == "unfold":
        if _has_ghost_form(m, a, g):
            return unfold_per_case(m, a, g, group)
        mode = "auto"  # groups, dilation, an overlapping transposed conv
    if mode == "loop" or (mode == "auto" and a.device.type == "cpu"):
        out = torch.empty(k, *shape, dtype=g.dtype, device=g.device)
        for i in range(k):
            out[i] = _wgrad(m, a[i * group:(i + 1) * group], g[i * group:(i + 1) * group], 1)
        return out
    return _wgrad(m, fold_cases(a, group), fold_cases(g, group), k).view(k, *shape)


def _wgrad(m: _ConvNd, a: torch.Tensor, g: torch.Tensor, k: int) -> torch.Tensor:
    """aten.convolution_backward for the weight only; k > 1: k cases folded into groups (weight k x larger)."""
    w = m.weight
    transposed = isinstance(m, _ConvTransposeNd)
    dummy = g.new_empty(1).expand(w.shape[0] * k, *w.shape[1:])
    out_pad = list(m.output_padding) if transposed else [0] * len(m.stride)
    return torch.ops.aten.convolution_backward(g, a, dummy, None, list(m.stride), list(m.padding), list(m.dilation),
                                               transposed, out_pad, m.groups * k, (False, True, False))[1]


def _has_ghost_form(m: _ConvNd, a: torch.Tensor, g: torch.Tensor) -> bool:
    """Whether the layer's per-row weight gradient is sum_t A_t G_t^T for _ghost_factors: no groups or dilation; a
    transposed conv only with kernel == stride, no padding (input position t owns one output block)."""
    if m.groups != 1 or any(d != 1 for d in m.dilation):
        return False
    if not isinstance(m, _ConvTransposeNd):
        return True
    return (list(m.kernel_size) == list(m.stride) and not any(m.padding) and not any(m.output_padding)
            and list(g.shape[2:]) == [n * s for n, s in zip(a.shape[2:], m.stride)])


def _ghost_factors(m: _ConvNd, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, G), (N, D_a, T) and (N, D_g, T), with the layer's per-row weight gradient = sum_t A[:, t] G[:, t]^T (up to
    the weight's layout), for a layer with _has_ghost_form."""
    dims = a.dim() - 2
    if isinstance(m, _ConvTransposeNd):
        n, cout = g.shape[:2]
        blocks = g.reshape(n, cout, *[v for t, s in zip(a.shape[2:], m.stride) for v in (t, s)])
        order = [0, 1, *[3 + 2 * i for i in range(dims)], *[2 + 2 * i for i in range(dims)]]
        return a.flatten(2), blocks.permute(order).reshape(n, cout * math.prod(m.stride), -1)
    x = F.pad(a, [p for pad in reversed(m.padding) for p in (pad, pad)])
    for i, (kk, st) in enumerate(zip(m.kernel_size, m.stride)):
        x = x.unfold(2 + i, kk, st)  # (N, C, T1.., k1..) after all dims
    n, c = x.shape[:2]
    order = [0, 1, *range(2 + dims, 2 + 2 * dims), *range(2, 2 + dims)]
    return x.permute(order).reshape(n, c * math.prod(m.kernel_size), -1), g.flatten(2)


def _case_factor_chunks(m: _ConvNd, a: torch.Tensor, g: torch.Tensor, group: int, per_case: int,
                        dtype: torch.dtype | None = None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(s, A, G) for chunks of whole cases, s the chunk's first case, A (n, D_a, group*T) and G (n, D_g, group*T) the
    _ghost_factors with each case's `group` rows side by side; as many cases at once as CHUNK_ELEMENTS holds at
    `per_case` elements each. In `dtype` (as given if None)."""
    d_a, d_g, t = _ghost_shapes(m, a, g)
    cases = a.shape[0] // group
    chunk = max(1, CHUNK_ELEMENTS // per_case)
    for s in range(0, cases, chunk):
        rows = slice(s * group, min(cases, s + chunk) * group)
        ar, gr = (a[rows], g[rows]) if dtype is None else (a[rows].to(dtype), g[rows].to(dtype))
        fa, fg = _ghost_factors(m, ar, gr)
        n = fa.shape[0] // group
        yield (s, fa.reshape(n, group, d_a, t).transpose(1, 2).reshape(n, d_a, group * t),
               fg.reshape(n, group, d_g, t).transpose(1, 2).reshape(n, d_g, group * t))


def unfold_per_case(m: _ConvNd, a: torch.Tensor, g: torch.Tensor, group: int) -> torch.Tensor:
    """Per-case weight gradients (cases, *weight.shape) of a layer with _has_ghost_form as batched matmuls of its
    _ghost_factors, G A^T (A^T G for a transposed conv, whose weight is C_in x C_out x kernel), over the
    group x T positions of each case: one bmm per chunk of whole cases (CHUNK_ELEMENTS elements of factors and
    results at once), instead of one small weight-gradient launch per case. In a's dtype."""
    d_a, d_g, t = _ghost_shapes(m, a, g)
    transposed = isinstance(m, _ConvTransposeNd)
    out = torch.empty(a.shape[0] // group, *m.weight.shape, dtype=g.dtype, device=g.device)
    for s, fa, fg in _case_factor_chunks(m, a, g, group, group * t * (d_a + d_g) + d_a * d_g):
        prod = torch.bmm(fa, fg.transpose(1, 2)) if transposed else torch.bmm(fg, fa.transpose(1, 2))
        out[s:s + len(prod)] = prod.view(len(prod), *m.weight.shape)
    return out


def _use_ghost(m: _ConvNd, a: torch.Tensor, g: torch.Tensor, group: int) -> bool:
    if GHOST_NORMS == "materialise" or not _has_ghost_form(m, a, g):
        return False
    if GHOST_NORMS == "ghost":
        return True
    d_a, d_g, t = _ghost_shapes(m, a, g)
    return group * t * (d_a + d_g) < d_a * d_g


def _ghost_shapes(m: _ConvNd, a: torch.Tensor, g: torch.Tensor) -> tuple[int, int, int]:
    """(D_a, D_g, T) of _ghost_factors without building them."""
    if isinstance(m, _ConvTransposeNd):
        return a.shape[1], g.shape[1] * math.prod(m.stride), math.prod(a.shape[2:])
    return a.shape[1] * math.prod(m.kernel_size), g.shape[1], math.prod(g.shape[2:])


def ghost_sq_norms(m: _ConvNd, a: torch.Tensor, g: torch.Tensor, group: int, work: torch.dtype) -> torch.Tensor:
    """Per-case squared norms of conv m's weight gradient without forming it: ||sum_t A_t G_t^T||^2 =
    sum_{t,t'} (A_t . A_t') (G_t . G_t') over the positions t of all `group` rows of a case (the case's gradient is
    the sum of its rows'). In the work dtype without TF32, in chunks of whole cases."""
    if not _has_ghost_form(m, a, g):
        raise ValueError(f"ghost norms: {type(m).__name__} has no ghost form here (groups, dilation, or a transposed "
                         "conv whose kernel differs from its stride)")
    d_a, d_g, t = _ghost_shapes(m, a, g)
    per_case = group * t * (d_a + d_g + group * t)  # elements held per case: both factors and both Gram matrices
    out = torch.empty(a.shape[0] // group, dtype=work, device=a.device)
    for s, fa, fg in _case_factor_chunks(m, a, g, group, per_case, work):
        with exact_convolutions():
            gram_a = torch.bmm(fa.transpose(1, 2), fa)
            gram_g = torch.bmm(fg.transpose(1, 2), fg)
        out[s:s + len(fa)] = (gram_a * gram_g).sum(dim=(1, 2))
    return out


class _Capture(torch.autograd.Function):
    """Identity (a copy, so that later in-place ops are allowed) that hands its output gradient to a callback."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, on_grad: Callable[[torch.Tensor], None]) -> torch.Tensor:
        ctx.on_grad = on_grad
        return x.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        ctx.on_grad(g)
        return g, None


@dataclass
class _Call:
    """One call of one parameterised layer during the recorded forward."""

    name: str
    module: nn.Module
    params: list[nn.Parameter]
    a: torch.Tensor | None
    version: int
    node: Any
    output_nr: int
    fired: bool = False
    per_case: dict[int, torch.Tensor] = field(default_factory=dict)  # id(param) -> (B, *shape)
    deferred: tuple[torch.Tensor, torch.Tensor] | None = None  # (a, g) of a conv weight summed after the norms


class Tape:
    """Forward hooks on every parameterised layer and autograd-node pre-hooks on their outputs. `cases` cases of
    `group` consecutive rows each; per-case gradients and norms are per case."""

    def __init__(self, model: nn.Module, cases: int, work_dtype: torch.dtype, device: torch.device, *,
                 group: int = 1) -> None:
        self.layers = parameterised_layers(model)
        self.calls: dict[int, _Call] = {}
        self.sq_norms = torch.zeros(cases, dtype=work_dtype, device=device)
        self.work, self.group = work_dtype, group
        self.handles = [m.register_forward_hook(self._forward_hook(name, ps)) for name, m, ps in self.layers]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def clear(self) -> None:
        """Drop every stored tensor and node now: the hooks on the graph's nodes point back at this tape, a cycle
        that would otherwise keep a step's per-case gradients alive until Python's cyclic collector runs."""
        self.remove()
        for call in self.calls.values():
            call.a, call.node, call.deferred, call.per_case = None, None, None, {}
        self.calls = {}

    def _forward_hook(self, name: str, params: list[nn.Parameter]) -> Callable[..., torch.Tensor | None]:
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            if id(module) in self.calls:
                raise BookkeepingUnsupported(f"per_sample_strategy 'bk': layer {name!r} is called twice in one forward; "
                                   "use 'loop'")
            if len(args) != 1 or out.grad_fn is None:
                raise BookkeepingUnsupported(f"per_sample_strategy 'bk': layer {name!r} needs one input and a graph output")
            call = _Call(name, module, params, args[0], args[0]._version, None, 0)
            self.calls[id(module)] = call
            if out._is_view():  # an in-place op on a view (LeakyReLU(inplace) after InstanceNorm) re-roots its graph
                out = _Capture.apply(out, lambda g: self._on_grad(call, g))
                call.node = out.grad_fn
                return out
            call.node, call.output_nr = out.grad_fn, out.output_nr  # in place on a non-view keeps this node
            call.node.register_prehook(lambda grads: self._on_grad(call, grads[call.output_nr]))
            return None
        return hook

    def _on_grad(self, call: _Call, g: torch.Tensor | None) -> None:
        a, call.a, call.fired = call.a, None, True
        if a is None or g is None:
            return
        if a._version != call.version:
            raise BookkeepingUnsupported(f"per_sample_strategy 'bk': the input of layer {call.name!r} was modified in place "
                               "after its forward; use 'loop'")
        m = call.module
        if isinstance(m, _ConvNd):
            self._conv(call, m, a, g)
            return
        if trained(m.weight):  # only what is trained: a frozen affine weight costs nothing
            xhat = normalised(m, a.to(self.work) if a.dtype == torch.float64 else a.float())
            self._keep(call, m.weight, case_sums(spatial_sum(g * xhat, self.work), self.group))
        if trained(m.bias):
            self._keep(call, m.bias, case_sums(spatial_sum(g, self.work), self.group))

    def _keep(self, call: _Call, p: nn.Parameter, per_case: torch.Tensor) -> None:
        call.per_case[id(p)] = per_case
        self.sq_norms += sq_norms(per_case, self.work)

    def _conv(self, call: _Call, m: _ConvNd, a: torch.Tensor, g: torch.Tensor) -> None:
        if trained(m.bias):
            self._keep(call, m.bias, case_sums(spatial_sum(g, self.work), self.group))
        if not m.weight.requires_grad:
            return
        a, k = a.to(g.dtype), self.group  # what the convolution saw (bf16 under autocast)
        b, size = a.shape[0] // k, m.weight.numel()
        if b * size <= KEEP_RATIO * (a.numel() + g.numel()):
            self._keep(call, m.weight, _conv_weight_grad(m, a, g, per_case=True, group=k))
            return
        # Deferred: the norms now, the weighted sum after all norms are known. Both from the same (a, g) in the work
        # dtype without TF32, so that the summed share of case i is the gradient whose norm was clipped. Chunks hold
        # whole cases (k rows each).
        call.deferred = (a, g)
        if _use_ghost(m, a, g, k):
            self.sq_norms += ghost_sq_norms(m, a, g, k, self.work)
            return
        chunk = max(1, CHUNK_ELEMENTS // size)
        with exact_convolutions():
            for s in range(0, b, chunk):
                part = _conv_weight_grad(m, a[s * k:(s + chunk) * k].to(self.work),
                                         g[s * k:(s + chunk) * k].to(self.work), per_case=True, group=k)
                self.sq_norms[s:s + chunk] += sq_norms(part, self.work)

    def backward_targets(self) -> list[torch.Tensor]:
        """What the activation backward must reach: for each recorded layer whose input depends on no recorded
        layer's output (the first convolution when it trains; the bottleneck's transposed convolution when only the
        decoder trains), its input where that requires a gradient, else its trained parameters (a one-layer weight
        gradient, discarded). Every recorded layer that reaches the loss lies on a path from the loss to one of them,
        so its hook fires (check_complete verifies it), and nothing upstream (a frozen encoder) is backpropagated."""
        recorded = {c.node for c in self.calls.values()}
        tainted: dict[Any, bool] = {}  # autograd node -> some recorded layer's output node lies at or below it

        def is_tainted(root: Any) -> bool:
            stack = [root]
            while stack:
                node = stack[-1]
                if node in tainted:
                    stack.pop()
                    continue
                below = [f for f, _ in node.next_functions if f is not None and f not in tainted]
                if below:
                    stack.extend(below)
                    continue
                stack.pop()
                tainted[node] = node in recorded or any(tainted[f] for f, _ in node.next_functions if f is not None)
            return tainted[root]

        targets: dict[int, torch.Tensor] = {}
        for call in self.calls.values():
            a = call.a
            if a is None or (a.grad_fn is not None and is_tainted(a.grad_fn)):
                continue
            for t in [a] if a.requires_grad else call.params:
                targets.setdefault(id(t), t)
        return list(targets.values())

    def check_complete(self, roots: list[Any]) -> None:
        """Every layer whose output reaches the loss got its gradient (a layer not reached is an exact zero)."""
        seen, stack = set(), [r for r in roots if r is not None]
        while stack:
            node = stack.pop()
            if node not in seen:
                seen.add(node)
                stack.extend(f for f, _ in node.next_functions if f is not None)
        missed = [c.name for c in self.calls.values() if not c.fired and c.node in seen]
        if missed:
            raise BookkeepingUnsupported(f"per_sample_strategy 'bk': layers {missed} reach the loss but not the input; "
                               "use 'loop'")
        # a parameter that reaches the loss outside a recorded layer call (module.forward called directly, a weight
        # used through torch.nn.functional) would get no per-case gradient: an error, never a silent zero
        recorded = {id(p) for c in self.calls.values() if c.fired for p in c.params}
        unrecorded = [n for n in seen if isinstance(getattr(n, "variable", None), nn.Parameter)
                      and n.variable.requires_grad and id(n.variable) not in recorded]
        if unrecorded:
            names = {id(p): f"{name}.{pn}".lstrip(".") for name, m, _ in self.layers
                     for pn, p in m.named_parameters(recurse=False)}
            raise BookkeepingUnsupported("per_sample_strategy 'bk': parameters "
                               f"{sorted(names.get(id(n.variable), '?') for n in unrecorded)} reach the loss "
                               "outside a recorded layer call (e.g. module.forward() called directly); use 'loop'")

    def scaled_sum(self, params: list[nn.Parameter], scales: torch.Tensor, keep: torch.Tensor) -> list[torch.Tensor]:
        """sum_i s_i g_i per parameter over the cases with keep[i], accumulated in fp32 (or float64 for float64
        parameters). Dropped cases are selected away before any product (their rows may hold nan/inf); a deferred
        layer's rows get their case's scale and keep flag."""
        acc = {id(p): torch.zeros(p.shape, dtype=torch.promote_types(p.dtype, torch.float32), device=p.device)
               for p in params}
        keep = None if bool(keep.all()) else keep  # one device sync per step, not one per parameter
        row_keep, row_scales = None if keep is None else per_row(keep, self.group), per_row(scales, self.group)
        for call in self.calls.values():
            for pid, per_case in call.per_case.items():
                flat = select_cases(per_case.flatten(1).to(acc[pid].dtype), keep)
                acc[pid].view(-1).addmv_(flat.t(), scales.to(flat.dtype))
            if call.deferred is not None:
                a, g = (select_cases(t, row_keep) for t in call.deferred)
                gs = g.to(self.work) * row_scales.view(-1, *[1] * (g.dim() - 1)).to(device=g.device,
                                                                                      dtype=self.work)
                with exact_convolutions():
                    share = _conv_weight_grad(call.module, a.to(self.work), gs, per_case=False)
                acc[id(call.module.weight)] += share.to(acc[id(call.module.weight)].dtype)
        return [acc[id(p)] for p in params]
