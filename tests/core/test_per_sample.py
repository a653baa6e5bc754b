"""Per-case scaled sums against an independent micro-batch reference on real nnU-Net networks."""
import pytest
import torch
from nets import batch, nnunet_loss, tiny_unet

from nnunet_dp.layers import GroupNormNNUNet
from nnunet_dp.per_sample import scaled_sum, trainable_parameters
from nnunet_dp.rules import make_rule


def reference(model, loss_fn, x, targets, scale_fn):
    """One forward/backward per case with .backward(); flattened gradients; scales from a closed form."""
    total, norms = None, []
    for i in range(x.shape[0]):
        model.zero_grad(set_to_none=True)
        loss_fn(model(x[i:i + 1]), [t[i:i + 1] for t in targets]).backward()
        g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()])
        n = g.norm()
        norms.append(n)
        total = scale_fn(n) * g if total is None else total + scale_fn(n) * g
    return total, torch.stack(norms)


CLOSED = {"flat": lambda n: min(1.0, 0.5 / n), "psac": lambda n: 0.5 / (n + 0.1 / (n + 0.1)),
          "autos": lambda n: 0.5 / (n + 0.01), "nsgd": lambda n: 0.5 / (n + 0.1)}


@pytest.mark.parametrize("dim,size", [(2, 16), (3, 16)])
@pytest.mark.parametrize("strategy", ["loop", "bk", "auto"])
@pytest.mark.parametrize("rule_name", ["flat", "psac"])
def test_scaled_sum_matches_microbatch_reference(dim, size, strategy, rule_name):
    model = tiny_unet(dim).double()
    loss_fn = nnunet_loss()
    x, targets = batch(dim, 3, size=size)
    rule = make_rule(rule_name, clip_norm=0.5, psac_r=0.1)
    ref, ref_norms = reference(model, loss_fn, x, targets, CLOSED[rule_name])
    got = scaled_sum(model, loss_fn, x, targets, rule, strategy=strategy)
    flat = torch.cat([g.flatten() for g in got.grads])
    torch.testing.assert_close(got.norms, ref_norms, rtol=1e-9, atol=1e-12)  # float64: only rounding may differ
    torch.testing.assert_close(flat, ref, rtol=1e-9, atol=1e-12)
    assert len(got.grads) == len(trainable_parameters(model))


def test_convtranspose_and_every_ds_head_are_covered():
    model = tiny_unet(2).double()
    names = [n for n, _ in model.named_parameters()]
    assert any("transpconvs" in n for n in names) and sum("seg_layers" in n for n in names) == 6
    x, t = batch(2, 2)
    got = scaled_sum(model, nnunet_loss(), x, t, make_rule("flat", clip_norm=1e9))
    by_name = dict(zip(names, got.grads))
    assert all(by_name[n].abs().sum() > 0 for n in names if "transpconvs" in n)
    # the lowest deep-supervision head has loss weight 0 in nnU-Net: an exact zero gradient, not a missing one
    assert torch.count_nonzero(by_name["decoder.seg_layers.0.weight"]) == 0
    assert by_name["decoder.seg_layers.0.weight"].shape == model.decoder.seg_layers[0].weight.shape


@pytest.mark.parametrize("strategy", ["loop", "bk", "auto"])
def test_batch_of_one_and_empty_batch(strategy):
    model = tiny_unet(2).double()
    x, t = batch(2, 1)
    rule = make_rule("autos", clip_norm=1.0)
    one = scaled_sum(model, nnunet_loss(), x, t, rule, strategy=strategy)
    ref, _ = reference(model, nnunet_loss(), x, t, lambda n: 1.0 / (n + 0.01))
    torch.testing.assert_close(torch.cat([g.flatten() for g in one.grads]), ref, rtol=1e-4, atol=1e-6)
    empty = scaled_sum(model, nnunet_loss(), None, None, rule, strategy=strategy)
    assert empty.norms.numel() == 0 and all(torch.count_nonzero(g) == 0 for g in empty.grads)


