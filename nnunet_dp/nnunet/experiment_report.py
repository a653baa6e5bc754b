"""nnUNetv2_dp_experiment, the report: results.csv, results.md and PNG plots from the runs' result.json files."""
from __future__ import annotations

import csv
import os
from os.path import join
from typing import Any

import numpy as np

from nnunet_dp.config import DPConfig
from nnunet_dp.optim import default_lr

# What the results tables say about the DP runs' randomness (DESIGN.md invariant 8).
PRIVATE = "yes"
SEEDED = "no (reproducible, not private: noise and sampling seeded)"
# lr_choice of the results rows (--lrs): choosing among lrs on the validation cases is itself not private
CHOSEN = "chosen on validation (not private: tuning on the private cases leaks, Papernot & Steinke 2022)"
DEFAULT = "default rule"


def randomness_line(header: dict[str, Any]) -> str:
    """The results.md line on the DP runs' noise and sampling: private by default, seeded under --reproducible."""
    if header.get("reproducible"):
        return (f"**Private randomness: {SEEDED}.** `--reproducible`: every DP run's noise and Poisson sampling were "
                f"seeded with {header['seed']}, so anyone with the seed can regenerate the noise and subtract it from "
                "the weights. Its ε does not hold; do not release these models as private.")
    return (f"Private randomness: {PRIVATE}. Each DP run drew its noise and Poisson sampling from fresh OS entropy; no "
            "seed is stored (`--seed` seeds the held-out split only).")


def lr_used(r: dict[str, Any]) -> float | None:
    """The initial lr a run trained with: its initial_lr setting (--lrs, or the baseline's budget lr); for a DP run
    without one, the trainer's default rule recomputed from its privacy.json (σ, C, qN, planned steps) with the DP
    momentum default, as in nnUNetTrainerDP.configure_optimizers. None if those fields are missing."""
    if r.get("initial_lr") is not None or r["rule"] == "nonprivate":
        return r.get("initial_lr")
    fields = [r.get(k) for k in ("noise_multiplier", "clip_norm", "expected_batch_size", "planned_steps")]
    if any(v is None for v in fields):
        return None
    sigma, clip, batch, steps = fields
    return default_lr(noise_multiplier=sigma, clip_norm=clip, expected_batch_size=batch, steps=int(steps),
                      momentum=DPConfig().momentum)


def lr_label(lr: float | None, default_rule: bool) -> str:
    """'default (0.0307)' for the DP default rule, else the lr itself ('0.05')."""
    value = "–" if lr is None else f"{lr:.3g}"
    return f"default ({value})" if default_rule else value


def rows(results: list[dict[str, Any]], budget_steps: int, reproducible: bool = False) -> list[dict[str, Any]]:
    """One row per run (rule, ε, lr) and refinement; ratio = mean Dice / the non-private run's mean Dice with the
    same refinement. private_randomness: PRIVATE, or SEEDED under --reproducible ('n/a' for the non-private run).
    lr_choice: see mark_lr_choice."""
    base = next((r for r in results if r["rule"] == "nonprivate" and not failed(r)), None)
    out = []
    for r in results:
        if failed(r):
            out.append(failed_row(r, budget_steps))
            continue
        lr, default_rule = lr_used(r), r["rule"] != "nonprivate" and r.get("initial_lr") is None
        for refine, s in r["scores"].items():
            ref = base["scores"].get(refine) if base else None
            ratio = s["dice_mean"] / ref["dice_mean"] if ref and ref["dice_mean"] > 0 else None
            val = r.get("validation_dice", {}).get(refine, r.get("validation_dice_mean") if refine == "none" else None)
            row = {"run": r["run"], "rule": r["rule"], "target_epsilon": r["target_epsilon"],
                   "epsilon": r["epsilon"], "sigma": r["noise_multiplier"],
                   "steps": r["steps"] if r["steps"] is not None else budget_steps,
                   "lr": lr_label(lr, default_rule), "lr_value": lr,
                   "lr_source": "budget" if r["rule"] == "nonprivate" else DEFAULT if default_rule else "--lrs",
                   "refinement": refine, **{f"dice_{k}": v for k, v in s["dice"].items()},
                   "dice_mean": s["dice_mean"], "ratio_to_nonprivate": ratio, "validation_dice": val,
                   "train_minutes": r["train_seconds"] / 60, "run_minutes": r["seconds"] / 60,
                   "private_randomness": "n/a" if r["rule"] == "nonprivate" else SEEDED if reproducible else PRIVATE,
                   "status": "ok"}
            out.append(row)
    return mark_lr_choice(out)


def failed(result: dict[str, Any]) -> bool:
    return result.get("status") == "failed"


