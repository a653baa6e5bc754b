"""Alignment metrics: closed forms, scipy for Spearman, explicit vectors for the Gram-matrix algebra, Monte Carlo
against a hand-drawn noise sample, and per-case gradients against an independent micro-batch reference on a real
nnU-Net network."""
import itertools
import math
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from nets import batch, nnunet_loss, tiny_unet
from scipy import stats

from nnunet_dp.alignment import (
    RANK_TIE_RTOL,
    all_rules,
    analyse_batch,
    case_gradient_matrix,
    flatten_cases,
    private_alignment_mc,
    psac_assumption,
    spearman,
    tie_groups,
)
from nnunet_dp.alignment_report import STEP_FIELDS, read_csv, summarise
from nnunet_dp.nnunet.alignment_hook import maybe_record_alignment, should_record
from nnunet_dp.per_sample import case_gradient, trainable_parameters

RULES = all_rules(clip_norm=1.0, autos_gamma=0.01, nsgd_r=0.1, psac_r=0.1)


def cos(u, v):
    return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))


def explicit(G, scales, sigma, C, ref=None):
    """Every rule metric from explicit d-vectors (numpy float64): the independent reference for the Gram algebra."""
    G = np.asarray(G, dtype=np.float64)
    gbar = G.mean(0) if ref is None else np.asarray(ref, dtype=np.float64)
    a = scales @ G
    snr = np.linalg.norm(a) / (sigma * C * math.sqrt(G.shape[1]))
    return {"bias_alignment": cos(a, gbar), "snr": snr,
            "private_alignment": float(a @ gbar / np.linalg.norm(gbar)
                                       / math.sqrt(a @ a + (sigma * C) ** 2 * G.shape[1])),
            "normalized_deviation": float(np.linalg.norm(a / scales.sum() - gbar) / np.linalg.norm(gbar)),
            "sum_scales": float(scales.sum())}


def test_identical_gradients_align_perfectly():
    g = torch.tensor([0.3, -1.2, 2.0, 0.0, 0.7], dtype=torch.float64)
    res = analyse_batch(torch.stack([g, g, g]), RULES, noise_multiplier=1e-6)
    for name, m in res.rules.items():
        assert m["bias_alignment"] == pytest.approx(1.0, abs=1e-12), name
        assert m["private_alignment"] == pytest.approx(1.0, abs=1e-6), name
        assert m["normalized_deviation"] == pytest.approx(0.0, abs=1e-6), name
    np.testing.assert_allclose(res.cases["cos_others"], 1.0, atol=1e-12)
    np.testing.assert_allclose(res.cases["cos_reference"], 1.0, atol=1e-12)
    assert res.psac["spearman_norm_cos"] != res.psac["spearman_norm_cos"]  # nan: all norms equal
    assert all(math.isnan(v) for v in res.psac.values())  # no smallest-norm decile either


def ulps(x, n):
    """x moved by n units in the last place (n < 0: down)."""
    for _ in range(abs(n)):
        x = np.nextafter(x, np.inf if n > 0 else -np.inf)
    return float(x)


