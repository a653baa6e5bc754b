"""One-run privacy audit (Steinke, Nasr, Jagielski, NeurIPS 2023): the estimator against independent references, the
canaries through the product's own private step, and audits that pass on correct mechanisms and fail on planted bugs.

Audit setting used below (numbers seen on CPU, seed 0, RDP, delta 1e-5): m = 1000 canaries, q = 0.05, 80 steps, sigma =
1.5 -> accountant epsilon 1.70. Correct mechanism ('per_step' score): epsilon_lower 0.13 for each rule (canaries reach
the sensitivity after each rule's scaling; with canaries of norm C, nsgd and psac gave 0.07). Planted bugs (flat): noise
std x0.1 -> 3.49; noise skipped on odd batch sizes -> 3.44. The final-update score alone ('final') sees the first bug
(3.44) but not the second (0.33).
"""
import ast
import contextlib
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import brentq
from scipy.stats import binom

import nnunet_dp.audit
import nnunet_dp.audit.canaries as canaries_mod
import nnunet_dp.run as run_mod
import nnunet_dp.step as step_mod
from nnunet_dp.audit import (
    audit_from_scores,
    default_candidates,
    epsilon_lower_bound,
    make_canaries,
    p_value,
    run_one_run_audit,
)
from nnunet_dp.audit.canaries import CANARY_FRACTION, _carrier_loss, _make_run, canary_norm
from nnunet_dp.errors import DPConfigError
from nnunet_dp.rules import autos_scale, flat_scale, make_rule, nsgd_scale, psac_scale

M, Q, STEPS, SIGMA, DELTA = 1000, 0.05, 80, 1.5, 1e-5
pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the")  # opacus RDP order-range notice


# ---------------------------------------------------------------- estimator

@pytest.mark.parametrize("r,noted", [(10, 1.05), (20, 1.82), (50, 2.78), (100, 3.49), (1000, 5.81)])
def test_all_correct_closed_form(r, noted):
    """delta = 0, v = r: beta = q^r, so the 95 % bound is log(p / (1 - p)) with p = 0.05^(1/r)."""
    p = 0.05 ** (1 / r)
    exact = math.log(p / (1 - p))
    got = epsilon_lower_bound(num_canaries=r, num_guesses=r, num_correct=r, delta=0.0)
    assert got == pytest.approx(exact, abs=1e-5)
    assert got == pytest.approx(noted, abs=0.006)


def _p_reference(m, r, v, eps, delta):
    """Theorem 3.1's p-value from binomial pmf sums (independent of the module's sf-based code)."""
    q = math.exp(eps) / (1 + math.exp(eps))
    pmf = binom.pmf(np.arange(r + 1), r, q)
    beta = pmf[v:].sum()
    below = np.cumsum(pmf[:v][::-1])  # below[i - 1] = P[v - i <= Bin < v]
    alpha = float(np.max(below / np.arange(1, v + 1), initial=0.0))
    return min(1.0, beta + alpha * delta * 2 * m)


@pytest.mark.parametrize("m,r,v,delta", [(1000, 100, 90, 1e-5), (1000, 400, 330, 1e-5), (200, 50, 44, 1e-3),
                                         (500, 20, 20, 0.0), (1000, 1000, 700, 1e-6)])
def test_bound_matches_brute_force_grid(m, r, v, delta):
    grid = np.arange(0.0, 8.0, 0.002)
    rejected = [e for e in grid if _p_reference(m, r, v, e, delta) < 0.05]
    reference = max(rejected, default=0.0)
    got = epsilon_lower_bound(num_canaries=m, num_guesses=r, num_correct=v, delta=delta)
    assert reference <= got < reference + 0.002 + 1e-6
    for eps in (0.0, 0.5, got, 3.0):
        assert p_value(num_canaries=m, num_guesses=r, num_correct=v, epsilon=eps, delta=delta) == pytest.approx(
            _p_reference(m, r, v, eps, delta), rel=1e-9, abs=1e-12)


def test_bound_grows_with_correct_guesses_and_shrinks_with_delta():
    bounds = [epsilon_lower_bound(num_canaries=1000, num_guesses=200, num_correct=v, delta=1e-5)
              for v in range(90, 201, 5)]
    assert all(a <= b for a, b in itertools.pairwise(bounds))
    assert bounds[0] == 0.0 and bounds[-1] > 4.0  # half right is no evidence; all right is strong evidence
    for v in (120, 160, 200):
        with_delta = epsilon_lower_bound(num_canaries=1000, num_guesses=200, num_correct=v, delta=1e-4)
        assert with_delta <= epsilon_lower_bound(num_canaries=1000, num_guesses=200, num_correct=v, delta=0.0)


