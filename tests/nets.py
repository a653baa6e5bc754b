"""Tiny real nnU-Net networks and losses for tests (PlainConvUNet with deep supervision and ConvTranspose)."""
from __future__ import annotations

import numpy as np
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from torch import nn


def tiny_unet(dim: int, *, num_classes: int = 3, norm: type | None = None, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    conv = nn.Conv2d if dim == 2 else nn.Conv3d
    norm = norm or (nn.InstanceNorm2d if dim == 2 else nn.InstanceNorm3d)
    return PlainConvUNet(input_channels=1, n_stages=4, features_per_stage=[4, 8, 16, 16], conv_op=conv,
                         kernel_sizes=3, strides=[1, 2, 2, 2], n_conv_per_stage=[1, 1, 1, 1], num_classes=num_classes,
                         n_conv_per_stage_decoder=[1, 1, 1], conv_bias=True, norm_op=norm,
                         norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                         nonlin_kwargs={"inplace": True}, deep_supervision=True)


def nnunet_loss(batch_dice: bool = False) -> nn.Module:
    """nnU-Net's 2d/3d loss as its trainer builds it (3 deep-supervision outputs, lowest weight 0)."""
    loss = DC_and_CE_loss({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                          weight_ce=1, weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    weights = np.array([1 / (2 ** i) for i in range(3)])
    weights[-1] = 0
    return DeepSupervisionWrapper(loss, weights / weights.sum())


def batch(dim: int, b: int, *, size: int = 16, num_classes: int = 3, seed: int = 0,
          dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Random images and deep-supervision targets (full, 1/2, 1/4 resolution)."""
    g = torch.Generator().manual_seed(seed)
    shape = (size,) * dim
    x = torch.randn((b, 1, *shape), generator=g, dtype=dtype)
    seg = torch.randint(0, num_classes, (b, 1, *shape), generator=g).to(dtype)
    targets = [seg]
    for k in (2, 4):
        idx = (slice(None), slice(None)) + (slice(None, None, k),) * dim
        targets.append(seg[idx])
    return x, targets
