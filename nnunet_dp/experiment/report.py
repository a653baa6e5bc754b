"""nnUNetv2_dp_experiment, the report: results.csv, results.md and PNG plots from the runs' result.json files.

results.csv: one row per run and refinement; under --seeds K > 1 (`row` = 'repeat') followed by one row per cell
(rule, ε, lr, levers) and refinement with the mean over its repeats (`row` = 'mean ± sd', `dice_mean_sd`, `n`).
results.md shows the cells: mean ± sd (n) where a cell has several repeats.

Longer than ~300 lines: results.csv and results.md are one table seen twice; their columns are kept together.
"""
from __future__ import annotations

import csv
import os
from os.path import join
from typing import Any

from nnunet_dp import law
from nnunet_dp.config import DPConfig
from nnunet_dp.experiment.aggregate import (
    CHOSEN,
    DEFAULT,
    DEFAULT_LEVERS,
    PUBLIC,
    aggregate,
    headline_table,
    is_dp,
    is_reference,
    mark_choice,
    ratio,
    reference_dice,
    with_sd,
)
from nnunet_dp.experiment.dpmorph import (
    gain_selection,
    public_morph_sentence,
    selection_fields,
    selection_line,
)
from nnunet_dp.experiment.law_cells import predicted_ratio, prediction_label
from nnunet_dp.experiment.plots import plot_adaptive_gain, plot_dice_vs_epsilon
from nnunet_dp.optim import default_lr

# What the results tables say about the DP runs' randomness (docs/invariants.md, invariant 8).
PRIVATE = "yes"
SEEDED = "no (reproducible, not private: noise and sampling seeded)"
__all__ = ["CHOSEN", "DEFAULT", "rows", "table_rows", "write_report"]


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
    momentum default, as in nnUNetTrainerDP.configure_optimizers (privacy.json's initial_lr, `lr_used`, where the
    trainer recorded it: the fine-tuning rule depends on the public weights). None if those fields are missing."""
    if r.get("lr_used") is not None:
        return r["lr_used"]
    if r["rule"] == PUBLIC:  # the public model alone: not trained on the private cases
        return None
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
    """One row per run (rule, ε, lr, levers, repeat) and refinement; ratio = mean Dice / the non-private reference's
    mean Dice (over its repeats) with the same refinement. private_randomness: PRIVATE, or SEEDED under
    --reproducible ('n/a' for the non-private run), 'no' where a DP-Morph choice was not private; selection,
    epsilon_select and epsilon_total: how a refined row's choice was made and the composed ε (dpmorph.selection_fields).
    result.json files older than the levers read as the defaults, older than the selection as not private."""
    out, laws = [], law.load()
    for r in results:
        if failed(r):
            out.append(failed_row(r, budget_steps))
            continue
        lr, default_rule = lr_used(r), is_dp(r) and r.get("initial_lr") is None
        randomness = "n/a" if not is_dp(r) else SEEDED if reproducible else PRIVATE
        low, high = predicted_ratio(r, laws)
        for refine, s in r["scores"].items():
            val = r.get("validation_dice", {}).get(refine, r.get("validation_dice_mean") if refine == "none" else None)
            row = {"run": r["run"], **_place(r), "rule": r["rule"], "target_epsilon": r["target_epsilon"],
                   "epsilon": r["epsilon"], **selection_fields(r, refine, randomness), "sigma": r["noise_multiplier"],
                   "steps": r["steps"] if r["steps"] is not None else budget_steps,
                   "lr": lr_label(lr, default_rule), "lr_value": lr,
                   "lr_source": _lr_source(r, default_rule),
                   "levers": levers_label(r),
                   "refinement": refine, **{f"dice_{k}": v for k, v in s["dice"].items()},
                   "dice_mean": s["dice_mean"], "ratio_to_nonprivate": None,
                   "predicted_ratio_low": low, "predicted_ratio_high": high, "validation_dice": val,
                   "train_minutes": r["train_seconds"] / 60, "run_minutes": r["seconds"] / 60, "status": "ok"}
            out.append(row)
    reference = reference_dice(out)
    return [{**row, "ratio_to_nonprivate": ratio(row["dice_mean"], row["refinement"], reference)} for row in out]


def _lr_source(r: dict[str, Any], default_rule: bool) -> str:
    """'budget' (the non-private reference), '–' (the public model alone: no private training), DEFAULT or '--lrs'."""
    return {"nonprivate": "budget", PUBLIC: "–"}.get(r["rule"], DEFAULT if default_rule else "--lrs")


def levers_label(r: dict[str, Any]) -> str:
    """A result's levers column: the DP levers' label ('defaults' for result.json files older than the levers); for
    the non-private reference 'n/a', or its --reference-trainable subset ('norm_bias')."""
    label = r.get("levers", DEFAULT_LEVERS)
    return "n/a" if r["rule"] == "nonprivate" and label == DEFAULT_LEVERS else label


def _place(r: dict[str, Any]) -> dict[str, Any]:
    return {"cell": r.get("cell", r["run"]), "repeat": r.get("repeat")}


def table_rows(results: list[dict[str, Any]], budget_steps: int,
               reproducible: bool = False) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the cells with their `choice`, the rows of results.csv): without repeats the cells are the csv rows (`row` =
    'run'); with them, the repeats' rows ('repeat'; 'run' for a single model such as the public model alone) and then
    the cells ('mean ± sd')."""
    table = rows(results, budget_steps, reproducible)
    cells = mark_choice(aggregate(table, reference_dice(table)))
    if not any(row["repeat"] is not None for row in table):
        return cells, [{**row, "row": "run"} for row in cells]
    return cells, ([{**row, "row": "run" if row["repeat"] is None else "repeat"} for row in table] +
                   [{**row, "row": "mean ± sd"} for row in cells])