def test_best_over_candidates_pays_bonferroni():
    scores = np.arange(100.0)
    included = scores >= 50  # perfectly separated
    one = audit_from_scores(scores, included, delta=0.0, candidates=[(50, 0)])
    assert one["epsilon_lower_bound"] == pytest.approx(
        epsilon_lower_bound(num_canaries=100, num_guesses=50, num_correct=50, delta=0.0))
    two = audit_from_scores(scores, included, delta=0.0, candidates=[(50, 0), (20, 20)])
    assert (two["num_guesses"], two["num_correct"], two["k_plus"], two["k_minus"]) == (50, 50, 50, 0)
    assert two["epsilon_lower_bound"] == pytest.approx(epsilon_lower_bound(
        num_canaries=100, num_guesses=50, num_correct=50, delta=0.0, confidence=0.975))
    assert two["epsilon_lower_bound"] < one["epsilon_lower_bound"]
    both = audit_from_scores(scores, included, delta=0.0, candidates=[(20, 20)])
    assert both["num_correct"] == 40  # "out" guesses on the 20 lowest count as correct too
    assert default_candidates(1000)[:3] == [(10, 0), (20, 0), (50, 0)] and (500, 500) in default_candidates(1000)


@pytest.mark.parametrize("call,key", [
    (lambda: epsilon_lower_bound(num_canaries=10, num_guesses=5, num_correct=6, delta=0.0), "num_correct"),
    (lambda: epsilon_lower_bound(num_canaries=10, num_guesses=11, num_correct=6, delta=0.0), "num_guesses"),
    (lambda: epsilon_lower_bound(num_canaries=0, num_guesses=0, num_correct=0, delta=0.0), "num_canaries"),
    (lambda: epsilon_lower_bound(num_canaries=10, num_guesses=5, num_correct=5, delta=1.5), "delta"),
    (lambda: epsilon_lower_bound(num_canaries=10, num_guesses=5, num_correct=5, delta=0.0, confidence=1.0),
     "confidence"),
    (lambda: p_value(num_canaries=10, num_guesses=5, num_correct=5, epsilon=-1.0, delta=0.0), "epsilon"),
    (lambda: audit_from_scores([1.0, float("nan")], [True, False], delta=0.0), "scores"),
    (lambda: audit_from_scores([1.0, 2.0], [1, 0], delta=0.0), "included"),
    (lambda: audit_from_scores([1.0, 2.0], [True, False], delta=0.0, candidates=[(2, 1)]), "candidates"),
    (lambda: run_one_run_audit(rule="clip", sampling_rate=0.1, steps=1, noise_multiplier=1.0), "rule"),
    (lambda: run_one_run_audit(rule="flat", sampling_rate=0.1, steps=1, noise_multiplier=1.0, target_epsilon=2.0),
     "noise_multiplier"),
    (lambda: run_one_run_audit(rule="flat", sampling_rate=1.5, steps=1, noise_multiplier=1.0), "sampling_rate"),
    (lambda: run_one_run_audit(rule="flat", sampling_rate=0.1, steps=1, noise_multiplier=1.0, score="max"), "score"),
    (lambda: run_one_run_audit(rule="flat", sampling_rate=0.1, steps=1, noise_multiplier=1.0, num_canaries=10,
                               num_params=5), "num_params"),
    (lambda: run_one_run_audit(rule="flat", sampling_rate="0.1", steps=1, noise_multiplier=1.0), "sampling_rate"),
    (lambda: run_one_run_audit(rule="flat", sampling_rate=0.1, steps=0, noise_multiplier=1.0), "steps"),
    (lambda: run_one_run_audit(rule="flat", sampling_rate=0.1, steps=1, noise_multiplier=1.0, confidence=95),
     "confidence"),
])
def test_bad_inputs_name_the_setting(call, key):
    with pytest.raises(DPConfigError, match=f"'{key}'") as info:
        call()
    assert info.value.key == key and "not allowed" in str(info.value)


# ---------------------------------------------------------------- canaries

def test_canaries_disjoint_fixed_norm_half_included_and_reproducible():
    def make(seed):
        return make_canaries(num_canaries=300, num_params=1000, norm=0.7, coords_per_canary=3,
                             generator=torch.Generator().manual_seed(seed))

    c = make(1)
    assert c.coords.unique().numel() == 900 and int(c.coords.max()) < 1000
    rows = c.gradients(torch.arange(300))
    torch.testing.assert_close(rows.norm(dim=1), torch.full((300,), 0.7, dtype=torch.float64))
    assert 110 < int(c.included.sum()) < 190
    assert torch.equal(make(1).coords, c.coords) and not torch.equal(make(2).coords, c.coords)


