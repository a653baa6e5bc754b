"""Per-case scaled sums against an independent micro-batch reference on real nnU-Net networks."""
import pytest
import torch
from nets import batch, nnunet_loss, tiny_unet

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
@pytest.mark.parametrize("strategy", ["loop"])
@pytest.mark.parametrize("rule_name", ["flat", "psac"])
def test_scaled_sum_matches_microbatch_reference(dim, size, strategy, rule_name):
    model = tiny_unet(dim).double()
    loss_fn = nnunet_loss()
    x, targets = batch(dim, 3, size=size)
    rule = make_rule(rule_name, clip_norm=0.5, psac_r=0.1)
    ref, ref_norms = reference(model, loss_fn, x, targets, CLOSED[rule_name])
    got = scaled_sum(model, loss_fn, x, targets, rule, strategy=strategy)
    flat = torch.cat([g.flatten() for g in got.grads])
    torch.testing.assert_close(got.norms, ref_norms, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(flat, ref, rtol=1e-4, atol=1e-6)
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


@pytest.mark.parametrize("strategy", ["loop"])
def test_batch_of_one_and_empty_batch(strategy):
    model = tiny_unet(2).double()
    x, t = batch(2, 1)
    rule = make_rule("autos", clip_norm=1.0)
    one = scaled_sum(model, nnunet_loss(), x, t, rule, strategy=strategy)
    ref, _ = reference(model, nnunet_loss(), x, t, lambda n: 1.0 / (n + 0.01))
    torch.testing.assert_close(torch.cat([g.flatten() for g in one.grads]), ref, rtol=1e-4, atol=1e-6)
    empty = scaled_sum(model, nnunet_loss(), None, None, rule, strategy=strategy)
    assert empty.norms.numel() == 0 and all(torch.count_nonzero(g) == 0 for g in empty.grads)


@pytest.mark.parametrize("strategy", ["loop"])
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