@pytest.mark.parametrize("strategy", ["loop", "bk", "auto"])
def test_batch_independence(strategy):
    """Changing case j leaves case i's contribution unchanged (catches batch Dice and BatchNorm)."""
    model = tiny_unet(2).double()
    rule = make_rule("flat", clip_norm=1e9)
    x, t = batch(2, 3, seed=1)
    x2, t2 = x.clone(), [a.clone() for a in t]
    x2[2] = torch.randn_like(x2[2]) * 5
    for a in t2:
        a[2] = (a[2] + 1) % 3
    a = scaled_sum(model, nnunet_loss(), x, t, rule, strategy=strategy)
    b = scaled_sum(model, nnunet_loss(), x2, t2, rule, strategy=strategy)
    torch.testing.assert_close(a.norms[:2], b.norms[:2], rtol=1e-10, atol=0)
    assert not torch.allclose(a.norms[2], b.norms[2])


def test_batch_dice_would_couple_cases():
    """The same check detects coupling when it is there: nnU-Net's batch Dice on the whole batch."""
    model = tiny_unet(2).double()
    x, t = batch(2, 2, seed=3)
    loss = nnunet_loss(batch_dice=True)

    def grad_case0(xx, tt):
        model.zero_grad(set_to_none=True)
        out = model(xx)
        loss(out, tt).backward()
        return model.encoder.stages[0][0].convs[0].conv.weight.grad.clone()

    x2 = x.clone()
    x2[1] = x2[1] * 3
    assert not torch.allclose(grad_case0(x, t), grad_case0(x2, t))


