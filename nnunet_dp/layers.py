"""Per-sample normalisation layers that nnU-Net's plans can name (imported by path at training and inference)."""
from __future__ import annotations

from torch import nn


def largest_divisor_at_most(n: int, k: int) -> int:
    """Largest divisor of n that is <= k (GroupNorm needs num_groups | num_channels)."""
    return max(d for d in range(1, min(n, k) + 1) if n % d == 0)


class GroupNormNNUNet(nn.GroupNorm):
    """GroupNorm with nnU-Net's norm_op calling convention ``norm_op(num_channels, **norm_op_kwargs)``.

    Statistics are computed per sample, so it never couples cases. `num_groups` is reduced to the largest divisor
    of `num_channels` not above it.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True, num_groups: int = 8,
                 **_ignored: object) -> None:
        super().__init__(largest_divisor_at_most(num_channels, num_groups), num_channels, eps=eps, affine=affine)


GROUP_NORM_PATH = f"{GroupNormNNUNet.__module__}.{GroupNormNNUNet.__qualname__}"
