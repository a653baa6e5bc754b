"""Gradient projection onto a public subspace (nnunet_dp.projection): the subspace against numpy's SVD, the clipped
norm and the noise's dimension and covariance in closed form, and the one-run audit on the projected mechanism."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import nnunet_dp.step as step_mod
from nnunet_dp import projection as proj_mod
from nnunet_dp.audit.canaries import (
    _make_run,
    canary_norm,
    likelihood_scores,
    make_canaries,
    train_with_canaries,
)
from nnunet_dp.audit.estimator import audit_from_scores
from nnunet_dp.projection import Projection, top_subspace
from nnunet_dp.step import privatize_


def random_basis(d: int, k: int, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def test_top_subspace_is_numpys_top_eigenspace_of_the_second_moment():
    g = torch.randn(40, 30, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g[:, :5] *= 10  # a dominant 5-dim direction set
    v = top_subspace(g, 5)
    _, u = np.linalg.eigh(g.numpy().T @ g.numpy())  # ascending eigenvalues of G^T G
    reference = u[:, -5:]
    np.testing.assert_allclose(v.numpy() @ v.numpy().T, reference @ reference.T, atol=1e-10)
    np.testing.assert_allclose(v.T @ v, np.eye(5), atol=1e-12)
    for bad in (0, 31, 41):
        with pytest.raises(ValueError, match="projection_dim"):
            top_subspace(g, bad)


def test_top_subspace_columns_have_a_fixed_sign():
    """-G has the same Gram matrix as G, so eigh returns the same U and G^T U flips sign: without a sign rule the
    basis (and the noise V z) would depend on it. Reference: numpy's SVD with the same sign rule."""
    g = torch.randn(12, 50, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    v = top_subspace(g, 4)
    torch.testing.assert_close(top_subspace(-g, 4), v, rtol=0, atol=1e-12)
    torch.testing.assert_close(top_subspace(g[torch.randperm(12, generator=torch.Generator().manual_seed(4))], 4), v,
                               rtol=0, atol=1e-10)
    _, _, vt = np.linalg.svd(g.numpy(), full_matrices=False)
    reference = vt[:4].T
    reference = reference * np.sign(reference[np.abs(reference).argmax(axis=0), range(4)])
    np.testing.assert_allclose(v.numpy(), reference, atol=1e-10)
    assert (v.gather(0, v.abs().argmax(dim=0, keepdim=True)) > 0).all()


def test_projected_sum_and_noise_in_closed_form():
    """The P part becomes V V^T sum + V (sigma Delta z_k), the R part sum + sigma Delta z_R, divided by qN; the noise
    never depends on the sum; a projected case gradient is never longer than the case gradient."""
    d_p, d_r, k, sigma, delta, qn = 12, 3, 4, 1.7, 0.5, 8.0
    basis = random_basis(d_p, k)
    projection = Projection(basis=basis, projected=(True, False, True))
    sums = [torch.randn(2, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64),
            torch.randn(6, dtype=torch.float64)]
    p_flat = torch.cat([sums[0].flatten(), sums[2].flatten()])
    assert projection.noise_dimensions([6, 3, 6]) == k + d_r
    assert (basis.T @ p_flat).norm() <= p_flat.norm() + 1e-12
    noiseless = privatize_([s.clone() for s in sums], noise_multiplier=0.0, sensitivity=delta,
                           expected_batch_size=qn, generator=torch.Generator().manual_seed(0), projection=projection)
    torch.testing.assert_close(torch.cat([noiseless[0].flatten(), noiseless[2].flatten()]),
                               basis @ (basis.T @ p_flat) / qn)
    torch.testing.assert_close(noiseless[1], sums[1] / qn)
    draws = 4000
    gen = torch.Generator().manual_seed(5)
    p_noise, r_noise = [], []
    for _ in range(draws):
        out = privatize_([torch.zeros_like(s) for s in sums], noise_multiplier=sigma, sensitivity=delta,
                         expected_batch_size=qn, generator=gen, projection=projection)
        p_noise.append(torch.cat([out[0].flatten(), out[2].flatten()]) * qn)
        r_noise.append(out[1] * qn)
    p, r = torch.stack(p_noise), torch.stack(r_noise)
    std = sigma * delta
    residual = p - p @ basis @ basis.T
    assert residual.abs().max() < 1e-5  # the noise lies in span(V)
    cov = p.T @ p / draws  # sigma^2 Delta^2 V V^T
    torch.testing.assert_close(cov, std**2 * basis @ basis.T, atol=5 * std**2 / math.sqrt(draws) * 3, rtol=0)
    assert (p**2).sum(1).mean() == pytest.approx(k * std**2, rel=0.05)  # k dimensions, not d_P
    assert r.var(0).mean() == pytest.approx(std**2, rel=0.05)


def _projected_audit(bug_scale: float = 1.0, seed: int = 0) -> dict:
    """One-run audit (Steinke et al. 2023) of the projected mechanism: m canaries on m of 2m coordinates, V a random
    orthonormal basis of a k = m + m/2 dimensional subspace that holds the canary coordinates (the worst case: no
    canary loses signal to the projection). bug_scale != 1 plants a bug: the subspace noise times bug_scale."""
    m, q, steps, sigma = 1000, 0.05, 80, 1.5  # tests/test_audit_one_run.py's setting: epsilon 1.70
    run = _make_run(rule="flat", sigma=sigma, sampling_rate=q, steps=steps, num_canaries=m, clip_norm=1.0,
                    delta=1e-5, accountant="rdp", seed=seed)
    gen = torch.Generator().manual_seed(seed)
    canaries = make_canaries(num_canaries=m, num_params=2 * m, norm=canary_norm(run.rule), generator=gen)
    others = torch.tensor(sorted(set(range(2 * m)) - set(canaries.coords.flatten().tolist())))[: m // 2]
    axes = torch.cat([canaries.coords.flatten(), others])
    embed = torch.zeros(2 * m, len(axes), dtype=torch.float64)
    embed[axes, torch.arange(len(axes))] = 1.0
    basis = embed @ random_basis(len(axes), len(axes), seed)
    run.projection = Projection(basis=basis, projected=(True,))
    original = proj_mod.add_projected_noise_
    step_mod.add_projected_noise_ = lambda s, p, *, std, generator: original(s, p, std=bug_scale * std,
                                                                              generator=generator)
    try:
        projections, scales, _ = train_with_canaries(run, canaries, steps=steps, rng=np.random.default_rng(seed))
    finally:
        step_mod.add_projected_noise_ = original
    signal = canaries.norm / run.plan.expected_batch_size
    scores = likelihood_scores(projections, scales, signal=signal, sampling_rate=q).numpy()
    result = audit_from_scores(scores, canaries.included.numpy(), delta=1e-5)
    return {**result, "epsilon": run.ledger.epsilon()}


def test_one_run_audit_of_the_projected_mechanism_stays_below_epsilon():
    result = _projected_audit()
    assert result["epsilon"] == pytest.approx(1.70, abs=0.01)
    assert result["epsilon_lower_bound"] < 0.6 * result["epsilon"]


def test_one_run_audit_catches_too_little_noise_in_the_subspace():
    result = _projected_audit(bug_scale=0.1)
    assert result["epsilon_lower_bound"] > 1.5 * result["epsilon"]
