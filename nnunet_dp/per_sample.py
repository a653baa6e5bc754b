"""Per-case gradients, scaled by a rule and summed, without ever coupling two cases.

Strategy (exact): one forward/backward per case (a batch of one), scale, accumulate in place, so memory is one
accumulator. torch.func vmap(grad) is not offered: nnU-Net's Dice loss scatters in place into an unbatched
tensor, which vmap refuses.
A case's gradient is taken over every trainable parameter; a parameter the loss does not reach (e.g. a
deep-supervision head with weight 0) gets an exact zero, never a skip.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch
from torch import nn

from nnunet_dp.rules import ScalingRule

LossFn = Callable[[Any, Any], torch.Tensor]
Target = torch.Tensor | Sequence[torch.Tensor]
StrategyName = Literal["loop"]


@dataclass
class ScaledSum:
    """Result of one private aggregation (before noise)."""

    grads: list[torch.Tensor]  # sum_i s_i g_i, one tensor per trainable parameter
    norms: torch.Tensor  # ||g_i|| per case (float32/64, length B)
    scales: torch.Tensor  # s_i per case
    losses: torch.Tensor  # per-case loss values (detached)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def case_slice(x: Target, i: int) -> Target:
    """Case i of a batch as a batch of one (tensor or deep-supervision list of tensors)."""
    if isinstance(x, torch.Tensor):
        return x[i:i + 1]
    return [t[i:i + 1] for t in x]


def batch_size_of(data: torch.Tensor | None) -> int:
    return 0 if data is None else int(data.shape[0])


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm over all tensors, in fp32 or better (fp16/bf16 grads are upcast first)."""
    norms = [torch.linalg.vector_norm(t, dtype=torch.promote_types(t.dtype, torch.float32)) for t in tensors]
    return torch.linalg.vector_norm(torch.stack(norms))


def case_gradient(model: nn.Module, params: list[nn.Parameter], loss_fn: LossFn, data: torch.Tensor,
                  target: Target, autocast: Callable[[], Any]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Gradient of one case's loss (a batch of one) over `params`; unreached parameters get zeros."""
    with autocast():
        loss = loss_fn(model(data), target)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)], loss.detach().float()


def _scaled_sum_loop(model: nn.Module, params: list[nn.Parameter], loss_fn: LossFn, data: torch.Tensor,
                     target: Target, rule: ScalingRule, autocast: Callable[[], Any]) -> ScaledSum:
    acc = [torch.zeros_like(p) for p in params]
    norms, scales, losses = [], [], []
    for i in range(batch_size_of(data)):
        grads, loss = case_gradient(model, params, loss_fn, case_slice(data, i), case_slice(target, i), autocast)
        norm = global_norm(grads)
        scale = rule.scale(norm)
        torch._foreach_add_(acc, torch._foreach_mul(grads, scale.to(grads[0].dtype)))
        norms.append(norm)
        scales.append(scale)
        losses.append(loss)
    return ScaledSum(acc, _stack(norms, params), _stack(scales, params), _stack(losses, params))


def _stack(values: list[torch.Tensor], params: list[nn.Parameter]) -> torch.Tensor:
    if values:
        return torch.stack(values)
    return torch.zeros(0, device=params[0].device)


_STRATEGIES: dict[str, Callable[..., ScaledSum]] = {"loop": _scaled_sum_loop}


def scaled_sum(model: nn.Module, loss_fn: LossFn, data: torch.Tensor | None, target: Target | None,
               rule: ScalingRule, *, strategy: StrategyName = "loop",
               autocast: Callable[[], Any] = torch.enable_grad) -> ScaledSum:
    """sum_i s(||g_i||) g_i over the cases of the batch (an empty batch gives zeros), with per-case norms."""
    params = trainable_parameters(model)
    if batch_size_of(data) == 0:
        return ScaledSum([torch.zeros_like(p) for p in params], *(_stack([], params),) * 3)
    return _STRATEGIES[strategy](model, params, loss_fn, data, target, rule, autocast)


def choose_strategy(requested: str, *, device: torch.device) -> StrategyName:
    """'auto' picks the micro-batch loop (the only strategy so far): exact, one accumulator of memory."""
    if requested == "auto":
        return "loop"
    if requested not in _STRATEGIES:
        raise ValueError(f"per_sample_strategy {requested!r}: known {', '.join(_STRATEGIES)} or 'auto'")
    return requested  # type: ignore[return-value]
