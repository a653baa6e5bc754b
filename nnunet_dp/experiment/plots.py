"""nnUNetv2_dp_experiment, the plots: mean test Dice vs ε (error bars: sd over the --seeds repeats) and the per-class
gain of adaptive over global DP-Morph."""
from __future__ import annotations

from typing import Any

import numpy as np

from nnunet_dp.experiment.aggregate import CHOSEN, PUBLIC, is_default, is_reference
from nnunet_dp.tools.morph_selection import NOT_PRIVATE, PRIVATE


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def epsilon_x(row: dict[str, Any]) -> float:
    """Where a DP cell sits on the ε axis: with a private DP-Morph choice at its composed ε (training + ε_select,
    `epsilon_total`), else (no refinement, or a choice that is not private: the panel says so) at its target ε."""
    if row["refinement"] != "none" and row.get("selection") == PRIVATE and row.get("epsilon_total") is not None:
        return float(row["epsilon_total"])
    return row["target_epsilon"]


def _panel_title(refine: str, panel: list[dict[str, Any]]) -> str:
    if refine == "none":
        return f"refinement: {refine}"
    if any(row.get("selection") == NOT_PRIVATE for row in panel):
        return f"refinement: {refine}\n({NOT_PRIVATE})"
    return f"refinement: {refine}\n(private selection: at ε + ε_select)"


def plot_dice_vs_epsilon(cells: list[dict[str, Any]], path: str) -> None:
    """Mean test Dice vs ε per refinement, one point per cell (the mean over its repeats, error bar ± sd): per rule
    the DP defaults (solid) and, with several settings, the setting chosen on validation (dashed); the non-private
    reference as a horizontal line (its ± sd shaded), a --reference-trainable subset's as a grey dotted one, the public
    model alone (--public-fraction) as a purple dash-dotted one. Refined panels place the DP cells at their composed ε
    (epsilon_x) and say in their title whether the DP-Morph choice was private."""
    cells = [row for row in cells if row["dice_mean"] is not None]
    if not cells:
        return
    plt = _pyplot()
    refinements = list(dict.fromkeys(row["refinement"] for row in cells))
    fig, axes = plt.subplots(1, len(refinements), figsize=(3.6 * len(refinements), 3.2), sharey=True, squeeze=False)
    for ax, refine in zip(axes[0], refinements):
        panel = [row for row in cells if row["refinement"] == refine]
        for rule in dict.fromkeys(row["rule"] for row in panel):
            runs = sorted((row for row in panel if row["rule"] == rule), key=lambda row: row["target_epsilon"] or 0)
            if rule == "nonprivate":
                for row in runs:  # the ordinary reference, then any --reference-trainable subset (grey, dotted)
                    mean, sd, ordinary = row["dice_mean"], row.get("dice_mean_sd"), is_reference(row)
                    ax.axhline(mean, color="k" if ordinary else "0.5", ls="--" if ordinary else ":",
                               label="non-private" if ordinary else f"non-private, {row['levers']} only")
                    if sd:
                        ax.axhspan(mean - sd, mean + sd, color="k" if ordinary else "0.5", alpha=0.1)
                continue
            if rule == PUBLIC:
                for row in runs:
                    note = "" if refine == "none" else " (ε_select only)" if row.get("selection") == PRIVATE else \
                        f" ({NOT_PRIVATE})"
                    ax.axhline(row["dice_mean"], color="tab:purple", ls="-.", label=f"public model alone{note}")
                continue
            line = None
            for pick, style, label in (([row for row in runs if is_default(row)], "o-", f"{rule} (defaults)"),
                                       ([row for row in runs if row.get("choice") == CHOSEN], "s--",
                                        f"{rule} (chosen on val.)")):
                if pick:
                    kwargs = {} if line is None else {"color": line.get_color()}
                    yerr = [row.get("dice_mean_sd") or 0.0 for row in pick]
                    container = ax.errorbar([epsilon_x(row) for row in pick], [row["dice_mean"] for row in pick],
                                            yerr=yerr if any(yerr) else None, fmt=style, capsize=3, label=label,
                                            **kwargs)
                    line = container.lines[0]
        ax.set_xscale("log")
        eps = sorted({round(epsilon_x(row), 2) for row in panel if row["target_epsilon"] is not None})
        ax.set_xticks(eps, [f"{e:g}" for e in eps])
        ax.minorticks_off()
        ax.set_xlabel("ε")
        ax.set_title(_panel_title(refine, panel), fontsize=9)
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("mean test Dice" + (" (± sd)" if any(r.get("dice_mean_sd") for r in cells) else ""))
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_adaptive_gain(results: list[dict[str, Any]], path: str) -> bool:
    """Per-class Dice gain of adaptive over global DP-Morph on test, per run. False if either was not scored."""
    runs = [r for r in results if {"global", "adaptive"} <= set(r.get("scores", {}))]
    if not runs:
        return False
    plt = _pyplot()
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
