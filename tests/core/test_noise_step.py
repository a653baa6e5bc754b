"""The private step: noise std is exactly sigma*Delta/(qN), independent of the batch, fresh every step."""
import math

import pytest
import torch
from nets import batch, nnunet_loss, tiny_unet

from nnunet_dp.config import DPConfig
from nnunet_dp.per_sample import scaled_sum, trainable_parameters
from nnunet_dp.run import DPRun, make_plan


def make_run(rule="psac", sigma=1.3, clip=0.7, n=40, ebs=4.0, seed=123):
    cfg = DPConfig(noise_multiplier=sigma, target_epsilon=None, clip_norm=clip, expected_batch_size=ebs,
                   num_epochs=1, num_iterations_per_epoch=10)
    plan = make_plan(cfg, rule=rule, num_training_cases=n, plans_batch_size=2)
    return DPRun(plan, device=torch.device("cpu"), seed=seed)


def noise_part(run, model, x, t):
    """What the step added on top of the (independently recomputed) scaled sum, times qN."""
    clean = scaled_sum(model, nnunet_loss(), x, t, run.rule)
    run.private_step(model, nnunet_loss(), x, t)
    qn = run.plan.expected_batch_size
    return torch.cat([(p.grad * qn - c).flatten() for p, c in zip(trainable_parameters(model), clean.grads)])


@pytest.mark.parametrize("rule", ["flat", "autos", "nsgd", "psac"])
def test_noise_std_is_sigma_delta(rule):
    model = tiny_unet(2).double()
    run = make_run(rule=rule)
    x, t = batch(2, 3)
    z = noise_part(run, model, x, t)
    n = z.numel()
    expected = 1.3 * 0.7  # sigma * Delta (Delta = C for every rule)
    # std of a sample std: expected / sqrt(2n); allow 5 of them
    assert abs(z.std().item() - expected) < 5 * expected / math.sqrt(2 * n)
    assert abs(z.mean().item()) < 5 * expected / math.sqrt(n)
    # after the division by qN the gradient's noise std is sigma*Delta/(qN)
    assert run.plan.expected_batch_size == pytest.approx(4.0)


def test_noise_independent_of_batch_contents_and_fresh_each_step():
    model = tiny_unet(2).double()
    x1, t1 = batch(2, 3, seed=1)
    x2, t2 = batch(2, 1, seed=2)
    z_a = noise_part(make_run(seed=7), model, x1, t1)
    z_b = noise_part(make_run(seed=7), model, x2, t2)
    z_empty = noise_part(make_run(seed=7), model, None, None)
    torch.testing.assert_close(z_a, z_b, rtol=0, atol=1e-9)
    torch.testing.assert_close(z_a, z_empty, rtol=0, atol=1e-9)
    run = make_run(seed=7)
    first, second = noise_part(run, model, x1, t1), noise_part(run, model, x1, t1)
    assert torch.corrcoef(torch.stack([first, second]))[0, 1].abs() < 0.05


def test_empty_batch_still_steps_and_every_parameter_gets_a_gradient():
    model = tiny_unet(2).double()
    run = make_run()
    run.private_step(model, nnunet_loss(), None, None)
    assert run.steps == 1
    params = trainable_parameters(model)
    assert len(params) == len(list(model.parameters()))
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == p.numel() for p in params)


def test_every_parameter_gets_a_private_gradient_with_data():
    model = tiny_unet(3).double()
    run = make_run(rule="flat")
    x, t = batch(3, 2, size=16)
    run.private_step(model, nnunet_loss(), x, t)
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, name
        assert torch.count_nonzero(p.grad) == p.numel(), f"{name} has exact zeros: noise missing"
