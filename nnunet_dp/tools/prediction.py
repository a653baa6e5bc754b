"""The advisor's prediction: what ratio to non-private Dice to expect at your N and ε, the N that would reach 0.5 and
0.8, and what each low-dimensional lever would change, from the measured utility-vs-N law (nnunet_dp.law).

Only what is known before training enters: N, ε, δ, the noise's dimensions d of each lever (counted on the network
the DP trainer builds) and whether a public model is given. The law was fitted on the cells of docs/results.md
("How many patients"); its interval covers 80 % of them. A lever's d is what the law sees; what the lever can learn at
all (its capacity) is not in the law, so a lever with a tiny d can be predicted above what it reaches (the heads
alone, say): the table says so.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from torch import nn

from nnunet_dp import law
from nnunet_dp.config import DPConfig

LORA_RANKS = (2, 8)
PROJECTION_DIMS = (16, 64)


def lever_dimensions(build: Callable[[], nn.Module], cfg: DPConfig, *, heads_projected: bool) -> list[dict[str, Any]]:
    """The noise's dimensions d of each lever on the network `build` makes (a fresh one per lever): trainable all,
    decoder, norm_bias, heads, lora at LORA_RANKS (and the settings' rank), projection at PROJECTION_DIMS (and the
    settings' k): k, plus the heads when the public model's labels differ (they are not projected)."""
    from nnunet_dp.nnunet.selection import add_lora_, select_trainable

    rows = []
    for mode in ("all", "decoder", "norm_bias", "heads"):
        rows.append({"lever": mode, "settings": {"trainable": mode}, "d": select_trainable(build(), mode).num_trained})
    for rank in sorted({*LORA_RANKS, cfg.lora_rank}):
        net = build()
        add_lora_(net, DPConfig(trainable="lora", lora_rank=rank))
        rows.append({"lever": f"lora r={rank}", "settings": {"trainable": "lora", "lora_rank": rank},
                     "d": select_trainable(net, "lora").num_trained})
    heads = select_trainable(build(), "heads").num_trained
    for k in sorted({*PROJECTION_DIMS, cfg.projection_dim}):
        rows.append({"lever": f"projection k={k}", "settings": {"projection": "public", "projection_dim": k},
                     "d": k + (0 if heads_projected else heads)})
    return rows


def _current_dimensions(levers: list[dict[str, Any]], cfg: DPConfig) -> int:
    if cfg.projection == "public":
        return next(r["d"] for r in levers if r["settings"].get("projection_dim") == cfg.projection_dim)
    if cfg.trainable == "lora":
        return next(r["d"] for r in levers if r["settings"].get("lora_rank") == cfg.lora_rank)
    return next(r["d"] for r in levers if r["lever"] == cfg.trainable)


def predict(*, levers: list[dict[str, Any]], cfg: DPConfig, num_cases: int, epsilon: float,
            pretrained: bool, laws: dict[str, law.Law] | None = None) -> dict[str, Any]:
    """The prediction for the settings `cfg` at this ε and N, and one row per lever (None fields without a law)."""
    laws = law.load() if laws is None else laws
    start = "public" if pretrained else "scratch"
    fitted = laws.get(start)
    d = _current_dimensions(levers, cfg)
    out: dict[str, Any] = {"start": start, "law": None if fitted is None else fitted.source,
                           "law_held_out": None if fitted is None else fitted.held_out or None, "noise_dimensions": d,
                           "epsilon": epsilon, "num_training_cases": num_cases}
    s = law.signal_to_noise(num_cases=num_cases, epsilon=epsilon, dimensions=d, delta=cfg.delta)
    out["s"] = s
    if fitted is None:
        return {**out, "predicted_ratio_low": None, "predicted_ratio_high": None, "cases_for_ratio_0.5": None,
                "cases_for_ratio_0.8": None, "levers": [], "best_lever": None}
    low, high = fitted.interval(s)
    rows = []
    for lever in levers:
        s_lever = law.signal_to_noise(num_cases=num_cases, epsilon=epsilon, dimensions=lever["d"], delta=cfg.delta)
        lo, hi = fitted.interval(s_lever)
        rows.append({**copy.deepcopy(lever), "s": s_lever, "predicted_ratio_low": lo, "predicted_ratio_high": hi})
    best = max(rows, key=lambda r: r["predicted_ratio_low"] + r["predicted_ratio_high"])
    return {**out, "predicted_ratio_low": low, "predicted_ratio_high": high,
            "cases_for_ratio_0.5": law.cases_for(fitted, 0.5, epsilon=epsilon, dimensions=d, delta=cfg.delta),
            "cases_for_ratio_0.8": law.cases_for(fitted, 0.8, epsilon=epsilon, dimensions=d, delta=cfg.delta),
            "levers": rows, "best_lever": best["lever"]}


def render_prediction(p: dict[str, Any]) -> list[str]:
    """The prediction as lines for the report."""
    head = f"Prediction at N = {p['num_training_cases']}, epsilon {p['epsilon']:g} ({p['start']}, d = " \
           f"{p['noise_dimensions']:,}, s = N*eps/sqrt(d*ln(1/delta)) = {p['s']:.3g}):"
    if p["predicted_ratio_low"] is None:
        if p["start"] == "public":
            return [head, ("  no calibrated law from a public model: there the ratio is set by how good the public "
                           "model already is on your labels, not by s (measured: a flat 0.90 with an in-distribution "
                           "public split, 0.04-0.55 under label shift; docs/results.md). Score the public model alone "
                           "on your validation cases first; the noise table applies")]
        return [head, "  no calibrated law for this start (run benchmarks/n_law.py fit); only the noise table applies"]
    n5, n8 = p["cases_for_ratio_0.5"], p["cases_for_ratio_0.8"]
    lines = [head,
             (f"  test Dice / non-private Dice expected in [{p['predicted_ratio_low']:.2f}, "
             f"{p['predicted_ratio_high']:.2f}] (the measured law, {p['law']}; 80 % of its cells fell inside; "
             "a prediction from past runs, not a guarantee)"),
             *([f"  on data it was not fitted on: {p['law_held_out']}"] if p.get("law_held_out") else []),
             (f"  N for a ratio of 0.5: {n5 if n5 is not None else 'not reached'}; of 0.8: "
             f"{n8 if n8 is not None else 'not reached'} (same epsilon, same trained parameters)"),
             ("  per lever (its d; the law does not know what a lever can learn at all: a tiny d, e.g. the heads "
             "alone, can be predicted above what it reaches):")]
    for r in p["levers"]:
        lines.append(f"    {r['lever']:<18} d = {r['d']:>9,}  s = {r['s']:>8.3g}  ratio in "
                     f"[{r['predicted_ratio_low']:.2f}, {r['predicted_ratio_high']:.2f}]")
    lines.append(f"  the lever that moves it most: {p['best_lever']}")
    return lines
