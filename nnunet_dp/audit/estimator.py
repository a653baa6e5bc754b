"""The one-run lower bound on epsilon (Steinke, Nasr, Jagielski, NeurIPS 2023, Theorem 3.1 / Appendix D).

m canaries, each included independently with probability 1/2; the auditor makes r guesses ("in" or "out", abstaining
on the rest), v of them correct. Under (epsilon, delta)-DP the number of correct guesses is stochastically dominated
so that, with q = e^eps / (1 + e^eps):
    beta  = P[Bin(r, q) >= v]
    alpha = max_{i=1..v} P[v - i <= Bin(r, q) < v] / i
    p(eps) = min(1, beta + alpha * delta * 2m)
and every eps with p(eps) < 1 - confidence is rejected; the bound is the largest such eps (0 when none).
Checked against: the paper's Appendix D code as summarised in the project's one-run audit note, and
google-deepmind/jax_privacy jax_privacy/auditing.py `_one_run_p_value` / `_epsilon_one_run` (commit 03a095e):
beta = binom.sf(v - 1, r, q); alpha = max_i (binom.sf(v - i - 1, r, q) - beta) / i; p = min(beta + alpha*delta*2m, 1),
with m the number of canaries; the best over thresholds there is Bonferroni-corrected, as `audit_from_scores` here.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.special import expit
from scipy.stats import binom

from nnunet_dp.errors import DPConfigError

_SOURCE = "the one-run audit's arguments"
EPSILON_MAX = 100.0  # logistic(100) == 1.0 in float64: no larger epsilon can be told apart


def _check_int(key: str, value: Any, lo: int, hi: int | None = None) -> int:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= lo and (
        hi is None or value <= hi)
    if not ok:
        upper = "" if hi is None else f" and <= {hi}"
        raise DPConfigError(key, value, f"an integer >= {lo}{upper}", source=_SOURCE)
    return int(value)


def _check_delta_confidence(delta: Any, confidence: Any) -> None:
    if not isinstance(delta, (int, float)) or isinstance(delta, bool) or not 0 <= delta < 1:
        raise DPConfigError("delta", delta, "a number in [0, 1)", source=_SOURCE)
    if not isinstance(confidence, (int, float)) or isinstance(confidence, bool) or not 0 < confidence < 1:
        raise DPConfigError("confidence", confidence, "a number in (0, 1), e.g. 0.95", source=_SOURCE)


def _check_counts(num_canaries: Any, num_guesses: Any, num_correct: Any) -> tuple[int, int, int]:
    m = _check_int("num_canaries", num_canaries, 1)
    r = _check_int("num_guesses", num_guesses, 0, m)
    return m, r, _check_int("num_correct", num_correct, 0, r)


def _p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """p(eps) of the module docstring (unchecked inputs); the formula is written here once."""
    q = float(expit(epsilon))
    beta = float(binom.sf(v - 1, r, q))  # P[Bin(r, q) >= v]
    if delta == 0 or v == 0:
        return min(1.0, beta)
    i = np.arange(1, v + 1)
    alpha = float(np.max((binom.sf(v - i - 1, r, q) - beta) / i))  # P[v - i <= Bin < v] / i
    return min(1.0, beta + alpha * delta * 2 * m)


def p_value(*, num_canaries: int, num_guesses: int, num_correct: int, epsilon: float, delta: float) -> float:
    """Probability under an (epsilon, delta)-DP mechanism of at least `num_correct` correct guesses out of
    `num_guesses` (Steinke et al. 2023, Theorem 3.1)."""
    m, r, v = _check_counts(num_canaries, num_guesses, num_correct)
    _check_delta_confidence(delta, 0.5)
    if not isinstance(epsilon, (int, float)) or isinstance(epsilon, bool) or not epsilon >= 0:
        raise DPConfigError("epsilon", epsilon, "a number >= 0", source=_SOURCE)
    return _p_value(m, r, v, float(epsilon), float(delta))


def epsilon_lower_bound(*, num_canaries: int, num_guesses: int, num_correct: int, delta: float,
                        confidence: float = 0.95, tol: float = 1e-6) -> float:
    """Largest epsilon with p(epsilon) < 1 - confidence, by bisection (p grows with epsilon); 0.0 when even
    epsilon = 0 is not rejected. The returned value is the lower end of the final interval (conservative)."""
    m, r, v = _check_counts(num_canaries, num_guesses, num_correct)
    _check_delta_confidence(delta, confidence)
    significance = 1.0 - confidence
    if _p_value(m, r, v, 0.0, delta) >= significance:
        return 0.0
    lo, hi = 0.0, 1.0
    while hi < EPSILON_MAX and _p_value(m, r, v, hi, delta) < significance:
        lo, hi = hi, min(2 * hi, EPSILON_MAX)
    if _p_value(m, r, v, hi, delta) < significance:
        return hi
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _p_value(m, r, v, mid, delta) < significance else (lo, mid)
    return lo


def default_candidates(num_canaries: int) -> list[tuple[int, int]]:
    """(k+, k-) tried by default: one-sided "in" guesses k+ in 10, 20, 50, 100, ... and two-sided k+ = k- on the
    same grid (as the paper's experiments), all with k+ + k- <= m; [(m, 0)] below 10 canaries."""
    m = _check_int("num_canaries", num_canaries, 1)
    grid = [b * 10**e for e in range(1, 8) for b in (1, 2, 5) if b * 10**e <= m]
    one_sided = [(k, 0) for k in grid]
    return one_sided + [(k, k) for k in grid if 2 * k <= m] or [(m, 0)]


def _check_scores(scores: Any, included: Any) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    inc = np.asarray(included)
    if s.ndim != 1 or s.size == 0 or not np.all(np.isfinite(s)):
        raise DPConfigError("scores", f"array of shape {s.shape}", "a non-empty 1-D array of finite numbers",
                            source=_SOURCE)
    if inc.shape != s.shape or inc.dtype != np.bool_:
        raise DPConfigError("included", f"{inc.dtype} array of shape {inc.shape}",
                            f"a boolean array of the scores' shape {s.shape}", source=_SOURCE)
    return s, inc


def _check_candidates(candidates: Sequence[tuple[int, int]], m: int) -> list[tuple[int, int]]:
    pairs = list(candidates)
    bad = [c for c in pairs if not (isinstance(c, (tuple, list)) and len(c) == 2
                                    and all(isinstance(k, (int, np.integer)) and k >= 0 for k in c)
                                    and 0 < c[0] + c[1] <= m)]
    if not pairs or bad:
        raise DPConfigError("candidates", bad or pairs, f"a non-empty list of (k+, k-) integer pairs with "
                            f"0 < k+ + k- <= num_canaries = {m}", source=_SOURCE)
    return [(int(a), int(b)) for a, b in pairs]


def audit_from_scores(scores: Sequence[float] | np.ndarray, included: Sequence[bool] | np.ndarray, *, delta: float,
                      confidence: float = 0.95, candidates: Sequence[tuple[int, int]] | None = None) -> dict[str, Any]:
    """Guess "in" for the k+ highest scores and "out" for the k- lowest, for every candidate (k+, k-); return the best
    bound, each candidate tested at confidence 1 - (1 - confidence) / len(candidates) (Bonferroni), so the reported
    bound holds at `confidence` whichever candidate won."""
    s, inc = _check_scores(scores, included)
    _check_delta_confidence(delta, confidence)
    m = s.size
    pairs = _check_candidates(default_candidates(m) if candidates is None else candidates, m)
    per_candidate = 1.0 - (1.0 - confidence) / len(pairs)
    order = np.argsort(-s, kind="stable")  # highest first
    best: dict[str, Any] = {"epsilon_lower_bound": -1.0}
    for k_plus, k_minus in pairs:
        correct = int(inc[order[:k_plus]].sum()) + int((~inc[order[m - k_minus:]]).sum() if k_minus else 0)
        eps = epsilon_lower_bound(num_canaries=m, num_guesses=k_plus + k_minus, num_correct=correct, delta=delta,
                                  confidence=per_candidate)
        if eps > best["epsilon_lower_bound"]:
            best = {"epsilon_lower_bound": eps, "num_guesses": k_plus + k_minus, "num_correct": correct,
                    "k_plus": k_plus, "k_minus": k_minus}
    return {**best, "confidence": float(confidence), "delta": float(delta), "num_canaries": m,
            "num_candidates": len(pairs)}
