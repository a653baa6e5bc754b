"""One markdown table per harness grid of the private-adaptation results: per (ε, lever) the mean test Dice ± sd over
the repeats without refinement and with DP-Morph (chosen privately, its ε added), the ratio to the non-private
adaptation of every parameter and to the non-private adaptation of the same subset where one was run, the gain over
the public model alone, the noise's dimensions d, s = N·ε/√(d·log(1/δ)) and the minutes per run.

    python benchmarks/lever_table.py OUT [--md FILE]

Reads OUT/results.csv (written by nnUNetv2_dp_experiment) and the runs' privacy.json; writes nothing else.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
from collections.abc import Sequence
from os.path import isfile, join

from nnunet_dp import law
from nnunet_dp.config import DPConfig

SUBSET = {"norm_bias": "nonprivate_norm_bias", "lora": "nonprivate_lora", "heads": "nonprivate_heads"}


def cells(out: str) -> list[dict]:
    """results.csv's cells (the 'mean ± sd' rows, or the single runs without repeats)."""
    with open(join(out, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    repeated = any(r.get("row") == "mean ± sd" for r in rows)
    return [r for r in rows if r.get("row") == ("mean ± sd" if repeated else "run") or
            (repeated and r.get("row") == "run")]


def number(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "", "–", "None") else None
    except ValueError:
        return None


def dimensions(out: str, run: str) -> int | None:
    """The noise's dimensions of a DP cell (its first repeat's privacy.json)."""
    for name in (run, f"{run}_s1"):
        path = join(out, "runs", name, "result.json")
        if isfile(path):
            with open(path) as f:
                folder = json.load(f).get("model_folder", "")
            privacy = join(folder, "fold_0", "privacy.json")
            if isfile(privacy):
                with open(privacy) as f:
                    return json.load(f)["noise"]["num_trained_parameters"]
    return None


def table(out: str) -> str:
    rows = cells(out)
    with open(join(out, "budget.json")) as f:
        n_cases = json.load(f)["num_training_cases"]
    by = {(r["run"], r["refinement"]): r for r in rows}
    reference = number(by.get(("nonprivate", "none"), {}).get("dice_mean"))
    public = number(by.get(("public_alone", "none"), {}).get("dice_mean"))
    lines = [("| ε | lever | d | s | test Dice | with DP-Morph (private, ε + 1) | ratio to non-private (all) | "
             "ratio to non-private (same subset) | minus public alone | min/run |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["refinement"] != "none" or r["rule"] in ("nonprivate", "public"):
            continue
        eps = number(r["target_epsilon"])
        d = dimensions(out, r["run"])
        s = law.signal_to_noise(num_cases=n_cases, epsilon=eps, dimensions=d, delta=DPConfig().delta) if d and eps \
            else None
        morph = by.get((r["run"], "adaptive"))
        lever = r.get("levers") or "defaults"
        subset = by.get((SUBSET.get(lever.split(" ")[0], ""), "none"))
        dice = number(r["dice_mean"])
        lines.append(
            f"| {eps:g} | {lever if lever != 'defaults' else 'all'} | {d or '–'} | {f'{s:.3g}' if s else '–'} | "
            f"{dice:.3f} ± {_sd(r)} ({r.get('n') or 1}) | "
            f"{_mean_sd(morph)} | {_ratio(dice, reference)} | {_ratio(dice, number(subset['dice_mean']) if subset else None)} | "
            f"{'–' if public is None else f'{dice - public:+.3f}'} | {number(r['run_minutes']):.1f} |")
    head = (f"non-private adaptation (every parameter): {reference:.3f}; public model alone: "
            f"{'–' if public is None else f'{public:.3f}'}; N = {n_cases}")
    refs = [f"{k}: {number(v['dice_mean']):.3f}" for (k, ref), v in by.items() if k.startswith("nonprivate_")
            and ref == "none"]
    return "\n".join([head + ("; " + ", ".join(refs) if refs else ""), "", *lines])


def _mean_sd(row: dict | None) -> str:
    if row is None:
        return "–"
    return f"{number(row['dice_mean']):.3f} ± {_sd(row)}"


def _sd(row: dict) -> str:
    sd = number(row.get("dice_mean_sd"))
    return "–" if sd is None else f"{sd:.3f}"


def _ratio(value: float | None, reference: float | None) -> str:
    return "–" if value is None or not reference else f"{value / reference:.2f}"


def plot(outs: Sequence[str], path: str) -> None:
    """Test Dice per lever (mean ± sd over the repeats, no refinement), one group of bars per grid (ε), with the
    public model alone and the non-private adaptation as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.2))
    width = 0.8 / max(len(outs), 1)
    levers: list[str] = []
    for k, out in enumerate(outs):
        rows = cells(out)
        by = {(r["run"], r["refinement"]): r for r in rows}
        dp = [r for r in rows if r["refinement"] == "none" and r["rule"] not in ("nonprivate", "public")]
        names = [r.get("levers") if r.get("levers") not in (None, "", "defaults") else "all" for r in dp]
        levers = levers or names
        xs = [levers.index(n) + (k - (len(outs) - 1) / 2) * width for n in names]
        eps = number(dp[0]["target_epsilon"]) if dp else None
        ax.bar(xs, [number(r["dice_mean"]) for r in dp], width, yerr=[number(r.get("dice_mean_sd")) or 0 for r in dp],
               capsize=3, label=f"DP ε = {eps:g}" if eps else os.path.basename(out))
        for key, style, label in ((("nonprivate", "none"), "--", "non-private"), (("public_alone", "none"), ":",
                                                                                   "public model alone")):
            value = number(by.get(key, {}).get("dice_mean"))
            if value is not None:
                ax.axhline(value, ls=style, color=f"C{k}", lw=1, label=f"{label} ({os.path.basename(out)})")
    ax.set_xticks(range(len(levers)), levers)
    ax.set_ylabel("test Dice (mean ± sd)")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="the harness's output folder")
    ap.add_argument("--md", default=None, help="write the table to this file too")
    ap.add_argument("--png", default=None, help="plot Dice per lever here")
    ap.add_argument("--also", nargs="+", default=[], help="more grids (e.g. other ε) drawn beside it in --png")
    args = ap.parse_args(argv)
    text = table(os.path.abspath(args.out))
    print(text)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text + "\n")
    if args.png:
        plot([os.path.abspath(o) for o in [args.out, *args.also]], args.png)


if __name__ == "__main__":
    main()