def failed(result: dict[str, Any]) -> bool:
    return result.get("status") == "failed"


def failed_row(r: dict[str, Any], budget_steps: int) -> dict[str, Any]:
    """The row of a failed run: no scores (its Dice cells read FAILED in results.md), the reason in `status`."""
    return {"run": r["run"], **_place(r), "rule": r["rule"], "target_epsilon": r["target_epsilon"], "epsilon": None,
            "selection": "–", "epsilon_select": None, "epsilon_total": None, "sigma": None, "levers": levers_label(r),
            "steps": r["steps"] if r.get("steps") is not None else budget_steps, "lr": "–", "lr_value":
            r.get("initial_lr"), "lr_source": _lr_source(r, r.get("initial_lr") is None), "refinement": "–",
            "dice_mean": None, "ratio_to_nonprivate": None, "validation_dice": None, "train_minutes": None,
            "run_minutes": r["seconds"] / 60, "private_randomness": "n/a", "status": f"FAILED: {_one_line(r['error'])}"}


def _one_line(text: str) -> str:
    return " / ".join(line.strip() for line in str(text).splitlines() if line.strip())


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
        row = {"run": r["run"], "selection": gain_selection(r), **{f"dice_{k}": v for k, v in s.items()}}
        if "global" in s:
            row["global_minus_none"] = s["global"] - s["none"]
        if "adaptive" in s and "global" in s:
            row["adaptive_minus_global"] = s["adaptive"] - s["global"]
        if "adaptive" in s:
            row["adaptive_minus_none"] = s["adaptive"] - s["none"]
        out.append(row)
    return out