@pytest.mark.parametrize("rule", ["flat", "autos", "nsgd", "psac"])
def test_canary_cases_go_through_the_training_step(rule):
    """One DPRun.private_step without noise: .grad = sum of s(Delta) * canary / (qN), the rule's own scale."""
    run = _make_run(rule=rule, sigma=0.0, sampling_rate=0.5, steps=1, num_canaries=8, clip_norm=0.7, delta=1e-5,
                    accountant="rdp", seed=0)
    c = make_canaries(num_canaries=8, num_params=16, norm=0.7, generator=torch.Generator().manual_seed(0))
    model = torch.nn.Linear(16, 1, bias=False).double()
    idx = torch.tensor([1, 4, 6])
    run.private_step(model, _carrier_loss, c.gradients(idx), torch.zeros(3))
    scale = float(run.rule.scale(torch.tensor(0.7, dtype=torch.float64)))
    torch.testing.assert_close(model.weight.grad.flatten(), c.gradients(idx).sum(0) * scale / 4.0)
    assert run.steps == 1 and (rule == "flat") == (scale == 1.0)


def _scaled_norm(rule: str, norm: float, clip_norm: float, constant: float) -> float:
    """s(n) * n from the rule functions themselves (nnunet_dp.rules), in float64."""
    n = torch.tensor(norm, dtype=torch.float64)
    scale = {"flat": lambda: flat_scale(n, clip_norm=clip_norm),
             "autos": lambda: autos_scale(n, clip_norm=clip_norm, gamma=constant),
             "nsgd": lambda: nsgd_scale(n, clip_norm=clip_norm, r=constant),
             "psac": lambda: psac_scale(n, clip_norm=clip_norm, r=constant)}[rule]()
    return float(scale * n)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["flat", "autos", "nsgd", "psac"]), st.floats(1e-3, 1e3), st.floats(1e-4, 1e2),
       st.sampled_from([0.9, 0.999, 1 - 1e-6, CANARY_FRACTION]))
def test_canary_norm_reaches_the_sensitivity_under_each_rule(rule, clip_norm, constant, fraction):
    """The scaled canary norm s(n) * n (the rule functions' own) is >= 0.999 Delta at the default fraction, equals
    fraction * Delta (exactly Delta for flat), matches a numerical root of s(n) * n = f C (scipy brentq), and a larger
    norm reaches no less (s(n) * n increases with n, so 'at least the fraction' holds beyond n). Mathematically
    exact for flat (any n >= C)."""
    bound = make_rule(rule, clip_norm=clip_norm, autos_gamma=constant, nsgd_r=constant, psac_r=constant)
    n = canary_norm(bound, fraction=fraction)
    got = _scaled_norm(rule, n, clip_norm, constant)
    assert bound.sensitivity == clip_norm
    if rule == "flat":
        assert n == clip_norm and got == pytest.approx(clip_norm, rel=1e-15)  # 1 ulp: torch's C / n is C * (1 / n)
        return
    assert got == pytest.approx(fraction * clip_norm, rel=1e-9) and got <= clip_norm
    root = brentq(lambda x: _scaled_norm(rule, x, clip_norm, constant) - fraction * clip_norm, 1e-12, 1e15,
                  xtol=1e-14, rtol=1e-13, maxiter=500)
    assert n == pytest.approx(root, rel=1e-7)
    assert _scaled_norm(rule, 2 * n, clip_norm, constant) >= got
    assert _scaled_norm(rule, canary_norm(bound), clip_norm, constant) >= 0.999 * clip_norm


@pytest.mark.parametrize("rule,clip_norm,constant", [("flat", 1.0, None), ("autos", 1.0, None), ("nsgd", 1.0, None),
                                                     ("psac", 1.0, None), ("nsgd", 0.5, 0.3), ("psac", 2.0, 0.05),
                                                     ("autos", 0.3, 0.2), ("psac", 0.5, 1.0)])
