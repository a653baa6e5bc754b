"""The utility-vs-N law and the advisor's prediction from it.

Over a run the DP signal to noise is about s = N·ε / sqrt(d·log(1/δ)) (N training cases, d noised dimensions; the
split of the steps into batches cancels: docs/results.md). At a fixed task the ratio of DP test Dice to non-private
test Dice (same N, same budget) is then a function of s. We fit it, per start (from scratch, from a public model), as a
logistic curve in log s,

    ratio(s) = floor + (1 - floor) / (1 + exp(-slope * (ln s - midpoint)))

and give an interval of +- half_width around it: the 80th percentile of the absolute residuals of the cells it was
fitted on, so that about 80 % of those cells fall inside. The calibration (law_calibration.json beside this module) is
written by `python benchmarks/n_law.py fit` from measured cells only (synthetic and Hippocampus, docs/results.md); it
is a prediction from past measurements, not a guarantee.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

CALIBRATION_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "law_calibration.json")
COVERAGE = 0.8  # the share of fitted cells inside the interval


@dataclass(frozen=True)
class Law:
    """One fitted curve: ratio(s) as in the module docstring, with its interval and provenance."""

    start: str  # "scratch" or "public"
    slope: float
    midpoint: float  # ln s at which the DP run is halfway from floor to the non-private reference
    floor: float  # the ratio at s -> 0 (0 from scratch; the public model's share when fine-tuning)
    half_width: float
    num_cells: int
    source: str
    held_out: str = ""  # what the check on data it was not fitted on found (benchmarks/n_law.py fit --check)

    def mean(self, s: float) -> float:
        z = -self.slope * (math.log(max(s, 1e-300)) - self.midpoint)
        return self.floor + (1 - self.floor) / (1 + math.exp(min(z, 700.0)))

    def interval(self, s: float) -> tuple[float, float]:
        m = self.mean(s)
        return max(0.0, m - self.half_width), min(1.0, m + self.half_width)

    def s_for(self, ratio: float) -> float | None:
        """The s at which the curve reaches `ratio` (None: never, e.g. below the floor or at 1)."""
        x = (ratio - self.floor) / (1 - self.floor)
        if not 0 < x < 1:
            return None
        return math.exp(self.midpoint - math.log(1 / x - 1) / self.slope)


def signal_to_noise(*, num_cases: float, epsilon: float, dimensions: int, delta: float) -> float:
    """s = N·ε / sqrt(d·log(1/δ))."""
    if num_cases <= 0 or epsilon <= 0 or dimensions < 1 or not 0 < delta < 1:
        raise ValueError(f"signal_to_noise needs N > 0, epsilon > 0, d >= 1, 0 < delta < 1; got N={num_cases}, "
                         f"epsilon={epsilon}, d={dimensions}, delta={delta}")
    return num_cases * epsilon / math.sqrt(dimensions * math.log(1 / delta))


def cases_for(law: Law, ratio: float, *, epsilon: float, dimensions: int, delta: float) -> int | None:
    """The N at which the law predicts `ratio` (its central curve), at this ε, d and δ."""
    s = law.s_for(ratio)
    return None if s is None else math.ceil(s * math.sqrt(dimensions * math.log(1 / delta)) / epsilon)


def fit(points: Sequence[tuple[float, float]], *, start: str, source: str, floor: float = 0.0) -> Law:
    """Least-squares fit of slope and midpoint to (s, ratio) points (ratios clipped to [0, 1]); the interval's half
    width covers COVERAGE of them."""
    import numpy as np
    from scipy.optimize import curve_fit

    s = np.array([p[0] for p in points], dtype=float)
    r = np.clip(np.array([p[1] for p in points], dtype=float), 0.0, 1.0)
    if len(s) < 3:
        raise ValueError(f"fit needs at least 3 cells, got {len(s)}")

    def curve(log_s: np.ndarray, slope: float, midpoint: float) -> np.ndarray:
        return floor + (1 - floor) / (1 + np.exp(-slope * (log_s - midpoint)))

    (slope, midpoint), _ = curve_fit(curve, np.log(s), r, p0=(2.0, float(np.median(np.log(s)))), maxfev=20000)
    residuals = np.abs(r - curve(np.log(s), slope, midpoint))
    half = float(np.quantile(residuals, COVERAGE))
    return Law(start, float(slope), float(midpoint), float(floor), half, len(s), source)


def save(laws: Sequence[Law], path: str = CALIBRATION_FILE) -> None:
    with open(path, "w") as f:
        json.dump({"laws": [asdict(law) for law in laws]}, f, indent=1)


def load(path: str = CALIBRATION_FILE) -> dict[str, Law]:
    """The calibrated laws by start ({} when none has been fitted)."""
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        data: dict[str, Any] = json.load(f)
    return {entry["start"]: Law(**entry) for entry in data.get("laws", [])}
