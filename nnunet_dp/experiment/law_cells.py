"""The advisor's prediction beside each measured DP cell of a grid (results.csv `predicted_ratio_low`,
`predicted_ratio_high`; results.md `predicted ratio`): the utility-vs-N law (nnunet_dp.law) at the run's N, spent ε,
δ and noise dimensions, for its start (from scratch, or from a public model). Every grid thereby re-checks the law."""
from __future__ import annotations

from typing import Any

from nnunet_dp import law


def predicted_ratio(result: dict[str, Any], laws: dict[str, law.Law]) -> tuple[float | None, float | None]:
    """(low, high) for a DP run's result.json; (None, None) for other rows or without a calibrated law."""
    d = result.get("noise_dimensions") or result.get("num_trained_parameters")
    eps, n, delta = result.get("epsilon"), result.get("num_training_cases"), result.get("delta")
    if result.get("rule") in ("nonprivate", None) or not (d and eps and n and delta):
        return None, None
    fitted = laws.get("public" if result.get("pretrained") else "scratch")
    if fitted is None:
        return None, None
    return fitted.interval(law.signal_to_noise(num_cases=n, epsilon=eps, dimensions=int(d), delta=delta))


def prediction_label(row: dict[str, Any]) -> str:
    """results.md's column: '[0.40, 0.62]' or '–'."""
    low, high = row.get("predicted_ratio_low"), row.get("predicted_ratio_high")
    return "–" if low is None else f"[{low:.2f}, {high:.2f}]"
