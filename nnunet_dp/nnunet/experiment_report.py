"""nnUNetv2_dp_experiment, the report: results.csv, results.md and PNG plots from the runs' result.json files."""
from __future__ import annotations

import csv
import os
from os.path import join
from typing import Any

import numpy as np


def rows(results: list[dict[str, Any]], budget_steps: int) -> list[dict[str, Any]]:
    """One row per run and refinement; ratio = mean Dice / the non-private run's mean Dice with the same refinement."""
    base = next((r for r in results if r["rule"] == "nonprivate"), None)
    out = []
    for r in results:
        for refine, s in r["scores"].items():
            ref = base["scores"].get(refine) if base else None
            ratio = s["dice_mean"] / ref["dice_mean"] if ref and ref["dice_mean"] > 0 else None
            row = {"run": r["run"], "rule": r["rule"], "target_epsilon": r["target_epsilon"],
                   "epsilon": r["epsilon"], "sigma": r["noise_multiplier"],
                   "steps": r["steps"] if r["steps"] is not None else budget_steps, "lr": r["initial_lr"],
                   "refinement": refine, **{f"dice_{k}": v for k, v in s["dice"].items()},
                   "dice_mean": s["dice_mean"], "ratio_to_nonprivate": ratio,
                   "train_minutes": r["train_seconds"] / 60, "run_minutes": r["seconds"] / 60}
            out.append(row)
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def write_csv(table: list[dict[str, Any]], path: str) -> None:
    keys = list(dict.fromkeys(k for row in table for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(table)


def markdown_table(table: list[dict[str, Any]], keys: list[str]) -> str:
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(row.get(k)) for k in keys) + " |" for row in table]
    return "\n".join(lines)


def gain_table(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per run: mean test Dice without refinement, with global and adaptive DP-Morph, and the gains."""
    out = []
    for r in results:
        s = {k: v["dice_mean"] for k, v in r["scores"].items()}
        row = {"run": r["run"], **{f"dice_{k}": v for k, v in s.items()}}
        if "global" in s:
            row["global_minus_none"] = s["global"] - s["none"]
        if "adaptive" in s and "global" in s:
            row["adaptive_minus_global"] = s["adaptive"] - s["global"]
        if "adaptive" in s:
            row["adaptive_minus_none"] = s["adaptive"] - s["none"]
        out.append(row)
    return out


def plot_dice_vs_epsilon(results: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    refinements = list(results[0]["scores"])
    fig, axes = plt.subplots(1, len(refinements), figsize=(3.6 * len(refinements), 3.2), sharey=True, squeeze=False)
    for ax, refine in zip(axes[0], refinements):
        for rule in dict.fromkeys(r["rule"] for r in results):
            runs = sorted((r for r in results if r["rule"] == rule), key=lambda r: r["target_epsilon"] or 0)
            if rule == "nonprivate":
                ax.axhline(runs[0]["scores"][refine]["dice_mean"], color="k", ls="--", label="non-private")
                continue
            ax.plot([r["target_epsilon"] for r in runs], [r["scores"][refine]["dice_mean"] for r in runs], "o-",
                    label=rule)
        ax.set_xscale("log")
        eps = sorted({r["target_epsilon"] for r in results if r["target_epsilon"] is not None})
        ax.set_xticks(eps, [f"{e:g}" for e in eps])
        ax.minorticks_off()
        ax.set_xlabel("ε")
        ax.set_title(f"refinement: {refine}")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("mean test Dice")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_adaptive_gain(results: list[dict[str, Any]], path: str) -> bool:
    """Per-class Dice gain of adaptive over global DP-Morph on test, per run. False if either was not scored."""
    runs = [r for r in results if {"global", "adaptive"} <= set(r["scores"])]
    if not runs:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = list(runs[0]["scores"]["adaptive"]["dice"])
    x, width = np.arange(len(runs)), 0.8 / len(classes)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(runs) + 1.5), 3.0))
    for i, c in enumerate(classes):
        gain = [r["scores"]["adaptive"]["dice"][c] - r["scores"]["global"]["dice"][c] for r in runs]
        ax.bar(x + i * width, gain, width, label=c)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(x + width * (len(classes) - 1) / 2, [r["run"] for r in runs], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("test Dice: adaptive − global")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def write_report(out: str, header: dict[str, Any], results: list[dict[str, Any]]) -> str:
    """results.csv, results.md and the plots in `out`; returns the path of results.md."""
    table = rows(results, header["budget"]["steps"])
    write_csv(table, join(out, "results.csv"))
    plot_dice_vs_epsilon(results, join(out, "dice_vs_epsilon.png"))
    has_gain = plot_adaptive_gain(results, join(out, "adaptive_gain_per_class.png"))
    dice_keys = [k for k in table[0] if k.startswith("dice_")]
    keys = ["run", "refinement", "epsilon", "sigma", "steps", "lr", *dice_keys, "ratio_to_nonprivate",
            "train_minutes", "run_minutes"]
    gains = gain_table(results)
    lines = [(f"# {header['dataset']} {header['configuration']}: rules × ε × refinement ({header['budget']['name']} "
             "budget)"), "",
             (f"Test: {header['split']['num_test']} held-out cases (seed {header['seed']}), never used for training, "
             f"validation or the DP-Morph choice. Training: {header['split']['num_train']} cases, validation (fold 0, "
             f"DP-Morph chosen here): {header['split']['num_val']}. Budget: {header['budget']['steps']} steps, batch "
             f"(expected batch under DP) {header['budget']['batch_size']}. Dice: nnU-Net's compute_metrics_on_folder "
             "on the test cases. Ratio: mean Dice / the non-private run's with the same refinement."), "",
             markdown_table(table, keys), "", "## DP-Morph gains (mean test Dice)", "",
             markdown_table(gains, list(dict.fromkeys(k for g in gains for k in g))), "",
             "![Dice vs ε](dice_vs_epsilon.png)", ""]
    if has_gain:
        lines += ["![adaptive − global per class](adaptive_gain_per_class.png)", ""]
    lines += [("Alignment: not recorded (the budgets set no `alignment_every`; run `nnUNetv2_dp_alignment` on a run's "
              "fold folder)."), "", f"Command: `{header['command']}`", ""]
    path = join(out, "results.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return os.path.abspath(path)
