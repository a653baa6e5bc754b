"""One private step: scaled sum -> one Gaussian noise draw (std sigma * Delta) -> divide by expected batch size qN.

The result is written into each parameter's .grad, so that nnU-Net's optimizer and LR schedule run unchanged.
Under torch.distributed the scaled sums of all ranks are summed and the noise is drawn on rank 0 only, so it
is added exactly once across all ranks.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from nnunet_dp.noise import add_gaussian_noise_
from nnunet_dp.projection import Projection, add_projected_noise_, project_


def privatize_(summed: list[torch.Tensor], *, noise_multiplier: float, sensitivity: float,
               expected_batch_size: float, generator: torch.Generator,
               projection: Projection | None = None) -> list[torch.Tensor]:
    """In place: (sum + N(0, (sigma Delta)^2)) / (qN). The noise never depends on the batch; an empty batch
    (sum of zeros) still gets it. With a public `projection` (nnunet_dp.projection) the projected part is
    V (V^T sum + noise in k dimensions); each rank projects its own sum (the map is linear)."""
    if expected_batch_size <= 0:
        raise ValueError(f"expected_batch_size (q*N) must be > 0, got {expected_batch_size}")
    if projection is not None:
        project_(summed, projection)
    distributed = dist.is_available() and dist.is_initialized()
    if not distributed or dist.get_rank() == 0:
        std = noise_multiplier * sensitivity
        if projection is None:
            add_gaussian_noise_(summed, std=std, generator=generator)
        else:
            add_projected_noise_(summed, projection, std=std, generator=generator)
    if distributed:
        all_reduce_sum_(summed)
    torch._foreach_div_(summed, float(expected_batch_size))
    return summed


def all_reduce_sum_(tensors: Sequence[torch.Tensor]) -> None:
    """In place, the sum over ranks: one all-reduce of all d numbers in a flat buffer (one per dtype and device),
    not one per tensor (a network has ~100 trained tensors, many small: each call costs a latency). Holds one extra
    copy of the d numbers while it runs."""
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for t, chunk in zip(group, flat.split([t.numel() for t in group]), strict=True):
            t.copy_(chunk.view(t.shape))


def write_grads_(params: Sequence[torch.nn.Parameter], grads: Sequence[torch.Tensor]) -> None:
    """Set p.grad = g for every trainable parameter (every parameter gets a private gradient)."""
    for p, g in zip(params, grads, strict=True):
        p.grad = g.to(p.dtype)
