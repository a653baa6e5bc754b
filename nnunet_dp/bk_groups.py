"""Book-keeping helpers on per-row tensors, and the grouping of rows into cases (augmentation multiplicity).

With `augmentations_per_case` K a batch has B*K rows, case-major: rows [i*K, (i+1)*K) are the K patches of case i.
A case contributes the mean of its K patch gradients, scaled once (docs/invariants.md, invariant 2). The engines backpropagate
sum_i mean_k loss_ik, so each row's parameter gradient already carries the factor 1/K and a case's gradient is the sum
of its rows' gradients (`case_sums`), formed before any norm. Per-case values (scales, keep flags) are spread back onto
the rows with `per_row`: a deferred layer's weighted pass scales each row's output gradient by its case's scale, which
linearity makes exact. With group 1 every helper returns its input itself: the K = 1 path is the ungrouped code.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


def check_group(rows: int, group: int) -> int:
    """The number of cases in a batch of `rows` rows of `group` patches each; ValueError if it does not divide."""
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise ValueError(f"group {group!r}: the number of patches per case (augmentations_per_case) must be an "
                         "integer >= 1")
    if rows % group:
        raise ValueError(f"group {group}: the batch has {rows} rows, not a multiple of group; a batch must hold "
                         f"group consecutive rows (patches) per case, case-major")
    return rows // group


def case_sums(t: torch.Tensor, group: int) -> torch.Tensor:
    """(B*group, ...) per-row values -> (B, ...) per-case sums of each case's `group` consecutive rows."""
    if group == 1:
        return t
    return t.reshape(t.shape[0] // group, group, *t.shape[1:]).sum(1)


def per_row(t: torch.Tensor, group: int) -> torch.Tensor:
    """(B, ...) per-case values -> (B*group, ...): each case's value repeated on its rows."""
    return t if group == 1 else t.repeat_interleave(group, dim=0)


def fold_cases(t: torch.Tensor, group: int) -> torch.Tensor:
    """(B*group, C, *s) -> (group, B*C, *s): each case's rows as the batch of its own channel group, so that one
    grouped convolution_backward (groups x B) sums a case's rows and keeps cases apart."""
    if group == 1:
        return t.reshape(1, -1, *t.shape[2:])
    cases = t.shape[0] // group
    return t.reshape(cases, group, *t.shape[1:]).transpose(0, 1).reshape(group, -1, *t.shape[2:])


def select_cases(t: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """t with the rows where keep is False set to exact zeros (selection: nan/inf rows do not survive);
    keep None: every row is kept."""
    if keep is None:
        return t
    return torch.where(keep.view(-1, *[1] * (t.dim() - 1)).to(t.device), t, torch.zeros((), dtype=t.dtype,
                                                                                         device=t.device))


def sq_norms(per_case: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Squared L2 norm of each row of `per_case` (B, ...), accumulated in `dtype`."""
    return torch.linalg.vector_norm(per_case.flatten(1), dim=1, dtype=dtype).square()


def spatial_sum(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, C, *s) -> (N, C): a bias or norm-affine gradient per row."""
    return t.sum(dim=tuple(range(2, t.dim())), dtype=dtype)


def normalised(m: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """x_hat of a GroupNorm / InstanceNorm (per-sample statistics), the factor of the affine weight's gradient."""
    if isinstance(m, nn.GroupNorm):
        return F.group_norm(a, m.num_groups, eps=m.eps)
    return F.instance_norm(a, eps=m.eps)


def trained(p: nn.Parameter | None) -> bool:
    """Whether p needs a per-case gradient (frozen parameters get none: not computed, not returned)."""
    return p is not None and p.requires_grad


@contextlib.contextmanager
def exact_convolutions() -> Iterator[None]:
    """cuDNN convolutions and CUDA matmuls in full fp32 (no TF32) inside the block: a deferred layer's norms (per-case
    convolutions or ghost Gram matrices) and its weighted sum are separate computations, and TF32 would round them
    differently (~1e-3). No effect on CPU."""
    conv = torch.backends.cudnn.conv  # torch's fp32-precision API (>= 2.9); the legacy allow_tf32 must not be mixed
    matmul = torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = before
