"""Augmentation multiplicity (K patches per case, averaged before scaling) and frozen parameters in the per-case
gradient engines, against an independent float64 micro-batch reference (one row at a time, torch.autograd.grad)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from nets import batch, nnunet_loss, tiny_unet

import nnunet_dp.bookkeeping as bk
from nnunet_dp.per_sample import case_gradient, finite_scales, global_norm, scaled_sum, trainable_parameters
from nnunet_dp.rules import make_rule

# float64 nets, but nnU-Net's Dice sums in float32: a batch of K rows vs one row may round those sums differently
TOL = {"rtol": 1e-6, "atol": 1e-9}
CLOSED = {"flat": lambda n, c: min(1.0, c / n), "psac": lambda n, c: c / (n + 0.1 / (n + 0.1))}


def row_gradients(model, loss_fn, x, t) -> torch.Tensor:
    """(rows, P): each row's gradient over the trainable parameters, as a batch of one."""
    params = trainable_parameters(model)
    out = []
    for r in range(x.shape[0]):
        loss = loss_fn(model(x[r:r + 1]), [a[r:r + 1] for a in t])
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        out.append(torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads)]))
    return torch.stack(out)


def reference(model, loss_fn, x, t, k, rule_name, clip):
    """Per-case means of the K row gradients, their norms, and sum_i s(||mean_i||) mean_i in closed form."""
    means = row_gradients(model, loss_fn, x, t).view(x.shape[0] // k, k, -1).mean(1)
    norms = means.norm(dim=1)
    total = sum(CLOSED[rule_name](float(n), clip) * m for n, m in zip(norms, means))
    return means, norms, total


def flat(grads) -> torch.Tensor:
    return torch.cat([g.flatten() for g in grads])


def test_nnunet_loss_of_k_rows_is_the_mean_of_row_losses():
    """Why a case's K rows may be one batch in the loop: nnU-Net's DC_and_CE (no batch Dice) with deep supervision
    on a batch is the mean of its per-row losses (checked, not assumed); the engines use per-row losses anyway."""
    model, loss = tiny_unet(2).double(), nnunet_loss()
    x, t = batch(2, 3, seed=11)
    out = model(x)
    rows = torch.stack([loss([o[r:r + 1] for o in out], [a[r:r + 1] for a in t]) for r in range(3)])
    # nnU-Net's Dice sums one-hot targets in float32: equal up to float32 rounding, even for a float64 network
    torch.testing.assert_close(loss(out, t), rows.mean(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dim,k", [(2, 2), (2, 3), (3, 2)])
@pytest.mark.parametrize("strategy", ["loop", "bk"])
@pytest.mark.parametrize("rule_name", ["flat", "psac"])
def test_case_gradient_is_the_mean_of_its_patch_gradients(dim, k, strategy, rule_name):
    model, loss = tiny_unet(dim).double(), nnunet_loss()
    x, t = batch(dim, 2 * k, size=16, seed=dim + k)
    means, ref_norms, _ = reference(model, loss, x, t, k, rule_name, 1.0)
    clip = 0.5 * float(ref_norms.min())  # clipping binds for every case
    ref = sum(CLOSED[rule_name](float(n), clip) * m for n, m in zip(ref_norms, means))  # sum_i s(||mean_i||) mean_i
    got = scaled_sum(model, loss, x, t, make_rule(rule_name, clip_norm=clip, psac_r=0.1), strategy=strategy, group=k)
    assert got.norms.shape == got.scales.shape == got.losses.shape == got.finite.shape == (2,)
    torch.testing.assert_close(got.norms, ref_norms, **TOL)
    torch.testing.assert_close(flat(got.grads), ref, **TOL)
    assert ((got.scales * got.norms) <= clip * (1 + 1e-12)).all()  # each case adds at most C
    rows = torch.stack([loss(model(x[r:r + 1]), [a[r:r + 1] for a in t]) for r in range(2 * k)])
    torch.testing.assert_close(got.losses.double(), rows.view(2, k).mean(1), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("strategy", ["loop", "bk"])
def test_batched_case_loss_with_k_patches(strategy):
    """nnU-Net's loss with the batched per-row evaluation (CaseLoss.per_case), as the trainer passes it."""
    from nnunet_dp.nnunet.case_loss import CaseLoss
    model, loss = tiny_unet(2).double(), nnunet_loss()
    x, t = batch(2, 6, seed=13)
    means, norms, _ = reference(model, loss, x, t, 3, "psac", 1.0)
    got = scaled_sum(model, CaseLoss(loss), x, t, make_rule("psac", clip_norm=0.1, psac_r=0.1), strategy=strategy,
                     group=3)
    torch.testing.assert_close(got.norms, norms, **TOL)
    torch.testing.assert_close(flat(got.grads), sum(CLOSED["psac"](float(n), 0.1) * m for n, m in zip(norms, means)),
                               **TOL)


@pytest.mark.parametrize("strategy", ["loop", "bk"])
def test_group_one_is_the_unchanged_per_row_path(strategy):
    """K = 1 is bit for bit the path without grouping: the default, and the per-case formula written out."""
    model, loss = tiny_unet(2).double(), nnunet_loss()
    x, t = batch(2, 3, seed=2)
    rule = make_rule("flat", clip_norm=0.3)
    one = scaled_sum(model, loss, x, t, rule, strategy=strategy, group=1)
    default = scaled_sum(model, loss, x, t, rule, strategy=strategy)
    for a, b in zip([*one.grads, one.norms, one.scales, one.losses, one.finite],
                    [*default.grads, default.norms, default.scales, default.losses, default.finite]):
        assert torch.equal(a, b)
    if strategy == "loop":  # the pre-multiplicity loop: a batch of one per case, norm, scale, sum
        params = trainable_parameters(model)
        acc = [torch.zeros_like(p) for p in params]
        for i in range(3):
            g, lo = case_gradient(model, params, loss, x[i:i + 1], [a[i:i + 1] for a in t], torch.enable_grad)
            scale, _ = finite_scales(rule, global_norm(g), lo)
            torch._foreach_add_(acc, torch._foreach_mul(g, scale.to(g[0].dtype)))
            assert torch.equal(one.norms[i], global_norm(g)) and torch.equal(one.losses[i], lo)
        assert all(torch.equal(a, b) for a, b in zip(one.grads, acc))


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("keep_ratio,chunk,conv,ghost", [
    (0.0, 1, "auto", "materialise"), (1e9, 1 << 24, "auto", "auto"), (0.0, 1, "grouped", "materialise"),
    (1e9, 1 << 24, "grouped", "auto"), (0.0, 1, "auto", "ghost"), (0.0, 1 << 24, "auto", "ghost"),
    (1e9, 1, "unfold", "auto"), (0.0, 1 << 24, "unfold", "materialise")])
def test_bk_equals_loop_with_a_non_finite_case(monkeypatch, k, keep_ratio, chunk, conv, ghost):
    """Deferred convs (chunks of one whole case) and kept ones, per-case conv gradients one call per case or
    cases folded into groups, deferred norms from per-case gradients or ghost Gram matrices; case 1 has a NaN in
    one of its K rows: all K rows contribute exactly zero."""
    monkeypatch.setattr(bk, "KEEP_RATIO", keep_ratio)
    monkeypatch.setattr(bk, "CHUNK_ELEMENTS", chunk)
    monkeypatch.setattr(bk, "PER_CASE_CONV", conv)
    monkeypatch.setattr(bk, "GHOST_NORMS", ghost)
    model, loss = tiny_unet(2).double(), nnunet_loss()
    x, t = batch(2, 3 * k, seed=20 + k)
    bad = x.clone()
    bad[k + 1, 0, 4, 4] = float("nan")  # case 1, its second patch
    rule = make_rule("flat", clip_norm=0.2)
    got = scaled_sum(model, loss, bad, t, rule, strategy="bk", group=k)
    loop = scaled_sum(model, loss, bad, t, rule, strategy="loop", group=k)
    keep = [r for r in range(3 * k) if r // k != 1]
    clean = scaled_sum(model, loss, x[keep], [a[keep] for a in t], rule, strategy="loop", group=k)
    assert got.finite.tolist() == loop.finite.tolist() == [True, False, True] and got.dropped == 1
    assert got.scales[1] == 0
    for g, lo, c in zip(got.grads, loop.grads, clean.grads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, lo, **TOL)
        torch.testing.assert_close(g, c, **TOL)
    torch.testing.assert_close(got.norms[[0, 2]], clean.norms, **TOL)


@pytest.mark.parametrize("strategy", ["loop", "bk", "auto"])
def test_rows_not_a_multiple_of_group(strategy):
    model, loss = tiny_unet(2).double(), nnunet_loss()
    x, t = batch(2, 5)
    with pytest.raises(ValueError, match="group 2"):
        scaled_sum(model, loss, x, t, make_rule("flat", clip_norm=1.0), strategy=strategy, group=2)
    with pytest.raises(ValueError, match="group 0"):
        scaled_sum(model, loss, x, t, make_rule("flat", clip_norm=1.0), strategy=strategy, group=0)


def test_private_step_passes_group_through():
    from nnunet_dp.config import DPConfig
    from nnunet_dp.run import DPRun, make_plan
    cfg = DPConfig(noise_multiplier=1.0, target_epsilon=None, clip_norm=0.5, expected_batch_size=4.0, num_epochs=1,
                   num_iterations_per_epoch=10)
    run = DPRun(make_plan(cfg, rule="flat", num_training_cases=40, plans_batch_size=2), device=torch.device("cpu"),
                seed=1)
    model, loss = tiny_unet(2).double(), nnunet_loss()
    x, t = batch(2, 4)
    assert run.private_step(model, loss, x, t, group=2).norms.shape == (2,) and run.steps == 1
    with pytest.raises(ValueError, match="group 3"):
        run.private_step(model, loss, x, t, group=3)
    assert run.steps == 1  # refused before any noise or ledger step


def _freeze(model, keep) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(keep(name, p))


FROZEN = {  # name -> which parameters stay trainable
    "norm_bias": lambda name, p: p.dim() == 1 or "seg_layers" in name,  # norm affine, biases, heads
    "decoder": lambda name, p: name.startswith("decoder.") and not name.startswith("decoder.encoder."),
}


@pytest.mark.parametrize("setting", list(FROZEN))
@pytest.mark.parametrize("strategy", ["loop", "bk"])
def test_frozen_parameters_get_no_per_case_gradient(monkeypatch, setting, strategy):
    """Grads only for trainable parameters, equal to the reference restricted to them; 'bk' computes no per-case
    gradient for a frozen conv weight or norm weight. Freezing after a first step re-reads the structure."""
    calls = {"conv": [], "norm": []}
    conv_grad, normalised = bk._conv_weight_grad, bk.normalised

    def spy_conv(m, *args, **kwargs):
        calls["conv"].append(m)
        return conv_grad(m, *args, **kwargs)

    def spy_norm(m, *args):
        calls["norm"].append(m)
        return normalised(m, *args)
    monkeypatch.setattr(bk, "_conv_weight_grad", spy_conv)
    monkeypatch.setattr(bk, "normalised", spy_norm)
    monkeypatch.setattr(bk, "KEEP_RATIO", 0.0)  # deferred convs too
    model, loss = tiny_unet(2).double(), nnunet_loss()
    x, t = batch(2, 4, seed=9)
    rule = make_rule("psac", clip_norm=0.05, psac_r=0.1)
    scaled_sum(model, loss, x, t, rule, strategy=strategy, group=2)  # structure read with everything trainable
    _freeze(model, FROZEN[setting])
    calls["conv"].clear()
    calls["norm"].clear()
    params = trainable_parameters(model)
    assert 0 < len(params) < len(list(model.parameters()))
    got = scaled_sum(model, loss, x, t, rule, strategy=strategy, group=2)
    _, _, ref = reference(model, loss, x, t, 2, "psac", 0.05)
    assert len(got.grads) == len(params) and all(g.shape == p.shape for g, p in zip(got.grads, params))
    torch.testing.assert_close(flat(got.grads), ref, **TOL)
    assert all(m.weight.requires_grad for m in calls["conv"] + calls["norm"])
    if strategy == "bk":
        assert calls["conv"] and {id(p) for _, _, ps in bk.parameterised_layers(model) for p in ps} == set(map(id,
                                                                                                               params))


def test_forget_structure_reads_the_model_again():
    model = tiny_unet(2)
    before = len(bk.parameterised_layers(model))
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    assert len(bk.parameterised_layers(model)) == before  # cached
    bk.forget_structure(model)
    assert 0 < len(bk.parameterised_layers(model)) < before


class _Cases:
    """A fake nnU-Net dataset: case c is a 1 x 6 x 40 x 40 volume whose voxel values encode (case, slice, x, y)."""

    def __init__(self) -> None:
        self.identifiers = [f"c{i}" for i in range(6)]

    def load_case(self, key: str):
        c = int(key[1:])
        data = (c * 100000 + np.arange(6 * 40 * 40, dtype=np.float32).reshape(1, 6, 40, 40))
        seg = (np.arange(6 * 40 * 40).reshape(1, 6, 40, 40) % 3).astype(np.int16)
        return data, seg, None, {"class_locations": {1: np.argwhere(seg == 1)[:50], 2: np.argwhere(seg == 2)[:50]}}


def test_loader_repeats_each_sampled_case_k_times_with_independent_patches():
    from nnunet_dp.nnunet.loader import nnUNetPoissonDataLoader
    lm = SimpleNamespace(all_labels=[0, 1, 2], has_ignore_label=False)
    dl = nnUNetPoissonDataLoader(_Cases(), (16, 16), (16, 16), lm, sampling_rate=0.5, oversample_foreground_percent=0.3,
                                 transforms=None, seed=3, augmentations_per_case=3)
    seen = 0
    for _ in range(20):
        b = dl.generate_train_batch()
        keys = list(b["keys"])
        assert len(keys) % 3 == 0 and dl.batch_size == len(keys)
        cases = keys[::3]
        assert keys == [c for c in cases for _ in range(3)] and len(set(cases)) == len(cases)
        if not keys:
            assert b["data"] is None
            continue
        assert tuple(b["data"].shape) == (len(keys), 1, 16, 16)
        owner = (b["data"].flatten(1).max(1).values // 100000).long().tolist()
        assert owner == [int(k[1:]) for k in keys]  # every row is a patch of its own case only
        for i in range(len(cases)):
            rows = b["data"][3 * i:3 * i + 3]
            seen += int(not (torch.equal(rows[0], rows[1]) and torch.equal(rows[1], rows[2])))
    assert seen > 0  # patches of one case are placed independently
    with pytest.raises(ValueError, match="augmentations_per_case"):
        nnUNetPoissonDataLoader(_Cases(), (16, 16), (16, 16), lm, sampling_rate=0.5, oversample_foreground_percent=0.3,
                                transforms=None, seed=3, augmentations_per_case=0)