def start_line(header: dict[str, Any]) -> str:
    """Where the runs start: from scratch, the public part (said plainly: in-distribution) or a given file."""
    start = header.get("start") or {"from": "scratch"}
    if start["from"] == "public part":
        share = f"{start['public_fraction']:g}"
        return (f"**Start: fine-tuned from public weights.** Public part: an in-distribution split of the same dataset "
                f"({share} of the non-test cases), so the pretraining is as close to the private data as public data "
                f"can be ({start['num_public_cases']} cases, drawn with seed {header['seed']}). Ordinary nnU-Net "
                f"training on it ({_public_length(start)} and network, trained once) gave the weights and the plans; "
                "every run (DP "
                "and the non-private reference) fine-tuned from them on the private part. Test cases are in neither "
                "part. Real public data (another hospital, scanner or population) will be further from the private "
                "cases.")
    if start["from"] == "public dataset":
        labels = ("the same labels as the private task: its segmentation heads are transferred" if start.get("labels_match")
                  else "other labels than the private task: the runs start from its features with random "
                  "segmentation heads, and the public model alone predicts its own classes, scored against the "
                  "private labels label by label (the best a user can do without private training is no better: "
                  "no model of the private classes exists without private labels)")
        return (f"**Start: fine-tuned from a public model trained on another dataset, {start['public_dataset']}** "
                f"({start['num_public_cases']} cases, {_public_length(start)} and network, trained once), with "
                f"{labels}. {start['note']}. Every run (DP and the non-private reference) fine-tuned from it on the "
                "private part.")
    if start["from"] == "file":
        return (f"**Start: fine-tuned from {start['path']}** (sha256 {start['sha256']}), every run (DP and the "
                "non-private reference). Its training data must not contain the private cases.")
    return "Start: every run trained from scratch (random initialisation)."


def _public_length(start: dict[str, Any]) -> str:
    epochs = start.get("public_epochs")
    return "same budget" if epochs is None else f"same budget but {epochs} epochs: --public-epochs"


def headline_lines(cells: list[dict[str, Any]]) -> list[str]:
    """The headline table (the DP defaults vs the setting chosen on validation, per ε and rule), the non-private
    reference, and what the lr and levers columns mean."""
    note = ("lr: `default (x)` = the DP trainers' default rule, nnunet_dp.optim.default_lr for the run's σ, C, "
            f"expected batch and planned steps with momentum {DPConfig().momentum} (docs/optimizer.md); a number = "
            "`--lrs` (initial_lr, same momentum); the non-private run keeps the budget's lr and nnU-Net's optimizer. "
            "levers: the DP settings trainable, augmentations_per_case (K) and ema_decay (EMA) where they differ from "
            "the trainers' defaults; none of them costs privacy.")
    references = [row for row in cells if row["rule"] == "nonprivate" and row["refinement"] == "none"
                  and row["dice_mean"] is not None]
    ref = []
    for row in sorted(references, key=lambda row: not is_reference(row)):
        dice = _fmt(with_sd(row["dice_mean"], row["dice_mean_sd"]))
        if is_reference(row):
            ref.append(f"Non-private reference: mean test Dice {dice} (n = {row['n']})")
        else:
            ref.append(f"Non-private reference training only `trainable: {row['levers']}` (--reference-trainable; "
                       f"what that subset can hold without noise): mean test Dice {dice} (n = {row['n']}), ratio "
                       f"{_fmt(row['ratio_to_nonprivate'])}")
    public = [row for row in cells if row["rule"] == PUBLIC and row["dice_mean"] is not None]
    ref += [public_line(row) + public_morph_sentence(public) for row in public if row["refinement"] == "none"]
    ref += [""] if ref else []
    headline = headline_table(cells)
    if not headline:
        return [*ref, note, ""]
    sweep = any(row["choice"] == CHOSEN for row in cells)
    intro = ("First columns: the DP defaults (default lr rule, default levers; where the grid has no such run, its only "
             "setting). Chosen on validation: per (rule, ε, refinement), the setting (lr × levers) whose runs had the "
             "best mean validation Dice (the scores DP-Morph is chosen with); `choice` marks it. "
             f"**{CHOSEN}.**" if sweep else "One setting per (rule, ε): nothing was chosen.")
    return ["## Headline: DP defaults vs the setting chosen on validation (mean test Dice, no refinement)", "",
            *ref, markdown_table(headline, list(headline[0])), "", intro, "", note, ""]


