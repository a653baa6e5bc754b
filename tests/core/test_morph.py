"""DP-Morph inside training (nnunet_dp.morph): the operations against scipy.ndimage, the network nnU-Net builds from
the plans (same parameters, outputs filtered at every deep-supervision scale), and exact per-case gradients in both
engines."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from nets import batch, nnunet_loss, tiny_unet
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from scipy import ndimage
from test_finetune import RESENC
from test_per_sample import CLOSED, reference

from nnunet_dp.config import DPConfig
from nnunet_dp.errors import DPConfigError
from nnunet_dp.morph import MORPH_NETWORK_PATH, apply_op, filter_logits, scaled_kernel
from nnunet_dp.nnunet.plans import dp_architecture, morph_architecture
from nnunet_dp.per_sample import scaled_sum
from nnunet_dp.rules import make_rule


def scipy_op(x: np.ndarray, op: str, size: tuple[int, ...]) -> np.ndarray:
    """The reference: scipy's grey dilation (outside = -inf) and erosion (outside = +inf), composed."""
    dil = lambda a: ndimage.grey_dilation(a, size=size, mode="constant", cval=-np.inf)
    ero = lambda a: ndimage.grey_erosion(a, size=size, mode="constant", cval=np.inf)
    return ero(dil(x)) if op == "close" else dil(ero(x))


@pytest.mark.parametrize("op", ["open", "close"])
@pytest.mark.parametrize("size", [(3, 3), (5, 3), (3, 3, 3), (1, 3, 5)])
def test_operations_equal_scipys_grey_morphology(op, size):
    x = np.random.default_rng(0).normal(size=(2, 1, *(9,) * len(size)))
    got = apply_op(torch.from_numpy(x), op, size).numpy()
    for i in range(2):
        np.testing.assert_allclose(got[i, 0], scipy_op(x[i, 0], op, size), rtol=0, atol=0)


def test_filter_leaves_background_and_unnamed_classes_and_scales_the_kernel():
    z = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    out = filter_logits(z, {2: ("close", (5, 5))})
    assert torch.equal(out[:, :2], z[:, :2])
    torch.testing.assert_close(out[:, 2:], apply_op(z[:, 2:], "close", (5, 5)))
    assert scaled_kernel((5, 5), (0.5, 0.5)) == (1, 1) and scaled_kernel((7, 3), (0.5, 1.0)) == (3, 3)
    half = filter_logits(z, {1: ("open", (7, 7))}, factors=(0.5, 0.5))
    torch.testing.assert_close(half[:, 1:2], apply_op(z[:, 1:2], "open", (3, 3)))


def morph_plans_network(arch_entry: dict, ops: dict, num_classes: int = 3):
    arch = morph_architecture(dp_architecture(arch_entry, norm_conversion="batchnorm", num_groups=4), ops)
    return get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], 1,
                                  num_classes, allow_init=True, deep_supervision=True), arch


def test_the_plans_network_is_the_original_with_filtered_outputs():
    """nnU-Net's builder makes the original class (same state_dict) whose every deep-supervision output is filtered;
    with deep supervision off (inference) the single output is too."""
    ops = {"1": ["close", [5, 5]], "2": ["open", [3, 3]]}
    net, arch = morph_plans_network(RESENC, ops)
    plain, _ = morph_plans_network(RESENC, {})
    assert arch["network_class_name"] == MORPH_NETWORK_PATH and type(net) is type(plain)
    assert list(net.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(net.state_dict())
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        outs, refs = net(x), plain(x)
        parsed = {1: ("close", (5, 5)), 2: ("open", (3, 3))}
        for o, r in zip(outs, refs):
            factors = [s / f for s, f in zip(r.shape[2:], refs[0].shape[2:])]
            torch.testing.assert_close(o, filter_logits(r, parsed, factors))
        net.decoder.deep_supervision = plain.decoder.deep_supervision = False
        torch.testing.assert_close(net(x), filter_logits(plain(x), parsed))


def test_settings_become_per_class_operations():
    assert DPConfig(morph_in_training="close").morph_ops(3, 2) == {"1": ["close", [3, 3]], "2": ["close", [3, 3]]}
    cfg = DPConfig(morph_in_training="adaptive", morph_classes={"2": ["open", [5, 3]], "1": "none"})
    assert cfg.morph_ops(3, 2) == {"2": ["open", [5, 3]], "1": ["none", [3, 3]]}
    assert DPConfig().morph_ops(3, 2) == {}
    for bad in ({"morph_in_training": "adaptive"}, {"morph_kernel": 4}, {"morph_in_training": "dilate"},
                {"morph_in_training": "adaptive", "morph_classes": {"0": "close"}}):
        with pytest.raises(DPConfigError):
            DPConfig(**bad)
    with pytest.raises(DPConfigError, match="labels of this dataset"):
        DPConfig(morph_in_training="adaptive", morph_classes={"3": "close"}).morph_ops(3, 2)


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("strategy", ["loop", "bk"])
def test_per_case_gradients_are_exact_through_the_morphology(dim, strategy):
    from nnunet_dp.morph import _filter_outputs, parse_ops

    net = tiny_unet(dim).double()
    net.register_forward_hook(_filter_outputs(parse_ops({"1": ["close", [3] * dim], "2": ["open", [3] * dim]}, 3)))
    loss_fn, rule = nnunet_loss(), make_rule("flat", clip_norm=0.5)
    x, targets = batch(dim, 3, size=16)
    ref, ref_norms = reference(net, loss_fn, x, targets, CLOSED["flat"])
    got = scaled_sum(net, loss_fn, x, targets, rule, strategy=strategy)
    torch.testing.assert_close(got.norms, ref_norms, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(torch.cat([g.flatten() for g in got.grads]), ref, rtol=1e-9, atol=1e-12)