@pytest.mark.parametrize("dim", [2, 3])
def test_case_loss_matches_nnunet_loss_on_each_case(dim):
    """CaseLoss.per_case (one batched call) against nnU-Net's loss called on each case alone, float64."""
    from nnunet_dp.nnunet.case_loss import CaseLoss
    model, loss = tiny_unet(dim).double(), nnunet_loss()
    x, t = batch(dim, 3, size=16, seed=4)
    out = model(x)
    per_case = CaseLoss(loss).per_case(out, t)
    ref = torch.stack([loss([o[i:i + 1] for o in out], [a[i:i + 1] for a in t]) for i in range(3)])
    torch.testing.assert_close(per_case, ref, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(CaseLoss(loss)(out, t), loss(out, t))  # calling it is nnU-Net's loss unchanged


def test_make_case_loss_leaves_unsupported_losses_alone():
    from nnunet_dp.nnunet.case_loss import CaseLoss, make_case_loss
    coupled = nnunet_loss(batch_dice=True)
    assert make_case_loss(coupled) is coupled
    assert isinstance(make_case_loss(nnunet_loss()), CaseLoss)


@pytest.mark.parametrize("dim", [2, 3])
def test_bk_with_batched_case_loss_matches_reference(dim):
    from nnunet_dp.nnunet.case_loss import CaseLoss
    model, loss = tiny_unet(dim).double(), nnunet_loss()
    x, t = batch(dim, 4, size=16, seed=5)
    ref, ref_norms = reference(model, loss, x, t, CLOSED["autos"])
    got = scaled_sum(model, CaseLoss(loss), x, t, make_rule("autos", clip_norm=0.5), strategy="bk")
    torch.testing.assert_close(got.norms, ref_norms, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(torch.cat([g.flatten() for g in got.grads]), ref, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("group", [1, 3])
def test_ghost_norms_equal_per_case_weight_gradients_from_autograd(dim, group):
    """sum_{t,t'} (a_t . a_t')(g_t . g_t') equals ||per-case weight gradient||^2 taken by autograd, one case (its
    `group` rows) at a time, for convolutions (stride, padding, 1x1) and nnU-Net's transposed convolutions."""
    from torch import nn

    import nnunet_dp.bookkeeping as bk
    conv, tconv = (nn.Conv2d, nn.ConvTranspose2d) if dim == 2 else (nn.Conv3d, nn.ConvTranspose3d)
    torch.manual_seed(dim + group)
    layers = [(conv(3, 4, 3, stride=2, padding=1), 7), (conv(2, 5, 3, padding=1), 5), (conv(3, 2, 1), 4),
              (conv(2, 3, (3, 1, 3)[:dim], padding=(1, 0, 1)[:dim]), 5), (tconv(4, 3, 2, stride=2), 3)]
    for m, side in layers:
        m = m.double()
        a = torch.randn(2 * group, m.in_channels, *[side] * dim, dtype=torch.float64)
        g = torch.randn_like(m(a))
        expected = []
        for i in range(2):
            rows = slice(i * group, (i + 1) * group)
            (w,) = torch.autograd.grad((m(a[rows]) * g[rows]).sum(), [m.weight])
            expected.append(w.pow(2).sum())
        got = bk.ghost_sq_norms(m, a, g, group, torch.float64)
        torch.testing.assert_close(got, torch.stack(expected), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dim,group", [(2, 1), (2, 3), (3, 1), (3, 2)])
def test_unfold_per_case_weight_gradients_equal_autograd(dim, group):
    """PER_CASE_CONV = "unfold" (im2col + batched matmul, chunks of whole cases): each case's weight gradient equals
    autograd's on that case alone (its `group` rows), for strided, padded, 1x1, anisotropic and transposed convs; a
    grouped conv (no unfold form) falls back to convolution_backward and is exact too."""
    from torch import nn

    import nnunet_dp.bookkeeping as bk
    conv, tconv = (nn.Conv2d, nn.ConvTranspose2d) if dim == 2 else (nn.Conv3d, nn.ConvTranspose3d)
    torch.manual_seed(10 * dim + group)
    layers = [(conv(3, 4, 3, stride=2, padding=1), 7), (conv(2, 5, 3, padding=1), 5), (conv(3, 2, 1), 4),
              (conv(2, 3, (3, 1, 3)[:dim], padding=(1, 0, 1)[:dim]), 5), (tconv(4, 3, 2, stride=2), 3),
              (conv(4, 4, 3, padding=1, groups=2), 4)]
    for chunk in (1, 1 << 24):  # one case per bmm / all at once
        for m, side in layers:
            m = m.double()
            a = torch.randn(3 * group, m.in_channels, *[side] * dim, dtype=torch.float64)
            g = torch.randn_like(m(a))
            expected = torch.stack([torch.autograd.grad((m(a[i * group:(i + 1) * group]) * g[
                i * group:(i + 1) * group]).sum(), [m.weight])[0] for i in range(3)])
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(bk, "PER_CASE_CONV", "unfold")
                mp.setattr(bk, "CHUNK_ELEMENTS", chunk)
                got = bk._conv_weight_grad(m, a, g, per_case=True, group=group)
            assert got.shape == expected.shape
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("ghost", ["ghost", "materialise"])
def test_bk_defers_large_layers_exactly(monkeypatch, ghost):
    """Layers whose per-case gradients outgrow their activations take the second, weighted pass: still exact, with
    their norms from ghost Gram matrices or from per-case gradients."""
    import nnunet_dp.bookkeeping as bk
    monkeypatch.setattr(bk, "GHOST_NORMS", ghost)
    model, loss = tiny_unet(3 if ghost == "ghost" else 2).double(), nnunet_loss()
    x, t = batch(3 if ghost == "ghost" else 2, 3, size=16, seed=6)
    ref, ref_norms = reference(model, loss, x, t, CLOSED["flat"])
    for keep_ratio, chunk in ((0.0, 1), (1e9, bk.CHUNK_ELEMENTS)):  # defer every conv (1 case per chunk) / none
        monkeypatch.setattr(bk, "CHUNK_ELEMENTS", chunk)
        monkeypatch.setattr(bk, "KEEP_RATIO", keep_ratio)
        got = scaled_sum(model, loss, x, t, make_rule("flat", clip_norm=0.5), strategy="bk")
        torch.testing.assert_close(got.norms, ref_norms, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(torch.cat([g.flatten() for g in got.grads]), ref, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("keep_ratio,ghost", [(0.0, "ghost"), (0.0, "materialise"), (1e9, "auto")])
def test_bk_under_bf16_autocast_never_exceeds_the_clip_norm(monkeypatch, keep_ratio, ghost):
    """The clipped norm and the summed gradient are the same numbers (deferred layers: both in fp32 from what the
    bf16 convolution saw; ghost norms too), so a clipped case adds at most C, up to fp32 rounding."""
    import nnunet_dp.bookkeeping as bk
    monkeypatch.setattr(bk, "KEEP_RATIO", keep_ratio)
    monkeypatch.setattr(bk, "GHOST_NORMS", ghost)
    model, loss = tiny_unet(2, norm=GroupNormNNUNet, seed=3), nnunet_loss()
    x, t = batch(2, 4, size=16, seed=7, dtype=torch.float32)
    clip = 1e-3  # below every case's norm: every case is clipped to exactly C
    for i in range(4):
        got = scaled_sum(model, loss, x[i:i + 1], [u[i:i + 1] for u in t], make_rule("flat", clip_norm=clip),
                         strategy="bk", autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
        assert got.norms[0] > clip
        total = torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in got.grads]))
        assert total <= clip * (1 + 1e-5), float(total / clip - 1)


def test_bk_refuses_a_parameter_used_outside_a_layer_call():
    from torch import nn
    c1, c2 = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 1, 3, padding=1)

    class Direct(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = c1, c2

        def forward(self, x):
            return self.c2(self.c1.forward(x))  # forward() bypasses hooks: c1 would get no per-case gradient

    with pytest.raises(RuntimeError, match=r"c1\.weight"):
        scaled_sum(Direct(), lambda o, _t: o.square().mean(), torch.randn(2, 1, 8, 8), torch.zeros(2),
                   make_rule("flat", clip_norm=1.0), strategy="bk")


def test_bk_refuses_what_it_cannot_do_exactly():
    from torch import nn

    from nnunet_dp.per_sample import choose_strategy
    linear = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 14 * 14, 3))
    with pytest.raises(ValueError, match="Linear"):
        choose_strategy("bk", device=torch.device("cpu"), batch_size=4, case_voxels=256, model=linear)
    assert choose_strategy("auto", device=torch.device("cpu"), batch_size=4, case_voxels=256, model=linear) == "loop"

    conv = nn.Conv2d(1, 1, 3, padding=1)
    twice = nn.Sequential(conv, nn.ReLU(), conv)  # one layer called twice: per-case norms would need the sum
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(RuntimeError, match="called twice"):
        scaled_sum(twice, lambda o, _t: o.square().mean(), x, torch.zeros(2), make_rule("flat", clip_norm=1.0),
                   strategy="bk")


def test_auto_falls_back_to_the_loop_when_bk_meets_a_layer_called_twice():
    """Found only while running: 'auto' must not stop training; it takes the loop (exact) from then on."""
    from torch import nn

    from nnunet_dp.per_sample import choose_strategy
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 1, 3, padding=1).double()
    twice = nn.Sequential(conv, nn.Tanh(), conv)
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)

    def loss(o, _t):
        return o.square().mean()
    rule = make_rule("flat", clip_norm=0.05)
    assert choose_strategy("auto", device=torch.device("cpu"), batch_size=3, case_voxels=64, model=twice) == "bk"
    with pytest.warns(RuntimeWarning, match="called twice"):
        got = scaled_sum(twice, loss, x, torch.zeros(3), rule, strategy="auto")
    ref = scaled_sum(twice, loss, x, torch.zeros(3), rule, strategy="loop")
    for g, r in zip(got.grads, ref.grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)  # float64: only rounding may differ
    assert choose_strategy("auto", device=torch.device("cpu"), batch_size=3, case_voxels=64, model=twice) == "loop"


