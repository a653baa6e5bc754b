"""The parameter EMA (setting ema_decay): closed form, exact swap and restore, state round trip, checkpoint entries."""
import subprocess
import sys

import pytest
import torch
from nets import tiny_unet
from torch import nn

from nnunet_dp.ema import ParameterEMA, applied, check_decay
from nnunet_dp.errors import DPCheckpointError, DPConfigError
from nnunet_dp.nnunet.finetune import checkpoint_weights, restore_ema
from nnunet_dp.nnunet.selection import freeze_, select_trainable


def small_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Conv2d(3, 2, 1)).double()
    model[0].weight.requires_grad_(False)  # frozen: not averaged
    return model


def sgd_like_steps(model: nn.Module, ema: ParameterEMA, steps: int) -> list[dict[str, torch.Tensor]]:
    """Random parameter moves, as optimizer steps would make; returns theta_0 .. theta_t of the trained ones."""
    g = torch.Generator().manual_seed(1)
    history = [{n: p.detach().clone() for n, p in model.named_parameters()}]
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype))
        ema.update(model)
        history.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return history


def test_update_equals_the_closed_form():
    model, d, t = small_model(), 0.8, 5
    ema = ParameterEMA(model, d)
    theta = sgd_like_steps(model, ema, t)
    assert ema.names == ["0.bias", "1.weight", "1.bias", "2.weight", "2.bias"] and ema.updates == t
    for n in ema.names:  # e_t = d^t theta_0 + (1 - d) sum_{k=1..t} d^(t-k) theta_k
        closed = d ** t * theta[0][n] + (1 - d) * sum(d ** (t - k) * theta[k][n] for k in range(1, t + 1))
        torch.testing.assert_close(ema.shadow[n], closed, rtol=1e-13, atol=1e-13)
    weights = ema.weights(model)
    assert weights.keys() == model.state_dict().keys()
    assert torch.equal(weights["0.weight"], model[0].weight) and torch.equal(weights["1.running_mean"],
                                                                              model[1].running_mean)
    assert torch.equal(weights["2.bias"], ema.shadow["2.bias"]) and not torch.equal(weights["2.bias"], model[2].bias)


def test_applied_swaps_in_the_average_and_restores_the_raw_weights_exactly():
    model = small_model()
    ema = ParameterEMA(model, 0.9)
    sgd_like_steps(model, ema, 3)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    with applied(ema, model):
        assert all(torch.equal(p, ema.shadow[n]) for n, p in model.named_parameters() if n in ema.names)
        assert torch.equal(model[0].weight, raw["0.weight"])
    assert all(torch.equal(v, raw[k]) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError, match="inside"), applied(ema, model):
        raise RuntimeError("inside")  # restored on errors too
    assert all(torch.equal(v, raw[k]) for k, v in model.state_dict().items())
    with applied(None, model):  # EMA off: nothing happens
        assert all(torch.equal(v, raw[k]) for k, v in model.state_dict().items())


def test_state_dict_round_trip_and_a_resume_that_does_not_fit():
    model = small_model()
    ema = ParameterEMA(model, 0.9)
    sgd_like_steps(model, ema, 2)
    other = ParameterEMA(small_model(), 0.9)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 2 and all(torch.equal(other.shadow[n], ema.shadow[n]) for n in ema.names)
    with pytest.raises(DPConfigError, match=r"'ema_decay' = 0\.5 .*\(0\.9\)"):
        ParameterEMA(small_model(), 0.5).load_state_dict(ema.state_dict())
    state = ema.state_dict()
    del state["shadow"]["2.weight"]
    with pytest.raises(DPCheckpointError, match="lack 1 of the 5 trained parameters"):
        other.load_state_dict(state)
    for bad in (0, 1, 1.5, -0.1, float("nan"), True, "0.9"):
        with pytest.raises(DPConfigError, match="ema_decay"):
            check_decay(bad)


def test_checkpoint_entries_and_restore_on_a_frozen_nnunet_network():
    net = tiny_unet(2)
    freeze_(net, select_trainable(net, "norm_bias"))
    ema = ParameterEMA(net, 0.9)
    sgd_like_steps(net, ema, 2)
    raw = net.state_dict()
    latest = checkpoint_weights(net, ema, "/x/checkpoint_latest.pth")
    final = checkpoint_weights(net, ema, "/x/checkpoint_final.pth")
    assert all(torch.equal(latest["network_weights"][k], raw[k]) for k in raw)
    assert all(torch.equal(final["raw_network_weights"][k], raw[k]) for k in raw)
    assert final["network_weights"] is final["ema_network_weights"] and final["ema_updates"] == 2
    changed = [k for k in raw if not torch.equal(final["network_weights"][k], raw[k])]
    assert set(changed) == {k for k, v in net.state_dict(keep_vars=True).items() if v.requires_grad}  # aliases too
    assert checkpoint_weights(net, None, "/x/checkpoint_final.pth").keys() == {"network_weights"}

    fresh = tiny_unet(2)
    fresh.load_state_dict(final["network_weights"])  # aliases (all_modules) hold the average too
    assert all(torch.equal(p, ema.shadow[n]) for n, p in fresh.named_parameters() if n in ema.names)
    freeze_(fresh, select_trainable(fresh, "norm_bias"))
    fresh.load_state_dict(final["raw_network_weights"])
    resumed = restore_ema({**final, "dp_config": {"ema_decay": 0.9}}, fresh, 0.9, print)
    assert resumed.updates == 2 and all(torch.equal(resumed.shadow[n], ema.shadow[n]) for n in ema.names)
    assert restore_ema(final, fresh, None, print) is None
    logged = []
    started = restore_ema({"network_weights": raw}, fresh, 0.9, logged.append)
    assert started.updates == 0 and "starts from its weights" in logged[0]


def test_ema_is_core_and_does_not_import_nnunetv2():
    code = ("import sys, nnunet_dp.ema\n"
            "assert not [m for m in sys.modules if m.startswith(('nnunetv2', 'batchgenerators'))]\n")
    subprocess.run([sys.executable, "-c", code], check=True)
