"""Exponential mechanism: argmax in the limit, frequencies exp(eps*u/(2du)) by a chi-square goodness-of-fit test."""
from __future__ import annotations

import numpy as np
import pytest
from nnunet_dp.postprocessing.privacy import exponential_mechanism, selection_probabilities
from scipy import stats

from nnunet_dp.errors import DPError

UTILITIES = np.array([0.30, 0.50, 0.55, 0.80])


def closed_form(u: np.ndarray, epsilon: float, sensitivity: float) -> np.ndarray:
    weights = np.array([np.exp(epsilon * x / (2 * sensitivity)) for x in u])
    return weights / weights.sum()


def draw_counts(epsilon: float, sensitivity: float, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picks = [exponential_mechanism(UTILITIES, epsilon=epsilon, sensitivity=sensitivity, rng=rng) for _ in range(n)]
    return np.bincount(picks, minlength=UTILITIES.size)


def test_huge_epsilon_picks_the_argmax():
    rng = np.random.default_rng(1)
    picks = {exponential_mechanism(UTILITIES, epsilon=1e12, sensitivity=0.25, rng=rng) for _ in range(200)}
    assert picks == {int(np.argmax(UTILITIES))}


def test_probabilities_equal_the_closed_form():
    assert np.allclose(selection_probabilities(UTILITIES, epsilon=3.0, sensitivity=0.25),
                       closed_form(UTILITIES, 3.0, 0.25), rtol=1e-12)
    assert np.allclose(selection_probabilities(UTILITIES + 7.0, epsilon=3.0, sensitivity=0.25),
                       closed_form(UTILITIES, 3.0, 0.25), rtol=1e-12)


def test_frequencies_follow_exp_eps_u_over_two_delta():
    epsilon, sensitivity, n = 3.0, 0.25, 20000  # probabilities ~ 0.11, 0.22, 0.25, 0.41
    counts = draw_counts(epsilon, sensitivity, n, seed=12345)
    right = stats.chisquare(counts, n * closed_form(UTILITIES, epsilon, sensitivity))
    assert right.pvalue > 1e-3
    # the same test rejects the usual mistake (no factor 2), so it has the power to catch it
    wrong = stats.chisquare(counts, n * closed_form(UTILITIES, 2 * epsilon, sensitivity))
    assert wrong.pvalue < 1e-6


def test_the_draw_depends_only_on_the_generator():
    a = draw_counts(2.0, 0.5, 50, seed=7)
    b = draw_counts(2.0, 0.5, 50, seed=7)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("kwargs, setting", [
    ({"epsilon": 0.0, "sensitivity": 0.1}, "epsilon_select"),
    ({"epsilon": -1.0, "sensitivity": 0.1}, "epsilon_select"),
    ({"epsilon": float("nan"), "sensitivity": 0.1}, "epsilon_select"),
    ({"epsilon": float("inf"), "sensitivity": 0.1}, "epsilon_select"),
    ({"epsilon": 1.0, "sensitivity": 0.0}, "sensitivity"),
])
def test_bad_parameters_are_rejected(kwargs, setting):
    with pytest.raises(DPError, match=setting):
        exponential_mechanism(UTILITIES, rng=np.random.default_rng(0), **kwargs)


def test_bad_utilities_and_rng_are_rejected():
    with pytest.raises(DPError, match="utilities"):
        selection_probabilities(np.array([]), epsilon=1.0, sensitivity=1.0)
    with pytest.raises(DPError, match="utilities"):
        selection_probabilities(np.array([0.1, np.nan]), epsilon=1.0, sensitivity=1.0)
    with pytest.raises(DPError, match="rng"):
        exponential_mechanism(UTILITIES, epsilon=1.0, sensitivity=1.0, rng=np.random.RandomState(0))