@pytest.mark.parametrize("strategy", ["loop", "bk"])
@pytest.mark.parametrize("rule_name", ["flat", "autos", "nsgd", "psac"])
def test_non_finite_cases_contribute_exactly_zero(strategy, rule_name):
    """One NaN and one inf case in a batch: the sum is finite and equals the sum over the other cases, their scale
    is 0 and they are counted as dropped (docs/invariants.md, invariant 4)."""
    model = tiny_unet(2).double()
    rule = make_rule(rule_name, clip_norm=0.5)
    x, t = batch(2, 4, seed=3)
    bad = x.clone()
    bad[1, 0, 3, 3] = float("nan")
    bad[3, 0, 5, 7] = float("inf")
    got = scaled_sum(model, nnunet_loss(), bad, t, rule, strategy=strategy)
    keep = [0, 2]
    ref = scaled_sum(model, nnunet_loss(), x[keep], [a[keep] for a in t], rule, strategy="loop")
    for g, r in zip(got.grads, ref.grads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)
    assert got.finite.tolist() == [True, False, True, False] and got.dropped == 2
    assert got.scales[1] == 0 and got.scales[3] == 0


def test_auto_choice_by_device_batch_and_patch():
    from nnunet_dp.per_sample import CPU_LOOP_MIN_CASE_VOXELS, choose_strategy
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_strategy("auto", device=cpu) == "auto"  # resolved per batch by scaled_sum
    assert choose_strategy("auto", device=cpu, batch_size=8, case_voxels=56 * 40) == "bk"
    assert choose_strategy("auto", device=cpu, batch_size=8, case_voxels=CPU_LOOP_MIN_CASE_VOXELS) == "loop"
    assert choose_strategy("auto", device=cuda, batch_size=8, case_voxels=CPU_LOOP_MIN_CASE_VOXELS) == "bk"
    assert choose_strategy("auto", device=cuda, batch_size=1, case_voxels=64) == "loop"
    with pytest.raises(ValueError, match="vmap"):
        choose_strategy("vmap", device=cpu)


