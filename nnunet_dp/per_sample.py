"""Per-case gradients, scaled by a rule and summed, without ever coupling two cases.

Strategies (both exact; the tests compare them with an independent micro-batch reference in float64):
- loop: one forward/backward per case (a batch of one), scale, accumulate in place; memory is one accumulator.
  Best where one case alone fills the machine (large patches, CPU).
- bk: book-keeping (nnunet_dp.bookkeeping): one batched forward and one backward for activation gradients; per-case
  parameter gradients from each layer's input and output gradient. Best where per-case work is small (2D,
  large batches, GPUs). Runs on Conv/ConvTranspose/GroupNorm/InstanceNorm networks such as nnU-Net's.
- auto: chosen per step from the device, the batch size and the patch size (`choose_strategy`).
torch.func vmap(grad) is not offered: nnU-Net's Dice loss scatters in place into an unbatched tensor, which vmap
refuses, and vmap would hold B copies of the parameters.
A case's gradient is taken over every trainable parameter; a parameter the loss does not reach (e.g. a
deep-supervision head with weight 0) gets an exact zero, never a skip.
A case whose gradient norm or loss is not finite (NaN/inf voxels, a diverged network) contributes exactly zero: its
share is selected away (torch.where), never multiplied by zero (0 * inf = nan), so one such case cannot poison the
sum and the sensitivity bound holds (docs/invariants.md, invariant 4). The caller still adds the noise and counts the step.
Augmentation multiplicity (`group` K = augmentations_per_case): the batch has B*K rows, case-major (rows
[i*K, (i+1)*K) are case i's K patches). A case's gradient is the gradient of the mean of its K row losses, i.e. the
mean of its K patch gradients, formed before the norm and scaled once: the sensitivity stays C (invariant 2). Norms,
scales, losses and finite flags are per case. K = 1 runs exactly the ungrouped code.
Frozen parameters (requires_grad False, set before training) get no per-case gradient: neither computed nor returned.
'bk' caches each model's layer structure; it is read again when the set of trainable parameters changes
(bookkeeping.refresh_structure, every step), and `bookkeeping.forget_structure(model)` drops it explicitly.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from nnunet_dp.bk_groups import check_group
from nnunet_dp.bookkeeping import (
    BookkeepingUnsupported,
    Tape,
    mark_unsupported,
    refresh_structure,
    unsupported_layers,
)
from nnunet_dp.rules import ScalingRule

# loss of a batch of one; may have `per_case(output, target) -> (B,)`, each case's loss in one batched call
LossFn = Callable[[Any, Any], torch.Tensor]
Target = torch.Tensor | Sequence[torch.Tensor]
StrategyName = Literal["loop", "bk"]
Requested = Literal["auto", "loop", "bk"]


@dataclass
class ScaledSum:
    """Result of one private aggregation (before noise)."""

    grads: list[torch.Tensor]  # sum_i s_i g_i over the finite cases, one tensor per trainable parameter
    norms: torch.Tensor  # ||g_i|| per case (float32/64, length B = rows / group)
    scales: torch.Tensor  # s_i per case (0 for a dropped case)
    losses: torch.Tensor  # per-case loss values (detached; the mean of the case's row losses)
    finite: torch.Tensor  # bool per case: False = dropped (non-finite gradient or loss), contributed nothing

    @property
    def dropped(self) -> int:
        """Number of cases that contributed nothing because their gradient or loss was not finite."""
        return int((~self.finite).sum().item()) if self.finite.numel() else 0


def finite_scales(rule: ScalingRule, norms: torch.Tensor, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule's scales, and which cases are finite; a non-finite case's scale is set to 0 (by selection)."""
    finite = torch.isfinite(norms) & torch.isfinite(losses.to(norms.device))
    scales = torch.where(finite, rule.scale(torch.where(finite, norms, torch.zeros_like(norms))),
                         torch.zeros_like(norms))
    return scales, finite


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def case_slice(x: Target, i: int, group: int = 1) -> Target:
    """Case i of a batch, its `group` rows (tensor or deep-supervision list of tensors)."""
    if isinstance(x, torch.Tensor):
        return x[i * group:(i + 1) * group]
    return [t[i * group:(i + 1) * group] for t in x]