def failed_row(r: dict[str, Any], budget_steps: int) -> dict[str, Any]:
    """The row of a failed run: no scores (its Dice cells read FAILED in results.md), the reason in `status`."""
    return {"run": r["run"], "rule": r["rule"], "target_epsilon": r["target_epsilon"], "epsilon": None, "sigma": None,
            "steps": budget_steps, "lr": "–", "lr_value": r.get("initial_lr"), "lr_source": "budget" if r["rule"] ==
            "nonprivate" else DEFAULT if r.get("initial_lr") is None else "--lrs", "refinement": "–",
            "dice_mean": None, "ratio_to_nonprivate": None, "validation_dice": None, "train_minutes": None,
            "run_minutes": r["seconds"] / 60, "private_randomness": "n/a", "status": f"FAILED: {_one_line(r['error'])}"}


def _one_line(text: str) -> str:
    return " / ".join(line.strip() for line in str(text).splitlines() if line.strip())


def mark_lr_choice(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of the rows with `lr_choice`: per (rule, target_epsilon, refinement) of the DP runs with several lrs,
    CHOSEN on the row with the best validation Dice (the first of equals; rows without a finite one never win) and
    DEFAULT on the default-rule row unless it is the chosen one; '' elsewhere. Validation Dice only, never test."""
    out = [{**row, "lr_choice": ""} for row in table]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in out:
        if row["rule"] != "nonprivate":
            groups.setdefault((row["rule"], row["target_epsilon"], row["refinement"]), []).append(row)
    for group in groups.values():
        if len(group) < 2:  # one run (one lr) per group and refinement: nothing was chosen
            continue
        for row in group:
            if row["lr_source"] == DEFAULT:
                row["lr_choice"] = DEFAULT
        scored = [row for row in group if row["validation_dice"] is not None and np.isfinite(row["validation_dice"])]
        if scored:
            max(scored, key=lambda row: row["validation_dice"])["lr_choice"] = CHOSEN
    return out


def headline_table(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per ε and DP rule, without refinement: test Dice with the default lr and with the lr chosen on validation,
    each with its ratio to the non-private run."""
    out = []
    dp = [row for row in table if row["rule"] != "nonprivate" and row["refinement"] == "none"
          and row["dice_mean"] is not None]
    for eps in sorted({row["target_epsilon"] for row in dp}):
        for rule in dict.fromkeys(row["rule"] for row in dp):
            group = [row for row in dp if row["rule"] == rule and row["target_epsilon"] == eps]
            default = next((row for row in group if row["lr_source"] == DEFAULT), None)
            chosen = next((row for row in group if row["lr_choice"] == CHOSEN), None)
            if default is None and chosen is None:
                continue
            out.append({"target ε": f"{eps:g}", "rule": rule, "lr (default rule)": default and default["lr"],
                        "Dice (default lr)": default and default["dice_mean"],
                        "ratio (default lr)": default and default["ratio_to_nonprivate"],
                        "lr (chosen on validation)": chosen and chosen["lr"],
                        "Dice (chosen lr)": chosen and chosen["dice_mean"],
                        "ratio (chosen lr)": chosen and chosen["ratio_to_nonprivate"]})
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
    """A markdown table; a failed run's Dice cells read FAILED."""
    def cell(row: dict[str, Any], k: str) -> str:
        if str(row.get("status", "")).startswith("FAILED") and (k.startswith("dice") or k == "ratio_to_nonprivate"):
            return "FAILED"
        return _fmt(row.get(k)).replace("|", "/")

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(row, k) for k in keys) + " |" for row in table]
    return "\n".join(lines)


