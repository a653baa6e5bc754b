"""nnUNetv2_dp_experiment, the numbers over repeats and settings: mean ± sd per cell (rule, ε, lr, levers) and
refinement over its --seeds repeats, the ratio to the non-private reference, the setting chosen on validation, and the
headline table.

sd is the sample standard deviation (numpy's ddof=1) over the repeats that finished; None with one repeat. Failed
repeats are left out of the mean and counted (`n_failed`).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from nnunet_dp.tools.morph_selection import NOT_PRIVATE

# choice of the results rows (--lrs, levers): choosing among settings on the validation cases is itself not private
CHOSEN = "chosen on validation (not private: tuning on the private cases leaks, Papernot & Steinke 2022)"
DEFAULT = "default rule"
DEFAULT_LEVERS = "defaults"
PUBLIC = "public"  # the rule of the public model alone (public_alone.py): no private training, no DP


def is_dp(row: dict[str, Any]) -> bool:
    """A DP run's row (not the non-private reference, not the public model alone)."""
    return row["rule"] not in ("nonprivate", PUBLIC)


def mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample sd (ddof=1) of the finite values; (None, None) without any, sd None with one."""
    finite = [float(v) for v in values if v is not None and np.isfinite(v)]
    if not finite:
        return None, None
    return float(np.mean(finite)), (float(np.std(finite, ddof=1)) if len(finite) > 1 else None)


def is_reference(row: dict[str, Any]) -> bool:
    """The ordinary non-private reference (all parameters trained), the one ratios divide by; a reference that trains
    a subset (--reference-trainable, levers e.g. 'norm_bias') is a row of its own."""
    return row["rule"] == "nonprivate" and row.get("levers", "n/a") in ("n/a", DEFAULT_LEVERS)


def reference_dice(table: list[dict[str, Any]]) -> dict[str, float]:
    """Per refinement: the ordinary non-private reference's mean test Dice over its finished repeats."""
    out: dict[str, float] = {}
    ok = [r for r in table if is_reference(r) and r["status"] == "ok"]
    for refine in dict.fromkeys(r["refinement"] for r in ok):
        mean, _ = mean_sd([r["dice_mean"] for r in ok if r["refinement"] == refine])
        if mean is not None:
            out[refine] = mean
    return out


def ratio(dice: float | None, refine: str, reference: dict[str, float]) -> float | None:
    ref = reference.get(refine)
    return dice / ref if dice is not None and ref is not None and ref > 0 else None


def _mean_row(cell: str, group: list[dict[str, Any]], n_failed: int, reference: dict[str, float]) -> dict[str, Any]:
    first = group[0]
    dice_keys = [k for k in dict.fromkeys(k for r in group for k in r) if k.startswith("dice_")]
    means = {k: mean_sd([r.get(k) for r in group]) for k in dice_keys}
    val, val_sd = mean_sd([r["validation_dice"] for r in group])
    status = "ok" if not n_failed else f"ok ({n_failed} of {len(group) + n_failed} repeats FAILED)"
    eps = [r["epsilon"] for r in group if r["epsilon"] is not None]
    totals = [r.get("epsilon_total") for r in group]  # one repeat that no ε covers: the cell is not covered
    selection = {r.get("selection") for r in group}
    return {**first, "run": cell, "repeat": None, "epsilon": max(eps) if eps else None,
            "epsilon_total": None if None in totals else max(totals),
            "selection": NOT_PRIVATE if NOT_PRIVATE in selection else first.get("selection"),
            **{k: m for k, (m, _) in means.items()}, "dice_mean_sd": means["dice_mean"][1],
            "ratio_to_nonprivate": ratio(means["dice_mean"][0], first["refinement"], reference),
            "validation_dice": val, "validation_dice_sd": val_sd, "n": len(group), "n_failed": n_failed,
            "train_minutes": mean_sd([r["train_minutes"] for r in group])[0],
            "run_minutes": mean_sd([r["run_minutes"] for r in group])[0], "status": status}


