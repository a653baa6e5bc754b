"""DP changes to an nnU-Net configuration, written into the plans so that inference rebuilds the same network.

The DP trainer saves its (changed) plans to the results folder as nnU-Net always does; nnUNetv2_predict builds the
network from that plans.json, so the norm layers used in training are the ones used at inference, whatever the
environment says then.
"""
from __future__ import annotations

import copy

from nnunet_dp.config import NormConversion
from nnunet_dp.layers import GROUP_NORM_PATH

_BATCH_NORM_MARKERS = ("BatchNorm",)
_NORM_MARKERS = ("BatchNorm", "InstanceNorm", "GroupNorm", "LayerNorm")


def dp_architecture(architecture: dict, *, norm_conversion: NormConversion, num_groups: int) -> dict:
    """A copy of the plans' 'architecture' entry with sample-coupling norms replaced by GroupNormNNUNet.

    norm_conversion 'batchnorm' converts only BatchNorm (InstanceNorm is per-sample already); 'all' converts every
    norm layer to GroupNorm.
    """
    arch = copy.deepcopy(architecture)
    kwargs = arch["arch_kwargs"]
    norm_op = kwargs.get("norm_op") or ""
    markers = _BATCH_NORM_MARKERS if norm_conversion == "batchnorm" else _NORM_MARKERS
    if any(m in norm_op.split(".")[-1] for m in markers) and norm_op != GROUP_NORM_PATH:
        kwargs["norm_op"] = GROUP_NORM_PATH
        kwargs["norm_op_kwargs"] = {"eps": 1e-5, "affine": True, "num_groups": num_groups}
        if "norm_op" not in arch.get("_kw_requires_import", []):
            arch["_kw_requires_import"] = [*arch.get("_kw_requires_import", []), "norm_op"]
    return arch


def apply_dp_to_configuration(plans: dict, resolved_configuration: dict, configuration_name: str, *,
                              norm_conversion: NormConversion, num_groups: int) -> None:
    """In place, on both the plans dict (saved to the results folder) and the resolved configuration used now:
    batch Dice off (it couples cases) and per-sample norms."""
    arch = dp_architecture(resolved_configuration["architecture"], norm_conversion=norm_conversion,
                           num_groups=num_groups)
    for target in (plans["configurations"][configuration_name], resolved_configuration):
        target["architecture"] = copy.deepcopy(arch)
        target["batch_dice"] = False
