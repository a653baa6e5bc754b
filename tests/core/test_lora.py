"""LoRA adapters (setting trainable: lora) on real nnU-Net networks: the merge is exact, the state is the plain
network's, nnU-Net's own loaders take it, and both per-case engines are exact on the factors."""
import copy

import pytest
import torch
from nets import batch, nnunet_loss, tiny_unet
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
from test_finetune import plans_network
from test_per_sample import CLOSED, reference
from torch import nn

from nnunet_dp import lora
from nnunet_dp.per_sample import scaled_sum
from nnunet_dp.rules import make_rule

MAKERS = {"PlainConvUNet": lambda: tiny_unet(2), "PlainConvUNet3d": lambda: tiny_unet(3),
          "ResidualEncoderUNet": plans_network}


def adapted(make, rank=2, seed=3):
    """The network, a copy with adapters whose factors are random (B != 0), and the adapters."""
    plain = make().double().eval()
    net = copy.deepcopy(plain)
    found = lora.add_adapters_(net, rank, skip=net.decoder.seg_layers.modules())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.factor_parameters(net):
            p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return plain, net, found


def inputs(net, size=16):
    dim = 3 if any(isinstance(m, nn.Conv3d) for m in net.modules()) else 2
    return torch.randn((2, 1, *(size,) * dim), generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("name", MAKERS)
def test_every_conv_but_the_heads_is_adapted_once(name):
    plain, net, found = adapted(MAKERS[name])
    convs = {id(m) for m in plain.modules() if isinstance(m, nn.modules.conv._ConvNd)}
    heads = {id(m) for m in plain.decoder.seg_layers.modules()}
    assert len(found) == len(convs - heads) > 0
    assert any(m.transposed for m in found)  # ConvTranspose adapted too
    # no plain conv is reachable any more except inside an adapter or in the heads
    inside = {id(m.base) for m in found}
    for parent in net.modules():
        for child in parent._modules.values():
            if isinstance(child, nn.modules.conv._ConvNd) and not isinstance(parent, lora.LoRAConv):
                assert id(child) in {id(m) for m in net.decoder.seg_layers.modules()} or id(child) in inside
    assert lora.num_factor_parameters(plain, 2, skip=plain.decoder.seg_layers.modules()) == \
        sum(p.numel() for p in lora.factor_parameters(net))


@pytest.mark.parametrize("name", MAKERS)
def test_the_merged_plain_state_is_the_adapted_function(name):
    """state_dict() has exactly the plain network's keys and shapes; loaded into the plain network it computes what
    the adapted one does (the merge W + B·A is exact up to float64 rounding)."""
    plain, net, _ = adapted(MAKERS[name])
    state = net.state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in plain.state_dict().items()}
    x = inputs(net)
    with torch.no_grad():
        want = net(x)
        merged = copy.deepcopy(plain)
        merged.load_state_dict(state)
        got = merged(x)
    for a, b in zip(want, got):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(want[0], plain(x)[0])  # the factors do change the function


@pytest.mark.parametrize("name", MAKERS)
def test_loading_a_plain_state_keeps_its_function_and_the_factors(name):
    """nnU-Net loads plain states into the adapted network (-pretrained_weights, --c, --val): the network then
    computes the loaded state's function, whatever the factors are; factors() / load_factors restore them exactly."""
    _, net, _ = adapted(MAKERS[name])
    other = MAKERS[name]().double().eval()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01)
    saved = lora.factors(net)
    net.load_state_dict(other.state_dict())
    x = inputs(net)
    with torch.no_grad():
        for a, b in zip(net(x), other(x)):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    factors_now = lora.factors(net)
    assert all(torch.equal(factors_now[k], saved[k]) for k in saved if ".lora_" in k)
    lora.load_factors(net, saved)
    assert all(torch.equal(lora.factors(net)[k], v) for k, v in saved.items())
    with pytest.raises(ValueError, match="do not fit"):
        lora.load_factors(net, {k: v for k, v in list(saved.items())[1:]})


def test_nnunets_load_pretrained_weights_takes_the_adapted_network(tmp_path):
    plain, net, _ = adapted(MAKERS["PlainConvUNet"])
    public = MAKERS["PlainConvUNet"]().double()
    torch.save({"network_weights": public.state_dict()}, tmp_path / "public.pth")
    load_pretrained_weights(net, str(tmp_path / "public.pth"))
    x = inputs(net)
    with torch.no_grad():
        expected = copy.deepcopy(public)
        expected.decoder.seg_layers.load_state_dict(plain.decoder.seg_layers.state_dict())  # heads not transferred
        torch.testing.assert_close(net(x)[0], expected(x)[0], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("strategy", ["loop", "bk"])
def test_per_case_gradients_of_the_factors_are_exact(dim, strategy):
    """trainable lora: the factors, norms, biases and heads train; per-case norms and the scaled sum equal the
    micro-batch reference (float64) in both engines."""
    from nnunet_dp.nnunet.selection import freeze_, select_trainable

    _, net, _ = adapted(lambda: tiny_unet(dim))
    net.train()
    sel = select_trainable(net, "lora")
    freeze_(net, sel)
    assert {id(p) for p in lora.factor_parameters(net)} <= {id(p) for p in sel.trained}
    assert all(not m.base.weight.requires_grad for _, m in lora.adapters(net))
    loss_fn, rule = nnunet_loss(), make_rule("flat", clip_norm=0.5)
    x, targets = batch(dim, 3, size=16)
    ref, ref_norms = reference(net, loss_fn, x, targets, CLOSED["flat"])
    trained = torch.cat([torch.full((p.numel(),), p.requires_grad) for p in net.parameters()])
    got = scaled_sum(net, loss_fn, x, targets, rule, strategy=strategy)
    torch.testing.assert_close(got.norms, ref_norms, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(torch.cat([g.flatten() for g in got.grads]), ref[trained], rtol=1e-9, atol=1e-12)