def test_rank_statistics_tie_values_equal_up_to_rounding():
    """Values a few ulps apart (as different BLAS summation orders give) are ties; a relative difference of 1e-6 is
    not. References: scipy.stats.spearmanr on hand-tied values, and the smallest-norm decile averaged over every order
    of the tied cases."""
    # the rounding seen on one machine for three identical gradients: one tie group on each side
    norms, cos_others = [2.453568829277059, 2.4535688292770597, 2.453568829277059], [0.9999999999999997, 1.0,
                                                                                      0.9999999999999997]
    assert np.ptp(tie_groups(norms)) == 0 and np.ptp(tie_groups(cos_others)) == 0
    assert math.isnan(spearman(norms, cos_others)) and all(math.isnan(v) for v in psac_assumption(
        norms, cos_others).values())
    flat = [ulps(0.7, n) for n in (-3, 0, 2, 5, -1)]
    assert math.isnan(spearman(flat, [1, 2, 3, 4, 5])) and math.isnan(spearman([5, 1, 4, 2, 3], flat))
    y = [0.3, -0.2, 0.9, 0.1, -0.5, 0.4]
    tied = [1.0, 2.0, 2.0, 4.0, 5.0, 6.0]
    for noisy in ([1.0, 2.0, ulps(2.0, 4), 4.0, 5.0, 6.0], [1.0, ulps(2.0, 3), ulps(2.0, -2), 4.0, 5.0, 6.0]):
        rho, p = spearman(noisy, y, with_pvalue=True)
        ref = stats.spearmanr(tied, y)
        assert (rho, p) == (pytest.approx(ref.statistic, abs=1e-12), pytest.approx(ref.pvalue, rel=1e-9))
        assert spearman(y, noisy) == pytest.approx(ref.statistic, abs=1e-12)
    apart = [1.0, 2.0, 2.0 * (1 + 1e-6), 4.0, 5.0, 6.0]  # genuinely different: ranked, not tied
    assert tie_groups(apart).tolist() == apart
    assert spearman(apart, y) == pytest.approx(stats.spearmanr(apart, y).statistic, abs=1e-12)
    assert spearman(apart, y) != pytest.approx(stats.spearmanr(tied, y).statistic, abs=1e-3)
    # the tolerance scales with the side's largest |value| (or its unit, 1 for cosines), not with each value:
    # cosines that are 0 up to rounding tie when anything else is in the data or unit = 1 says what their scale is
    assert np.ptp(tie_groups([1e-17, -2e-17, 0.0, ulps(0.0, 3)], unit=1.0)) == 0
    assert tie_groups([1e-17, -2e-17, 0.0, 0.5]).tolist() == [-2e-17, -2e-17, -2e-17, 0.5]
    assert tie_groups([1e-17, -2e-17, 0.0]).tolist() == [1e-17, -2e-17, 0.0]  # no unit: 2e-17 is the scale
    rounded_zero = [1e-17, -2e-17, 3e-17, 0.0]
    assert math.isnan(spearman([1, 2, 3, 4], rounded_zero, y_unit=1.0))
    assert math.isnan(psac_assumption([1, 2, 3, 4], rounded_zero)["spearman_norm_cos"])  # cos_others: unit 1


def test_tie_groups_rule_cuts_chains():
    """A group starts at its smallest value and holds what lies within tol = RANK_TIE_RTOL * max|v| of that start: a
    chain of values 0.6 tol apart is cut every tol, never merged end to end; the input order does not matter."""
    assert RANK_TIE_RTOL == 1e-9
    chain = [1 - 2.4e-9, 1 - 1.8e-9, 1 - 1.2e-9, 1 - 0.6e-9, 1.0]
    want = [1 - 2.4e-9, 1 - 2.4e-9, 1 - 1.2e-9, 1 - 1.2e-9, 1.0]
    assert tie_groups(chain).tolist() == want
    perm = [3, 0, 4, 2, 1]
    assert tie_groups(np.array(chain)[perm]).tolist() == [want[i] for i in perm]
    assert tie_groups([0.0, 0.0]).tolist() == [0.0, 0.0] and tie_groups([]).size == 0
    assert tie_groups([3.0, 1.0, 2.0], rtol=0.6).tolist() == [3.0, 1.0, 1.0]  # tol = 1.8: {1, 2} and {3}
    assert tie_groups([0.1, 0.2, 0.3], rtol=0.15, unit=1.0).tolist() == [0.1, 0.1, 0.3]  # tol = 0.15 from unit 1
    with pytest.raises(ValueError, match="finite"):
        tie_groups([1.0, float("nan")])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(3, 30), scale=st.floats(1e-6, 1e6))