def aggregate(table: list[dict[str, Any]], reference: dict[str, float]) -> list[dict[str, Any]]:
    """One row per (cell, refinement) in first-seen order: mean over the finished repeats of every Dice, validation
    Dice and time column, `dice_mean_sd`, `validation_dice_sd`, `n`, `n_failed`; ε and epsilon_total the largest spent
    (epsilon_total None if a repeat's is), `selection` not private if a repeat's is. A cell whose
    repeats all failed keeps its (first) failed row."""
    ok: dict[tuple[str, str], list[dict[str, Any]]] = {}
    failures: dict[str, list[dict[str, Any]]] = {}
    for row in table:
        if row["status"] == "ok":
            ok.setdefault((row["cell"], row["refinement"]), []).append(row)
        else:
            failures.setdefault(row["cell"], []).append(row)
    out, seen = [], set()
    for row in table:
        cell = row["cell"]
        if row["status"] == "ok" and (cell, row["refinement"]) not in seen:
            seen.add((cell, row["refinement"]))
            out.append(_mean_row(cell, ok[(cell, row["refinement"])], len(failures.get(cell, [])), reference))
        elif row["status"] != "ok" and cell not in seen and not any(c == cell for c, _ in ok):
            seen.add(cell)
            out.append({**row, "run": cell, "repeat": None, "n": 0, "n_failed": len(failures[cell]),
                        "dice_mean_sd": None, "validation_dice_sd": None})
    return out


def is_default(row: dict[str, Any]) -> bool:
    """The DP trainers' defaults: the default lr rule and no lever changed."""
    return row["lr_source"] == DEFAULT and row.get("levers", DEFAULT_LEVERS) == DEFAULT_LEVERS


def mark_choice(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of the rows with `choice`: per (rule, target_epsilon, refinement) of the DP rows with several settings
    (lr × levers), CHOSEN on the row with the best (mean) validation Dice (the first of equals; rows without a finite
    one never win) and DEFAULT on the defaults' row unless it is the chosen one; '' elsewhere. Validation Dice only,
    never test."""
    out = [{**row, "choice": ""} for row in table]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in out:
        if is_dp(row):
            groups.setdefault((row["rule"], row["target_epsilon"], row["refinement"]), []).append(row)
    for group in groups.values():
        if len(group) < 2:  # one setting per group and refinement: nothing was chosen
            continue
        for row in group:
            if is_default(row):
                row["choice"] = DEFAULT
        scored = [row for row in group if row["validation_dice"] is not None and np.isfinite(row["validation_dice"])]
        if scored:
            max(scored, key=lambda row: row["validation_dice"])["choice"] = CHOSEN
    return out


def with_sd(mean: float | None, sd: float | None) -> float | str | None:
    """'0.4000 ± 0.0100' with an sd, else the mean itself."""
    return mean if sd is None or mean is None else f"{mean:.4f} ± {sd:.4f}"


def headline_table(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per ε and DP rule, without refinement: test Dice (mean ± sd) and ratio of the DP defaults (or, where the grid
    has no run with them, of its only setting) and of the setting chosen on validation."""
    dp = [row for row in cells if is_dp(row) and row["refinement"] == "none"
          and row["dice_mean"] is not None]
    levers = any(row.get("levers", DEFAULT_LEVERS) != DEFAULT_LEVERS for row in dp)
    repeated = any(row.get("n", 1) > 1 for row in dp)
    out = []
    for eps in sorted({row["target_epsilon"] for row in dp}):
        for rule in dict.fromkeys(row["rule"] for row in dp):
            group = [row for row in dp if row["rule"] == rule and row["target_epsilon"] == eps]
            first = next((row for row in group if is_default(row)), group[0] if len(group) == 1 else None)
            chosen = next((row for row in group if row["choice"] == CHOSEN), None)
            if first is None and chosen is None:
                continue
            line: dict[str, Any] = {"target ε": f"{eps:g}", "rule": rule, "lr": first and first["lr"]}
            line.update({"levers": first and first.get("levers")} if levers else {})
            line.update({"Dice": first and with_sd(first["dice_mean"], first.get("dice_mean_sd")),
                         "ratio": first and first["ratio_to_nonprivate"]})
            line.update({"n": first and first.get("n")} if repeated else {})
            line["lr (chosen on validation)"] = chosen and chosen["lr"]
            line.update({"levers (chosen on validation)": chosen and chosen.get("levers")} if levers else {})
            line.update({"Dice (chosen)": chosen and with_sd(chosen["dice_mean"], chosen.get("dice_mean_sd")),
                         "ratio (chosen)": chosen and chosen["ratio_to_nonprivate"]})
            out.append(line)
    return out
