"""Alignment output: CSV rows (one per step and rule; one per case), appending to CSV files, and summary.json.

The same columns serve training-time recording (source 'training', step = DP step) and nnUNetv2_dp_alignment
(source = checkpoint name, step = draw index), so one plotting function reads both.
"""
from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from nnunet_dp.alignment import BatchAlignment, psac_assumption, spearman

ALIGNMENT_CSV = "alignment.csv"
CASES_CSV = "alignment_cases.csv"
RULE_METRICS: tuple[str, ...] = ("bias_alignment", "private_alignment", "private_alignment_mc", "snr",
                                 "normalized_deviation", "sum_scales", "mean_effective_weight")
PSAC_METRICS: tuple[str, ...] = ("spearman_norm_cos", "small_decile_cos", "rest_cos", "decile_gap")
STEP_FIELDS: tuple[str, ...] = ("source", "step", "rule", "batch_size", "dim", "noise_multiplier", "sensitivity",
                                *RULE_METRICS, "median_norm", *PSAC_METRICS)
PRIVACY_NOTE = ("Alignment output is computed from unnoised per-case gradients of the training cases. It is not "
                "covered by epsilon: keep it private, as the training log (privacy.json lists it under assumptions).")


def case_fields(rule_names: Sequence[str]) -> tuple[str, ...]:
    return ("source", "step", "case", "norm", "cos_others", "cos_reference",
            *(f"scale_{r}" for r in rule_names), *(f"weight_{r}" for r in rule_names))


def step_rows(result: BatchAlignment, *, source: str, step: int,
              sensitivities: Mapping[str, float]) -> list[dict[str, Any]]:
    """One row per rule with the batch's step metrics and (repeated) PSAC numbers."""
    base = {"source": source, "step": step, "batch_size": result.batch_size, "dim": result.dim,
            "noise_multiplier": result.noise_multiplier, "median_norm": float(np.median(result.cases["norm"])),
            **result.psac}
    return [{**base, "rule": name, "sensitivity": sensitivities[name], **metrics}
            for name, metrics in result.rules.items()]


def case_rows(result: BatchAlignment, *, source: str, step: int,
              keys: Sequence[str] | None = None) -> list[dict[str, Any]]:
    keys = list(keys) if keys is not None else [str(i) for i in range(result.batch_size)]
    return [{"source": source, "step": step, "case": keys[i], **{k: float(v[i]) for k, v in result.cases.items()}}
            for i in range(result.batch_size)]


def append_csv(path: str, fields: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> None:
    """Append rows; the header is written when the file is new or empty. Unknown keys are an error."""
    new = not os.path.isfile(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        if new:
            writer.writeheader()
        writer.writerows(rows)


def read_csv(path: str) -> list[dict[str, Any]]:
    """Rows with numbers converted to float/int (empty and 'nan' cells become nan)."""
    with open(path, newline="") as f:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _number(v: str) -> Any:
    try:
        return int(v)
    except ValueError:
        try:
            return float(v) if v != "" else float("nan")
        except ValueError:
            return v


def _stats(values: Sequence[float]) -> dict[str, float]:
    arr = np.asarray([v for v in values if isinstance(v, (int, float)) and math.isfinite(v)], dtype=float)
    if arr.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "median": float("nan"), "n": 0}
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
            "median": float(np.median(arr)), "n": int(arr.size)}


def summarise(steps: Sequence[Mapping[str, Any]], cases: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per source (checkpoint): mean/std/median of every rule metric over steps, and PSAC's assumption pooled over
    all cases of that source (per-step Spearman values are also averaged)."""
    out: dict[str, Any] = {}
    for source in dict.fromkeys(r["source"] for r in steps):
        s_rows = [r for r in steps if r["source"] == source]
        c_rows = [r for r in cases if r["source"] == source]
        rules = list(dict.fromkeys(r["rule"] for r in s_rows))
        per_rule = {rule: {m: _stats([r[m] for r in s_rows if r["rule"] == rule]) for m in RULE_METRICS}
                    for rule in rules}
        first_rule = [r for r in s_rows if r["rule"] == rules[0]]
        norms, cos_others = [r["norm"] for r in c_rows], [r["cos_others"] for r in c_rows]
        pooled = psac_assumption(norms, cos_others)
        pooled["spearman_pvalue"] = spearman(norms, cos_others, y_unit=1.0, with_pvalue=True)[1]  # cosines: unit 1
        out[str(source)] = {
            "steps": len(first_rule),
            "cases": len(c_rows),
            "mean_batch_size": float(np.mean([r["batch_size"] for r in first_rule])),
            "rules": per_rule,
            "psac_assumption": {
                **pooled,
                "spearman_norm_cos_reference": spearman(norms, [r["cos_reference"] for r in c_rows], y_unit=1.0),
                "per_step_spearman_norm_cos": _stats([r["spearman_norm_cos"] for r in first_rule]),
                "holds": _verdict(pooled),
            },
            "norm": _stats(norms),
        }
    return out


def _verdict(pooled: Mapping[str, float]) -> str:
    """A plain-words reading of the pooled numbers (rank correlation at the 5% level, and the decile gap's sign)."""
    rho, p, gap = pooled["spearman_norm_cos"], pooled["spearman_pvalue"], pooled["decile_gap"]
    if not (math.isfinite(rho) and math.isfinite(gap)):
        return "undetermined (too few cases, or all norms or cosines tied)"
    if not p < 0.05:
        return f"not shown: no significant rank correlation (p = {p:.2g}); decile gap {gap:+.3f}"
    if rho > 0 and gap > 0:
        return "holds: smaller-norm cases are less aligned with the others"
    if rho < 0 and gap < 0:
        return "contradicted: smaller-norm cases are more aligned with the others"
    return f"mixed: rank correlation {rho:+.3f} and decile gap {gap:+.3f} disagree"


def format_summary(summary: Mapping[str, Any]) -> str:
    """The console table of nnUNetv2_dp_alignment: per source, the mean of each rule metric and PSAC's numbers."""
    lines = [(f"sigma = {summary['noise_multiplier']:.4g}, expected batch {summary['expected_batch_size']:.3g}, "
             f"g_bar = {summary['reference']} mean")]
    for label, res in summary["results"].items():
        lines += [f"[{label}] {res['steps']} batches, {res['cases']} cases",
                  f"  {'rule':6s} {'bias cos':>9s} {'private cos':>12s} {'snr':>9s} {'deviation':>10s}"]
        for rule, m in res["rules"].items():
            priv = m["private_alignment_mc"] if m["private_alignment_mc"]["n"] else m["private_alignment"]
            lines.append(f"  {rule:6s} {m['bias_alignment']['mean']:9.4f} {priv['mean']:12.4g} "
                         f"{m['snr']['mean']:9.3g} {m['normalized_deviation']['mean']:10.4f}")
        p = res["psac_assumption"]
        lines.append(f"  PSAC assumption: spearman(||g||, cos to others) = {p['spearman_norm_cos']:+.3f} "
                     f"(p = {p['spearman_pvalue']:.2g}); smallest-norm decile cos {p['small_decile_cos']:+.3f} vs "
                     f"rest {p['rest_cos']:+.3f} -> {p['holds']}")
    lines.append(PRIVACY_NOTE)
    return "\n".join(lines)