def test_audit_canaries_reach_the_sensitivity_through_the_step(rule, clip_norm, constant, monkeypatch):
    """The audit's canaries, at the run's rule and constant (defaults: gamma 0.01, r 0.1), reach >= 0.999 Delta
    after the product's own scaling: one noiseless DPRun.private_step with one canary gives .grad of norm
    s(n) * n / qN. Before, canaries of norm C reached only C / (C + r) = 0.909 (NSGD) and 0.917 (PSAC) of Delta."""
    built = []

    def recording(**kwargs):
        built.append(make_canaries(**kwargs))
        return built[-1]

    monkeypatch.setattr(canaries_mod, "make_canaries", recording)
    result = _audit(rule, num_canaries=20, steps=2, clip_norm=clip_norm, rule_constant=constant)
    c = built[0]
    run = _make_run(rule=rule, sigma=0.0, sampling_rate=0.5, steps=1, num_canaries=2, clip_norm=clip_norm, delta=1e-5,
                    accountant="rdp", seed=0, rule_constant=constant)
    model = torch.nn.Linear(c.num_params, 1, bias=False).double()
    run.private_step(model, _carrier_loss, c.gradients(torch.tensor([0])), torch.zeros(1))
    through_step = float(model.weight.grad.norm()) * run.plan.expected_batch_size
    assert through_step >= 0.999 * clip_norm and through_step <= clip_norm * (1 + 1e-12)
    assert result["canary_norm"] == c.norm and result["sensitivity"] == clip_norm
    assert result["canary_scaled_norm"] == pytest.approx(through_step, rel=1e-12)


# ---------------------------------------------------------------- audits that pass, and audits that fail

def _audit(rule="flat", **kwargs):
    base = {"rule": rule, "sampling_rate": Q, "steps": STEPS, "num_canaries": M, "noise_multiplier": SIGMA,
            "delta": DELTA, "seed": 0}
    return run_one_run_audit(**{**base, **kwargs})


@pytest.mark.parametrize("rule", ["flat", "autos", "nsgd", "psac"])
def test_correct_mechanism_stays_below_epsilon(rule):
    result = _audit(rule)
    assert result["epsilon"] == pytest.approx(1.70, abs=0.01)
    assert result["epsilon_lower_bound"] < 0.5 * result["epsilon"]
    assert {"epsilon_lower_bound", "epsilon", "delta", "num_canaries", "num_guesses", "num_correct",
            "confidence"} <= set(result)
    assert result["num_canaries"] == M and result["confidence"] == 0.95 and result["delta"] == DELTA


@contextlib.contextmanager
def _noise_times_0_1(monkeypatch):
    """Planted bug: the Gaussian mechanism adds noise with 0.1 x the std it was asked for."""
    original = step_mod.add_gaussian_noise_
    monkeypatch.setattr(step_mod, "add_gaussian_noise_",
                        lambda tensors, *, std, generator: original(tensors, std=0.1 * std, generator=generator))
    yield


@contextlib.contextmanager
def _no_noise_on_odd_batches(monkeypatch):
    """Planted bug: steps whose batch holds an odd number of cases get no noise."""
    scaled_sum, privatize = run_mod.scaled_sum, run_mod.privatize_
    seen = {"rows": 0}

    def recording_scaled_sum(model, loss_fn, data, *args, **kwargs):
        seen["rows"] = 0 if data is None else int(data.shape[0])
        return scaled_sum(model, loss_fn, data, *args, **kwargs)

    def skipping_privatize(summed, *, noise_multiplier, **kwargs):
        return privatize(summed, noise_multiplier=0.0 if seen["rows"] % 2 else noise_multiplier, **kwargs)

    monkeypatch.setattr(run_mod, "scaled_sum", recording_scaled_sum)
    monkeypatch.setattr(run_mod, "privatize_", skipping_privatize)
    yield


@pytest.mark.parametrize("bug", [_noise_times_0_1, _no_noise_on_odd_batches])
def test_planted_bug_exceeds_claimed_epsilon(bug, monkeypatch):
    with bug(monkeypatch):
        result = _audit("flat")
    assert result["epsilon_lower_bound"] > 1.5 * result["epsilon"]


def test_final_update_score_and_target_epsilon():
    """sigma calibrated by the accountant from a target epsilon; the final-update score is a valid (weaker) audit."""
    result = _audit("psac", noise_multiplier=None, target_epsilon=2.0, num_canaries=200, steps=40, score="final")
    assert result["epsilon"] <= 2.0 and result["epsilon"] == pytest.approx(2.0, abs=0.1)
    assert 0.0 <= result["epsilon_lower_bound"] < result["epsilon"] and result["score"] == "final"


def test_audit_package_imports_only_the_core():
    """Static: nnunet_dp.audit imports no nnunetv2 and nothing from nnunet_dp.nnunet (the core modules it imports are
    kept free of nnunetv2 by test_import_layers)."""
    for path in Path(nnunet_dp.audit.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        bad = [n for n in names if n.split(".")[0] in ("nnunetv2", "batchgenerators", "dynamic_network_architectures")
               or n.startswith("nnunet_dp.nnunet")]
        assert not bad, (path.name, bad)