def test_rank_statistics_ignore_last_bit_noise(seed, n, scale):
    """Norm- and cosine-like data with many exact ties, each value moved by up to 8 ulps: Spearman as scipy on the
    exact values, and the smallest-norm decile as the exact values' split averaged over every order of the cases tied
    at its boundary (each rotation of the tied cases puts each of them in the decile equally often)."""
    rng = np.random.default_rng(seed)
    x_exact, y_exact = rng.integers(1, 5, size=n) * scale, rng.integers(-3, 4, size=n) / 4
    x, y = (np.array([ulps(v, int(k)) for v, k in zip(a, rng.integers(-8, 9, size=n))]) for a in (x_exact, y_exact))
    if np.ptp(x_exact) and np.ptp(y_exact):
        ref = stats.spearmanr(x_exact, y_exact)
        assert spearman(x, y, y_unit=1.0, with_pvalue=True) == (pytest.approx(ref.statistic, abs=1e-12),
                                                                pytest.approx(ref.pvalue, rel=1e-9))
    else:
        assert math.isnan(spearman(x, y, y_unit=1.0))
    res = psac_assumption(x, y)
    if np.ptp(x_exact) == 0:
        assert all(math.isnan(v) for v in res.values())
        return
    k = math.ceil(0.1 * n)
    boundary = np.sort(x_exact)[k - 1]
    below = [i for i in range(n) if x_exact[i] < boundary]
    tied = [i for i in range(n) if x_exact[i] == boundary]
    small = np.mean([np.mean(y_exact[below + (tied[r:] + tied[:r])[:k - len(below)]]) for r in range(len(tied))])
    assert res["small_decile_cos"] == pytest.approx(small, abs=1e-12)
    assert res["rest_cos"] == pytest.approx((y_exact.sum() - k * small) / (n - k), abs=1e-12)
    assert res["spearman_norm_cos"] == pytest.approx(spearman(x_exact, y_exact), abs=1e-12, nan_ok=True)


def test_decile_ties_at_the_boundary_share_the_places():
    """20 cases, decile k = 2: one smallest norm and three tied (by rounding) for the second place: each tied case
    counts 1/3 in the decile and 2/3 in the rest, the mean over the 3! orders of the tied cases. Sums of at most 20
    cosines: any summation order is within 1e-12."""
    norms = np.array([5.0, 1.0, ulps(2.0, 1), 2.0, ulps(2.0, -2), *range(6, 21)])
    cos = np.linspace(-0.9, 0.9, 20)
    res = psac_assumption(norms, cos)
    splits = [np.mean(cos[[1, p[0]]]) for p in itertools.permutations([2, 3, 4])]
    assert res["small_decile_cos"] == pytest.approx(np.mean(splits), abs=1e-12)
    assert res["small_decile_cos"] == pytest.approx((cos[1] + cos[2:5].mean()) / 2, abs=1e-12)
    assert res["rest_cos"] == pytest.approx((cos.sum() - cos[1] - cos[2:5].mean()) / 18, abs=1e-12)
    assert psac_assumption(norms[::-1], cos[::-1]) == pytest.approx(res, abs=1e-12)  # input order does not matter


def test_cosines_of_parallel_vectors_stay_within_one():
    """A batch of one case: a = s g_1 is parallel to g_bar = g_1, and float64 rounding puts the quotient a few ulps
    above 1 for about a quarter of the norms; the reported cosines are clamped to [-1, 1] (within 1e-12 of 1)."""
    rng = np.random.default_rng(0)
    for seed in range(60):
        G = torch.from_numpy(rng.normal(size=(1, int(rng.integers(1, 500)))) * rng.uniform(0.01, 10)).float()
        res = analyse_batch(G, RULES, noise_multiplier=1e-9, mc_draws=1, generator=torch.Generator().manual_seed(seed))
        values = [m[k] for m in res.rules.values() for k in ("bias_alignment", "private_alignment",
                                                               "private_alignment_mc")]
        values += res.cases["cos_reference"].tolist()
        assert all(-1 <= v <= 1 and v == pytest.approx(1.0, abs=1e-12) for v in values), (seed, values)