def test_bk_frees_each_step_without_the_cyclic_collector():
    """The tape's hooks on graph nodes point back at it; it must be freed at once, not at the next gc run
    (else a step's per-case gradients stay alive into the next step and double its peak memory)."""
    import gc
    import weakref

    from nnunet_dp import bookkeeping
    tapes = []
    model, loss = tiny_unet(2), nnunet_loss()
    x, t = batch(2, 3, dtype=torch.float32)
    init = bookkeeping.Tape.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        tapes.append(weakref.ref(self))
    bookkeeping.Tape.__init__ = recording_init
    gc.disable()
    try:
        for _ in range(2):
            scaled_sum(model, loss, x, t, make_rule("flat", clip_norm=1.0), strategy="bk")
        assert len(tapes) == 2 and all(ref() is None for ref in tapes)
    finally:
        gc.enable()
        bookkeeping.Tape.__init__ = init


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("trainable", ["norm_bias", "decoder"])
@pytest.mark.parametrize("strategy", ["loop", "bk"])
def test_trained_subsets_match_the_reference_and_bk_skips_a_frozen_encoder(dim, trainable, strategy):
    """Under `trainable`, per-case norms and the scaled sum over the trained parameters equal the micro-batch
    reference (float64); under 'decoder' book-keeping's backward never enters the frozen encoder."""
    from nnunet_dp.nnunet.selection import freeze_, select_trainable
    model = tiny_unet(dim).double()
    sel = select_trainable(model, trainable)
    freeze_(model, sel)
    loss_fn, rule = nnunet_loss(), make_rule("flat", clip_norm=0.5)
    x, targets = batch(dim, 3, size=16)
    ref, ref_norms = reference(model, loss_fn, x, targets, CLOSED["flat"])
    trained = torch.cat([torch.ones(p.numel()) if p.requires_grad else torch.zeros(p.numel())
                         for p in model.parameters()]).bool()
    reached = []

    def watch(module, args, out):  # counts gradients arriving at the first encoder stage's output
        if out.requires_grad:
            out.register_hook(lambda g: reached.append(1))

    hook = model.encoder.stages[0].register_forward_hook(watch)
    try:
        got = scaled_sum(model, loss_fn, x, targets, rule, strategy=strategy)
    finally:
        hook.remove()
    torch.testing.assert_close(got.norms, ref_norms, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(torch.cat([g.flatten() for g in got.grads]), ref[trained], rtol=1e-9, atol=1e-12)
    assert len(got.grads) == len(sel.trained)
    if strategy == "bk":  # norm_bias trains the first stage's biases: its output gradient is needed there
        assert (len(reached) == 0) == (trainable == "decoder")
