"""Private selection by the exponential mechanism (McSherry & Talwar, FOCS 2007).

P(choose i) = exp(eps * u_i / (2 * du)) / sum_j exp(eps * u_j / (2 * du)) is eps-differentially private when
changing one private record changes every utility by at most du. DP-Morph uses u = mean Dice over the n validation
cases, each case's Dice in [0, 1], so du = 1/n for neighbouring datasets that replace one case (n public).

The draw is private only while its randomness is secret (invariant 8): without a seed the generator takes fresh OS
entropy and nothing of it (seed, entropy, generator state) is written anywhere. A seed makes the draw reproducible and
therefore not private: whoever knows it recomputes the choice as a deterministic function of the utilities.
"""
from __future__ import annotations

import numpy as np
from nnunet_dp.postprocessing.errors import DPMorphError


def _check_positive(setting: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not (
            np.isfinite(value) and value > 0):
        raise DPMorphError(setting, value, "a finite number > 0")
    return float(value)


def check_seed(seed: int | None) -> None:
    """A seed is None (fresh OS entropy, private) or an integer >= 0 (reproducible, not private)."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise DPMorphError("seed", seed, "an integer >= 0, or None (default: fresh OS entropy, private)")


def selection_generator(seed: int | None = None) -> np.random.Generator:
    """The exponential mechanism's generator: fresh OS entropy when seed is None (np.random.default_rng(None)).

    The caller never gets the entropy back to record: a private selection keeps no seed (invariant 8).
    """
    check_seed(seed)
    return np.random.default_rng(seed)


def selection_probabilities(utilities: np.ndarray, *, epsilon: float, sensitivity: float) -> np.ndarray:
    """The exponential mechanism's distribution over candidates (numerically stable; exact one-hot in the limit)."""
    u = np.asarray(utilities, dtype=np.float64)
    if u.ndim != 1 or u.size == 0 or not np.all(np.isfinite(u)):
        raise DPMorphError("utilities", u.tolist(), "a non-empty 1D array of finite numbers")
    scale = _check_positive("epsilon_select", epsilon) / (2.0 * _check_positive("sensitivity", sensitivity))
    weights = np.exp((u - u.max()) * scale)  # shifting by max(u) leaves the distribution unchanged
    return weights / weights.sum()


def exponential_mechanism(utilities: np.ndarray, *, epsilon: float, sensitivity: float,
                          rng: np.random.Generator) -> int:
    """Index drawn with probability proportional to exp(epsilon * u / (2 * sensitivity)), from an explicit rng."""
    if not isinstance(rng, np.random.Generator):
        raise DPMorphError("rng", rng, "a numpy.random.Generator (from selection_generator)")
    p = selection_probabilities(utilities, epsilon=epsilon, sensitivity=sensitivity)
    return int(rng.choice(p.size, p=p))
