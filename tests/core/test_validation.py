"""Model checks and the plans change that makes nnU-Net's network per-sample."""
import pydoc

import torch
from nets import batch, tiny_unet
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import nn

from nnunet_dp.layers import GroupNormNNUNet
from nnunet_dp.nnunet.plans import dp_architecture
from nnunet_dp.validation import find_problems

ARCH = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {"n_stages": 3, "features_per_stage": [8, 16, 32], "conv_op": "torch.nn.modules.conv.Conv2d",
                        "kernel_sizes": [[3, 3]] * 3, "strides": [[1, 1], [2, 2], [2, 2]],
                        "n_conv_per_stage": [1, 1, 1], "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
                        "norm_op": "torch.nn.modules.batchnorm.BatchNorm2d",
                        "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None,
                        "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                        "nonlin_kwargs": {"inplace": True}},
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


def build(arch):
    return get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], 1, 3,
                                  allow_init=True, deep_supervision=True)


def test_batchnorm_is_refused_naming_every_layer():
    problems = find_problems(build(ARCH))
    assert len(problems) == 5 and all("BatchNorm2d" in p for p in problems)
    assert any("'encoder.stages.0.0.convs.0.norm'" in p for p in problems)


def test_frozen_parameter_and_running_stats_are_refused():
    model = tiny_unet(2)
    model.decoder.seg_layers[0].weight.requires_grad_(False)
    model.encoder.stages[0][0].convs[0].norm = nn.InstanceNorm2d(4, affine=True, track_running_stats=True)
    problems = find_problems(model)
    assert any("frozen" in p and "decoder.seg_layers.0.weight" in p for p in problems)
    assert any("track_running_stats" in p for p in problems)
    assert find_problems(tiny_unet(2)) == []


def test_plans_conversion_gives_per_sample_groupnorm_that_nnunet_can_import():
    arch = dp_architecture(ARCH, norm_conversion="batchnorm", num_groups=4)
    assert pydoc.locate(arch["arch_kwargs"]["norm_op"]) is GroupNormNNUNet
    model = build(arch).double()
    assert find_problems(model) == [] and any(isinstance(m, nn.GroupNorm) for m in model.modules())
    model.train()
    x, _ = batch(2, 3, size=16)
    x2 = x.clone()
    x2[2] *= 10
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0][:2], model(x2)[0][:2])  # case 2 does not affect cases 0, 1
    # InstanceNorm stays unless 'all' is asked for
    inst = dict(ARCH, arch_kwargs=dict(ARCH["arch_kwargs"], norm_op="torch.nn.modules.instancenorm.InstanceNorm2d"))
    assert dp_architecture(inst, norm_conversion="batchnorm", num_groups=8)["arch_kwargs"]["norm_op"].endswith(
        "InstanceNorm2d")
    assert dp_architecture(inst, norm_conversion="all", num_groups=8)["arch_kwargs"]["norm_op"].endswith(
        "GroupNormNNUNet")
    assert ARCH["arch_kwargs"]["norm_op"].endswith("BatchNorm2d")  # the input is not mutated