def row_losses(loss_fn: LossFn, output: Any, target: Target, rows: int) -> torch.Tensor:
    """(rows,) each row's loss alone: `loss_fn.per_case` in one batched call where the loss has it, else the loss
    on each row's slice (exactly the loss of a batch of one, whatever the loss reduces over the batch)."""
    per_case = getattr(loss_fn, "per_case", None)  # batched per-case losses (nnunet_dp.nnunet.case_loss)
    if per_case is not None:
        return per_case(output, target)
    return torch.stack([loss_fn(case_slice(output, i), case_slice(target, i)) for i in range(rows)])


def batch_size_of(data: torch.Tensor | None) -> int:
    return 0 if data is None else int(data.shape[0])


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm over all tensors, in fp32 or better (fp16/bf16 grads are upcast first)."""
    norms = [torch.linalg.vector_norm(t, dtype=torch.promote_types(t.dtype, torch.float32)) for t in tensors]
    return torch.linalg.vector_norm(torch.stack(norms))


def case_gradient(model: nn.Module, params: list[nn.Parameter], loss_fn: LossFn, data: torch.Tensor, target: Target,
                  autocast: Callable[[], Any], group: int = 1) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Gradient of one case's loss over `params`; unreached parameters get zeros. group 1: the loss of the batch of
    one; group K: the mean of the K row losses (one forward/backward of the K rows), i.e. the mean patch gradient."""
    with autocast():
        if group == 1:
            loss = loss_fn(model(data), target)
        else:
            loss = row_losses(loss_fn, model(data), target, group).mean()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)], loss.detach().float()