def test_two_orthogonal_gradients_by_hand():
    """g1 = 3 e1, g2 = 0.5 e2 (d = 4), C = 1: each rule's aggregate a = (3 s1, 0.5 s2, 0, 0) and cosines by hand."""
    G = torch.tensor([[3.0, 0, 0, 0], [0, 0.5, 0, 0]], dtype=torch.float64)
    sigma = 2.0
    scales = {"flat": (1 / 3, 1.0), "autos": (1 / 3.01, 1 / 0.51), "nsgd": (1 / 3.1, 1 / 0.6),
              "psac": (1 / (3 + 0.1 / 3.1), 1 / (0.5 + 0.1 / 0.6))}
    res = analyse_batch(G, RULES, noise_multiplier=sigma)
    gbar_norm = math.sqrt(1.5 ** 2 + 0.25 ** 2)
    for name, (s1, s2) in scales.items():
        a1, a2 = 3 * s1, 0.5 * s2
        m = res.rules[name]
        assert m["bias_alignment"] == pytest.approx((1.5 * a1 + 0.25 * a2) / (math.hypot(a1, a2) * gbar_norm))
        assert m["snr"] == pytest.approx(math.hypot(a1, a2) / (sigma * 1.0 * 2.0))
        assert m["private_alignment"] == pytest.approx((1.5 * a1 + 0.25 * a2) / gbar_norm
                                                       / math.sqrt(a1 ** 2 + a2 ** 2 + sigma ** 2 * 4))
        dev = math.hypot(a1 / (s1 + s2) - 1.5, a2 / (s1 + s2) - 0.25) / gbar_norm
        assert m["normalized_deviation"] == pytest.approx(dev)
        np.testing.assert_allclose(res.cases[f"scale_{name}"], [s1, s2])
        np.testing.assert_allclose(res.cases[f"weight_{name}"], [3 * s1, 0.5 * s2])
        assert m["mean_effective_weight"] == pytest.approx((3 * s1 + 0.5 * s2) / 2)
    assert res.rules["flat"]["bias_alignment"] == pytest.approx((1.5 + 0.125) / (math.sqrt(1.25) * gbar_norm))
    np.testing.assert_allclose(res.cases["norm"], [3.0, 0.5])
    np.testing.assert_allclose(res.cases["cos_others"], [0.0, 0.0], atol=1e-15)
    np.testing.assert_allclose(res.cases["cos_reference"], [1.5 / gbar_norm, 0.25 / gbar_norm])


def test_small_norm_decile_on_constructed_set():
    norms = np.arange(1.0, 21.0)  # 20 cases: the decile is the 2 smallest norms
    cos_others = np.where(norms <= 2, -0.5, 0.8)
    res = psac_assumption(norms, cos_others)
    assert res["small_decile_cos"] == pytest.approx(-0.5) and res["rest_cos"] == pytest.approx(0.8)
    assert res["decile_gap"] == pytest.approx(1.3)
    assert res["spearman_norm_cos"] == pytest.approx(stats.spearmanr(norms, cos_others).statistic)
    # the reverse: small-norm cases best aligned contradicts PSAC
    rev = psac_assumption(norms, -cos_others)
    assert rev["decile_gap"] == pytest.approx(-1.3) and rev["spearman_norm_cos"] < 0
    # 9 cases: ceil(0.9) = 1 case in the decile; nan cosines (B = 1 batches) are dropped
    few = psac_assumption([5, 1, 3, float("nan"), 2, 4, 6, 7, 8, 9], [0.1, -1, 0.2, 0.3, 0.3, 0.4, 0.5, 0.6, 0.7, 0.9])
    assert few["small_decile_cos"] == pytest.approx(-1) and few["rest_cos"] == pytest.approx(np.mean(
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.9]))


def test_spearman_by_hand_and_against_scipy():
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(1 - 6 * 2 / (4 * 15))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=40), rng.normal(size=40)
    y[::3] = x[::3]
    x[5] = x[6]  # a tie
    rho, p = spearman(x, y, with_pvalue=True)
    ref = stats.spearmanr(x, y)
    assert rho == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue)
    assert math.isnan(spearman([1, 2], [2, 1])) and math.isnan(spearman([1, 1, 1], [1, 2, 3]))


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 6), d=st.integers(1, 40), seed=st.integers(0, 10_000), sigma=st.floats(0.1, 5),
       external=st.booleans())