def gain_table(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per run: mean test Dice without refinement, with global and adaptive DP-Morph, and the gains."""
    out = []
    for r in (r for r in results if not failed(r)):
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


def plot_dice_vs_epsilon(table: list[dict[str, Any]], path: str) -> None:
    """Mean test Dice vs ε per refinement: per rule the default-rule runs (solid) and, with --lrs, the runs whose lr
    was chosen on validation (dashed); the non-private run as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = [row for row in table if row["dice_mean"] is not None]
    if not table:
        return
    refinements = list(dict.fromkeys(row["refinement"] for row in table))
    fig, axes = plt.subplots(1, len(refinements), figsize=(3.6 * len(refinements), 3.2), sharey=True, squeeze=False)
    for ax, refine in zip(axes[0], refinements):
        panel = [row for row in table if row["refinement"] == refine]
        for rule in dict.fromkeys(row["rule"] for row in panel):
            runs = sorted((row for row in panel if row["rule"] == rule), key=lambda row: row["target_epsilon"] or 0)
            if rule == "nonprivate":
                ax.axhline(runs[0]["dice_mean"], color="k", ls="--", label="non-private")
                continue
            line = None
            for kind, style, label in ((DEFAULT, "o-", f"{rule} (default lr)"),
                                       (CHOSEN, "s--", f"{rule} (lr chosen on val.)")):
                pick = [row for row in runs if (row["lr_source"] if kind == DEFAULT else row["lr_choice"]) == kind]
                if pick:
                    kwargs = {} if line is None else {"color": line.get_color()}
                    line, = ax.plot([row["target_epsilon"] for row in pick], [row["dice_mean"] for row in pick],
                                    style, label=label, **kwargs)
        ax.set_xscale("log")
        eps = sorted({row["target_epsilon"] for row in table if row["target_epsilon"] is not None})
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
    runs = [r for r in results if {"global", "adaptive"} <= set(r.get("scores", {}))]
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


def lr_lines(table: list[dict[str, Any]]) -> list[str]:
    """The headline table (default lr vs lr chosen on validation, per ε and rule) and what the lr column means."""
    note = ("lr: `default (x)` = the DP trainers' default rule, nnunet_dp.optim.default_lr for the run's σ, C, "
            f"expected batch and planned steps with momentum {DPConfig().momentum} (docs/optimizer.md); a number = "
            "`--lrs` (initial_lr, same momentum); the non-private run keeps the budget's lr and nnU-Net's optimizer.")
    headline = headline_table(table)
    if not headline:
        return [note, ""]
    sweep = any(row["lr_choice"] == CHOSEN for row in table)
    intro = (f"Chosen on validation: per (rule, ε, refinement), the lr whose run had the best mean validation Dice "
             f"(the scores DP-Morph is chosen with); `lr_choice` marks it. **{CHOSEN}.**" if sweep else
             "No `--lrs` sweep: every DP run used the default rule.")
    return ["## Headline: default lr vs lr chosen on validation (mean test Dice, no refinement)", "",
            markdown_table(headline, list(headline[0])), "", intro, "", note, ""]


def budget_detail(budget: dict[str, Any]) -> str:
    """', patch 64x64 (planned 256x256), network 8-16-32-64 (budget.json)' when the header has the resolved budget."""
    if "patch_size" not in budget:
        return ""
    patch, planned = ("x".join(map(str, budget[k])) for k in ("patch_size", "planned_patch_size"))
    return (f", patch {patch}" + (f" (planned {planned})" if patch != planned else "") +
            f", network {'-'.join(map(str, budget['features_per_stage']))} (resolved for this dataset: budget.json)")


def failure_lines(failures: list[dict[str, Any]]) -> list[str]:
    """A section naming each failed run, its last error and its log (nothing when every run finished)."""
    if not failures:
        return []
    lines = [f"## Failed runs ({len(failures)})", "",
             "Their cells below read FAILED; rerun the same command to retry them (finished runs are skipped).", ""]
    lines += [f"- **{r['run']}**: `{_one_line(r['error'])}` (log: `{r.get('log', '')}`)" for r in failures]
    return [*lines, ""]


def write_report(out: str, header: dict[str, Any], results: list[dict[str, Any]]) -> str:
    """results.csv, results.md and the plots in `out`; returns the path of results.md."""
    table = rows(results, header["budget"]["steps"], bool(header.get("reproducible")))
    write_csv(table, join(out, "results.csv"))
    plot_dice_vs_epsilon(table, join(out, "dice_vs_epsilon.png"))
    has_gain = plot_adaptive_gain(results, join(out, "adaptive_gain_per_class.png"))
    dice_keys = [k for k in dict.fromkeys(k for row in table for k in row) if k.startswith("dice_")]
    sweep = [k for k in ("validation_dice", "lr_choice") if any(row["lr_choice"] for row in table)]
    failures = [r for r in results if failed(r)]
    keys = ["run", "refinement", "epsilon", "sigma", "steps", "lr", *dice_keys, "ratio_to_nonprivate", *sweep,
            "train_minutes", "run_minutes", *(["status"] if failures else [])]
    gains = gain_table(results) or [{"run": "–"}]
    lines = [(f"# {header['dataset']} {header['configuration']}: rules × ε × lr × refinement "
              f"({header['budget']['name']} budget)"), "",
             (f"Test: {header['split']['num_test']} held-out cases (split seed {header['seed']}), never used for "
             f"training, validation, the DP-Morph choice or the lr choice. Training: {header['split']['num_train']} "
             f"cases, validation (fold 0, DP-Morph and lr chosen here): {header['split']['num_val']}. Budget: "
             f"{header['budget']['steps']} steps, batch (expected batch under DP) {header['budget']['batch_size']}"
             f"{budget_detail(header['budget'])}. Dice: nnU-Net's compute_metrics_on_folder on the test cases. Ratio: mean Dice / the non-private run's "
             "with the same refinement."), "",
             randomness_line(header), "", *failure_lines(failures), *lr_lines(table), "## All runs", "",
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