def public_line(row: dict[str, Any]) -> str:
    """The headline's line on the public model alone: what the DP runs start from."""
    return (f"Public model alone (the public pretraining, no training on the private cases: ε = 0 for them): mean test "
            f"Dice {_fmt(row['dice_mean'])}, ratio {_fmt(row['ratio_to_nonprivate'])}. What a run adds over it is what "
            "it learned from the private cases.")


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


def _repeats_line(seeds: int) -> str:
    return (f"Repeats: --seeds {seeds}: every run trained {seeds} times; tables show the mean ± sd (sample sd, ddof = "
            "1) over the repeats that finished, and n; results.csv also has one row per repeat.")


def _display(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """results.md's rows: dice_mean as 'mean ± sd' where a cell has several repeats."""
    return [{**row, "dice_mean": with_sd(row["dice_mean"], row.get("dice_mean_sd")),
             "predicted ratio": prediction_label(row)} for row in cells]


def write_report(out: str, header: dict[str, Any], results: list[dict[str, Any]]) -> str:
    """results.csv, results.md and the plots in `out`; returns the path of results.md."""
    cells, csv_rows = table_rows(results, header["budget"]["steps"], bool(header.get("reproducible")))
    write_csv(csv_rows, join(out, "results.csv"))
    plot_dice_vs_epsilon(cells, join(out, "dice_vs_epsilon.png"))
    has_gain = plot_adaptive_gain(results, join(out, "adaptive_gain_per_class.png"))
    dice_keys = [k for k in dict.fromkeys(k for row in cells for k in row)
                 if k.startswith("dice_") and k != "dice_mean_sd"]
    sweep = [k for k in ("validation_dice", "choice") if any(row["choice"] for row in cells)]
    levers = ["levers"] if any(row["levers"] not in (DEFAULT_LEVERS, "n/a") for row in cells) else []
    repeated = ["n"] if any(row.get("n", 1) > 1 for row in cells) else []
    failures = [r for r in results if failed(r)]
    keys = ["run", "refinement", "epsilon", "selection", "epsilon_select", "epsilon_total", "sigma", "steps", "lr", *levers, *dice_keys, "ratio_to_nonprivate",
            "predicted ratio", *repeated, *sweep, "train_minutes", "run_minutes", *(["status"] if failures else [])]
    gains = gain_table(results) or [{"run": "–"}]
    refined = any(row["refinement"] not in ("none", "–") for row in cells)
    seeds = header.get("seeds", 1)
    lines = [(f"# {header['dataset']} {header['configuration']}: rules × ε × lr × levers × refinement "
              f"({header['budget']['name']} budget)"), "",
             (f"Test: {header['split']['num_test']} held-out cases (split seed {header['seed']}), never used for "
             f"training, validation, the DP-Morph choice or the choice of lr and levers. Training: "
             f"{header['split']['num_train']} cases, validation (fold 0, DP-Morph, lr and levers chosen here): "
             f"{header['split']['num_val']}. Budget: {header['budget']['steps']} steps, batch (expected batch under "
             f"DP) {header['budget']['batch_size']}{budget_detail(header['budget'])}. Dice: nnU-Net's "
             "compute_metrics_on_folder on the test cases. Ratio: mean Dice / the non-private reference's with the "
             "same refinement."), "", start_line(header), "",
             *([_repeats_line(seeds), ""] if seeds > 1 else []),
             randomness_line(header), "", *([selection_line(header), ""] if refined else []), *failure_lines(failures), *headline_lines(cells), "## All runs", "",
             markdown_table(_display(cells), keys), "", "## DP-Morph gains (mean test Dice)", "",
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