def test_gram_metrics_equal_explicit_vectors(B, d, seed, sigma, external):
    rng = np.random.default_rng(seed)
    G = rng.normal(size=(B, d)) * rng.uniform(0.01, 10, size=(B, 1))
    ref = rng.normal(size=d) if external else None
    res = analyse_batch(torch.from_numpy(G), RULES, noise_multiplier=sigma,
                        reference=None if ref is None else torch.from_numpy(ref))
    gbar = G.mean(0) if ref is None else ref
    for name, m in res.rules.items():
        s = res.cases[f"scale_{name}"]
        want = explicit(G, s, sigma, 1.0, ref)
        if np.linalg.norm(s @ G) ** 2 <= 1e-12 * (s @ np.linalg.norm(G, axis=1)) ** 2:  # cancelled: no direction
            assert math.isnan(m["bias_alignment"]) and m["snr"] == 0
            continue
        for key, value in want.items():
            assert m[key] == pytest.approx(value, rel=1e-7, abs=1e-9), (name, key)
    for i in range(B):
        assert res.cases["norm"][i] == pytest.approx(np.linalg.norm(G[i]))
        assert res.cases["cos_reference"][i] == pytest.approx(cos(G[i], gbar), abs=1e-9)
        if B > 1:
            others = (G.sum(0) - G[i]) / (B - 1)
            assert res.cases["cos_others"][i] == pytest.approx(cos(G[i], others), abs=1e-9)
        else:
            assert math.isnan(res.cases["cos_others"][i])


def test_monte_carlo_matches_hand_drawn_noise_and_closed_form():
    rng = np.random.default_rng(1)
    G = torch.from_numpy(rng.normal(size=(4, 3000)) + 0.3)
    weights = torch.tensor([[1.0, 0.5, 2.0, 0.1], [0.3, 0.3, 0.3, 0.3]], dtype=torch.float64)
    from nnunet_dp.alignment import gram

    K = gram(G)
    gen = torch.Generator().manual_seed(7)
    one = private_alignment_mc(G, K, weights, noise_std=0.2, draws=1, generator=gen)
    z = torch.randn(3000, generator=torch.Generator().manual_seed(7), dtype=torch.float64).numpy() * 0.2
    Gn, gbar = G.numpy(), G.numpy().mean(0)
    for r in range(2):
        assert float(one[r]) == pytest.approx(cos(weights[r].numpy() @ Gn + z, gbar), rel=1e-10)
    # many draws: the stated closed-form approximation is within O(1/sqrt(d)) of the Monte Carlo mean
    res = analyse_batch(G, RULES, noise_multiplier=0.05, mc_draws=200, generator=torch.Generator().manual_seed(3))
    for name, m in res.rules.items():
        assert 0.05 < m["private_alignment"] < 0.999, name  # a regime where noise matters
        assert m["private_alignment_mc"] == pytest.approx(m["private_alignment"], abs=0.02), name
    with pytest.raises(ValueError, match="Generator"):
        analyse_batch(G, RULES, noise_multiplier=1.0, mc_draws=2)


def reference_rows(model, loss_fn, x, targets):
    """One .backward() per case, gradients read from .grad, concatenated in parameter order (micro-batch)."""
    rows = []
    for i in range(x.shape[0]):
        model.zero_grad(set_to_none=True)
        loss_fn(model(x[i:i + 1]), [t[i:i + 1] for t in targets]).backward()
        rows.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                               for p in model.parameters()]))
    model.zero_grad(set_to_none=True)
    return torch.stack(rows).numpy()


