"""nnU-Net's loss, one value per case in one batched call (for the book-keeping per-case gradient strategy).

`CaseLoss(loss)` behaves exactly like nnU-Net's loss when called (the micro-batch loop calls it on batches of one)
and adds `per_case(output, target) -> (B,)`: case i's value is what nnU-Net's loss gives on case i alone, computed
for all cases at once with nnU-Net's own formulas (nnunetv2.training.loss: DC_and_CE_loss = weight_ce * CE +
weight_dice * (-mean over classes of soft Dice), MemoryEfficientSoftDiceLoss, RobustCrossEntropyLoss,
DeepSupervisionWrapper). Calling the loss once per case instead costs ~100 small kernels per case, which dominates
a 2D step with hundreds of cases. Only the configuration used under DP is supported (no batch Dice, no ignore
label, plain CE); `make_case_loss` returns other losses unchanged, and the engine then calls them per case.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.loss.robust_ce_loss import RobustCrossEntropyLoss
from nnunetv2.utilities.helpers import softmax_helper_dim1
from torch import nn


def _supported(loss: nn.Module) -> bool:
    if not type(loss) is DC_and_CE_loss or loss.ignore_label is not None:
        return False
    dc, ce = loss.dc, loss.ce
    return (type(dc) is MemoryEfficientSoftDiceLoss and not dc.batch_dice and dc.apply_nonlin is softmax_helper_dim1
            and type(ce) is RobustCrossEntropyLoss and ce.weight is None and ce.label_smoothing == 0
            and ce.reduction == "mean")


def _dc_and_ce_per_case(loss: DC_and_CE_loss, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """DC_and_CE_loss.forward (ignore_label None) with every reduction over the batch left out."""
    axes = tuple(range(2, x.ndim))
    result = x.new_zeros(x.shape[0], dtype=torch.float32)
    if loss.weight_dice != 0:  # MemoryEfficientSoftDiceLoss.forward, batch_dice False, loss_mask None
        dc = loss.dc
        probs = dc.apply_nonlin(x)
        with torch.no_grad():
            y_onehot = y.to(torch.float32) if probs.shape == y.shape else \
                torch.zeros(probs.shape, device=x.device, dtype=torch.float32).scatter_(1, y.long(), 1)
            if not dc.do_bg:
                y_onehot = y_onehot[:, 1:]
            sum_gt = y_onehot.sum(axes, dtype=torch.float32)
        if not dc.do_bg:
            probs = probs[:, 1:]
        intersect = (probs * y_onehot).sum(axes, dtype=torch.float32)
        sum_pred = probs.sum(axes, dtype=torch.float32)
        dice = (2 * intersect + dc.smooth) / (sum_gt + sum_pred + float(dc.smooth)).clamp_min(1e-8)
        result = result + loss.weight_dice * -dice.mean(1)
    if loss.weight_ce != 0:  # RobustCrossEntropyLoss: mean over the case's voxels
        ce = F.cross_entropy(x, y[:, 0].long(), reduction="none", ignore_index=loss.ce.ignore_index)
        result = result + loss.weight_ce * ce.flatten(1).mean(1)
    return result


class CaseLoss(nn.Module):
    """nnU-Net's (deep-supervision) DC_and_CE loss with a batched per-case evaluation `per_case`."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss
        inner = loss.loss if isinstance(loss, DeepSupervisionWrapper) else loss
        if not _supported(inner):
            raise ValueError(f"CaseLoss supports nnU-Net's DC_and_CE_loss without batch Dice or ignore label; got "
                             f"{type(inner).__name__}. Use make_case_loss, which leaves other losses unchanged.")
        self.inner = inner

    def forward(self, output: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor | Sequence[torch.Tensor]
                ) -> torch.Tensor:
        return self.loss(output, target)

    def per_case(self, output: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor | Sequence[torch.Tensor]
                 ) -> torch.Tensor:
        if not isinstance(self.loss, DeepSupervisionWrapper):
            return _dc_and_ce_per_case(self.inner, output, target)
        weights = self.loss.weight_factors or (1,) * len(output)
        terms = [w * _dc_and_ce_per_case(self.inner, x, y) for w, x, y in zip(weights, output, target) if w != 0.0]
        return sum(terms[1:], terms[0])


def make_case_loss(loss: nn.Module) -> nn.Module:
    """CaseLoss(loss) where supported, else `loss` itself (the per-case gradient engine then calls it per case)."""
    try:
        return CaseLoss(loss)
    except ValueError:
        return loss