def _scaled_sum_loop(model: nn.Module, params: list[nn.Parameter], loss_fn: LossFn, data: torch.Tensor,
                     target: Target, rule: ScalingRule, autocast: Callable[[], Any], group: int = 1) -> ScaledSum:
    acc = [torch.zeros_like(p) for p in params]
    norms, scales, losses, finite = [], [], [], []
    for i in range(batch_size_of(data) // group):
        grads, loss = case_gradient(model, params, loss_fn, case_slice(data, i, group), case_slice(target, i, group),
                                    autocast, group)
        norm = global_norm(grads)
        scale, ok = finite_scales(rule, norm, loss)
        shares = torch._foreach_mul(grads, scale.to(grads[0].dtype))
        torch._foreach_add_(acc, [torch.where(ok, s, torch.zeros_like(s)) for s in shares])  # select, not multiply
        norms.append(norm)
        scales.append(scale)
        losses.append(loss)
        finite.append(ok)
    return ScaledSum(acc, _stack(norms, params), _stack(scales, params), _stack(losses, params),
                     _stack(finite, params, torch.bool))


def _stack(values: list[torch.Tensor], params: list[nn.Parameter], dtype: torch.dtype | None = None) -> torch.Tensor:
    if values:
        return torch.stack(values)
    return torch.zeros(0, device=params[0].device, dtype=dtype)


def _outputs(out: Any) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else list(out)


def _case_losses(rows: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(what to backpropagate, per-case losses in fp32+): sum over cases of the mean of each case's row losses."""
    if group == 1:
        losses = rows.float()
        return losses.sum(), losses
    per_case = rows.reshape(-1, group).mean(1)  # in the loss's dtype: the factor 1/K as exact as the loop's
    return per_case.sum(), per_case.float()


def _scaled_sum_bk(model: nn.Module, params: list[nn.Parameter], loss_fn: LossFn, data: torch.Tensor,
                   target: Target, rule: ScalingRule, autocast: Callable[[], Any], group: int = 1) -> ScaledSum:
    b, work = batch_size_of(data), torch.promote_types(params[0].dtype, torch.float32)
    tape = Tape(model, b // group, work, data.device, group=group)
    try:
        x = data.detach()  # no gradient for the data: a frozen front of the network keeps no graph
        with autocast():
            out = model(x)
        outs = _outputs(out)
        detached = [o.detach().requires_grad_(True) for o in outs]
        as_output = detached[0] if isinstance(out, torch.Tensor) else detached
        with autocast():  # each row's loss alone, exactly the loop's per-row loss
            total, losses = _case_losses(row_losses(loss_fn, as_output, target, b), group)
        out_grads = torch.autograd.grad(total, detached, allow_unused=True)
        used = [(o, g) for o, g in zip(outs, out_grads) if g is not None]
        tape.remove()
        torch.autograd.grad([o for o, _ in used], tape.backward_targets(), [g for _, g in used], allow_unused=True)
        tape.check_complete([o.grad_fn for o, _ in used])
        norms = tape.sq_norms.sqrt()
        scales, finite = finite_scales(rule, norms, losses.detach())
        return ScaledSum(tape.scaled_sum(params, scales, finite), norms, scales, losses.detach(), finite)
    finally:
        tape.clear()


_STRATEGIES: dict[str, Callable[..., ScaledSum]] = {"loop": _scaled_sum_loop, "bk": _scaled_sum_bk}


def scaled_sum(model: nn.Module, loss_fn: LossFn, data: torch.Tensor | None, target: Target | None,
               rule: ScalingRule, *, strategy: Requested = "loop", autocast: Callable[[], Any] = torch.enable_grad,
               group: int = 1) -> ScaledSum:
    """sum_i s(||g_i||) g_i over the cases of the batch (an empty batch gives zeros), with per-case norms.
    group K: every case is K consecutive rows (patches) and g_i the mean of their gradients; ValueError if the rows
    are not a multiple of K. strategy 'auto' is resolved here, per batch, by `choose_strategy`."""
    cases = check_group(batch_size_of(data), group)
    params = trainable_parameters(model)
    if cases == 0:
        return ScaledSum([torch.zeros_like(p) for p in params], *(_stack([], params),) * 3,
                         _stack([], params, torch.bool))
    refresh_structure(model, params)  # parameters frozen or unfrozen since the last step
    name = choose_strategy(strategy, device=data.device, batch_size=cases, case_voxels=data[0, 0].numel() * group,
                           model=model)
    if strategy != "auto" or name != "bk":
        return _STRATEGIES[name](model, params, loss_fn, data, target, rule, autocast, group)
    try:
        return _scaled_sum_bk(model, params, loss_fn, data, target, rule, autocast, group)
    except BookkeepingUnsupported as e:  # found only while running (a layer called twice, ...): loop from now on
        mark_unsupported(model, str(e))
        warnings.warn(f"per_sample_strategy 'auto': {e}; this model uses the micro-batch loop from now on",
                      RuntimeWarning, stacklevel=2)
        return _scaled_sum_loop(model, params, loss_fn, data, target, rule, autocast, group)


# auto on CPU: the loop where one case alone is this many voxels or more (it then keeps both cores busy and its
# memory is one case's activations); book-keeping below it. Measured with nnUNetv2_dp_benchmark (docs/performance.md).
CPU_LOOP_MIN_CASE_VOXELS = 32768


def choose_strategy(requested: str, *, device: torch.device, batch_size: int | None = None,
                    case_voxels: int | None = None, model: nn.Module | None = None) -> str:
    """The strategy for one batch. 'auto': 'bk' on accelerators and for small per-case work on CPU, 'loop' for
    large patches on CPU or when the model has a layer 'bk' cannot handle. Without a batch (batch_size None), a
    requested 'auto' is returned unchanged, to be resolved per step by `scaled_sum`."""
    if requested not in ("auto", *_STRATEGIES):
        raise ValueError(f"per_sample_strategy {requested!r}: known {', '.join(_STRATEGIES)} or 'auto'")
    if requested == "bk" and model is not None and (problems := unsupported_layers(model)):
        raise ValueError("per_sample_strategy 'bk' cannot run on this model: " + "; ".join(problems)
                         + ". Use 'loop' or 'auto'.")
    if requested != "auto" or batch_size is None:
        return requested
    if model is not None and unsupported_layers(model):
        return "loop"
    if torch.device(device).type != "cpu" or batch_size == 1:
        return "bk" if batch_size > 1 else "loop"
    return "loop" if (case_voxels or 0) >= CPU_LOOP_MIN_CASE_VOXELS else "bk"