def test_metrics_on_nnunet_network_equal_microbatch_reference():
    model, loss_fn = tiny_unet(2).double(), nnunet_loss()
    x, targets = batch(2, 4, size=16, seed=2)
    G = case_gradient_matrix(model, loss_fn, x, targets, dtype=torch.float64)
    ref = reference_rows(model, loss_fn, x, targets)
    np.testing.assert_allclose(G.numpy(), ref, rtol=1e-6, atol=1e-10)
    params = trainable_parameters(model)
    per_param = [case_gradient(model, params, loss_fn, x[i:i + 1], [t[i:i + 1] for t in targets], torch.enable_grad)[0]
                 for i in range(4)]
    np.testing.assert_allclose(flatten_cases(per_param, torch.float64).numpy(), ref, rtol=1e-6, atol=1e-10)
    rules = all_rules(clip_norm=0.05)  # below the norms: flat clips, the rules differ
    res = analyse_batch(G, rules, noise_multiplier=1.3)
    norms = np.linalg.norm(ref, axis=1)
    assert (norms > 0.05).any()
    closed = {"flat": np.minimum(1, 0.05 / norms), "autos": 0.05 / (norms + 0.01), "nsgd": 0.05 / (norms + 0.1),
              "psac": 0.05 / (norms + 0.1 / (norms + 0.1))}
    for name, m in res.rules.items():
        want = explicit(ref, closed[name], 1.3, 0.05)
        for key, value in want.items():
            assert m[key] == pytest.approx(value, rel=1e-6), (name, key)
    others = [cos(ref[i], (ref.sum(0) - ref[i]) / 3) for i in range(4)]
    np.testing.assert_allclose(res.cases["cos_others"], others, rtol=1e-6)
    assert res.psac["spearman_norm_cos"] == pytest.approx(stats.spearmanr(norms, others).statistic)


def test_should_record_schedule():
    assert should_record(every=3, step=0, rank=0, batch_size=2, last_step=None)
    assert not should_record(every=3, step=4, rank=0, batch_size=2, last_step=None)
    assert should_record(every=3, step=6, rank=0, batch_size=2, last_step=3)
    assert not should_record(every=3, step=6, rank=0, batch_size=2, last_step=6)  # once per step
    assert not should_record(every=0, step=0, rank=0, batch_size=2, last_step=None)  # off by default
    assert not should_record(every=1, step=0, rank=1, batch_size=2, last_step=None)  # rank 0 only
    assert not should_record(every=1, step=0, rank=0, batch_size=0, last_step=None)  # empty batch


def test_hook_appends_rows_without_touching_grads(tmp_path):
    from nnunet_dp.config import DPConfig

    model = tiny_unet(2)
    loss_fn = nnunet_loss()
    cfg = DPConfig(alignment_every=2, clip_norm=0.5, seed=1)
    trainer = SimpleNamespace(dp_run=SimpleNamespace(steps=0, plan=SimpleNamespace(noise_multiplier=1.1)),
                              dp_config=cfg, local_rank=0, output_folder=str(tmp_path), loss=loss_fn,
                              _plain_network=lambda: model, _autocast=lambda: torch.enable_grad)
    x, t = batch(2, 3, dtype=torch.float32)
    for step in (0, 0, 1, 2):
        trainer.dp_run.steps = step
        maybe_record_alignment(trainer, x, t)
    maybe_record_alignment(trainer, None, None)  # empty batch: nothing
    assert all(p.grad is None for p in model.parameters())
    rows = read_csv(str(tmp_path / "alignment.csv"))
    assert (tmp_path / "alignment.csv").read_text().count("source,") == 1
    assert [r["step"] for r in rows] == [0] * 4 + [2] * 4 and list(rows[0]) == list(STEP_FIELDS)
    assert {r["rule"] for r in rows} == {"flat", "autos", "nsgd", "psac"}
    for r in rows:
        assert r["noise_multiplier"] == 1.1 and r["batch_size"] == 3 and r["sensitivity"] == 0.5
        assert -1 <= r["bias_alignment"] <= 1 and -1 <= r["private_alignment_mc"] <= 1 and r["snr"] > 0
    summary = summarise(rows, [])
    assert summary["training"]["steps"] == 2 and summary["training"]["rules"]["psac"]["bias_alignment"]["n"] == 2


def test_alignment_core_does_not_import_nnunetv2():
    code = ("import sys\nimport nnunet_dp.alignment, nnunet_dp.alignment_report, nnunet_dp.plots\n"
            "import nnunet_dp.nnunet.alignment_hook\n"
            "bad = [m for m in sys.modules if m.startswith(('nnunetv2', 'batchgenerators', 'dynamic_network'))]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)
