"""MODEL_CARD.md of a DP release (nnUNetv2_dp_export): what epsilon covers, how it was reached, what it does not cover.

Everything on the card comes from release_privacy.json (the composed release) and the packed folds' privacy.json:
no statistic of the private cases beyond what those files publish (N, the step counts, the settings).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

CARD_FILE = "MODEL_CARD.md"
PRIVACY_UNIT = "one training case = one patient's image and label (Poisson sampling of cases)"
BEST_NOTE = ("checkpoint_best.pth is packed (--with-best): it was chosen by the pseudo Dice on the fold's validation "
             "cases, computed without noise, so epsilon does not cover that choice (checkpoint_final.pth involves "
             "none).")


class Request(Protocol):
    """What the card needs to know of the export request (nnunet_dp.tools.export.Request)."""

    dataset: str
    configurations: tuple[str, ...]
    folds: tuple[int | str, ...]
    trainer: str
    plans: str
    with_best: bool


def headline(release: dict[str, Any]) -> str:
    """One line: the release's (epsilon, delta), or NOT covered and why."""
    if release["covered"]:
        return (f"Covered: epsilon = {release['epsilon']:.4f} at delta = {release['delta']:g} "
                f"({release['accountant']} accountant), per training case")
    return "NOT covered by a privacy guarantee: " + " | ".join(release["not_covered"])


def _selection(release: dict[str, Any]) -> str:
    entry = next((b for b in release["breakdown"] if b["kind"] == "selection"), None)
    if entry is None:
        return "not included"
    if entry["epsilon_select"] is None:
        return "included, NOT private (chosen on the validation cases without noise)"
    private = "private" if entry["covered"] else "NOT private (" + "; ".join(entry["problems"]) + ")"
    return f"included, {private}, epsilon_select = {entry['epsilon_select']:g} (added to the training epsilon)"


def _fold_rows(release: dict[str, Any], reports: Sequence[dict[str, Any]], names: Sequence[str]) -> list[str]:
    runs = [b for b in release["breakdown"] if b["kind"] == "fold_run"]
    rows = ["| fold | N | rule | clip norm C | sigma | q | steps | trainable (trained / all parameters) | epsilon alone |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, rep, run in zip(names, reports, runs):
        trained = f"{rep.get('trainable', 'all')} ({rep.get('num_trained_parameters', '?')} / " \
                  f"{rep.get('num_parameters', '?')})"
        rows.append(f"| {name} | {rep['num_training_cases']} | {rep['rule']} | {rep['clip_norm']:g} | "
                    f"{rep['noise_multiplier']:.4f} | {rep['sampling_rate']:.4f} | {run['steps']} | {trained} | "
                    f"{run['epsilon_alone']:.4f} |")
    return rows


def _use(request: Request) -> list[str]:
    folds = " ".join(str(f) for f in request.folds)
    return ["    nnUNetv2_install_pretrained_model_from_zip MODEL.zip",
            "    pip install nnunet-dp && eval \"$(nnUNetv2_dp_env)\"   # the DP trainer classes build the network",
            *(f"    nnUNetv2_predict -i INPUT -o OUTPUT -d {request.dataset} -c {c} -f {folds} -tr {request.trainer} "
              f"-p {request.plans}" for c in request.configurations)]


def model_card(release: dict[str, Any], reports: Sequence[dict[str, Any]], names: Sequence[str],
               request: Request) -> str:
    """The card's Markdown; its first line is the headline (NOT covered first when it is not)."""
    eps = "none (NOT covered)" if release["epsilon"] is None else f"{release['epsilon']:.4f}"
    what = (f"DP model of dataset {names[0].split('/')[0]}: {request.trainer}, plans {request.plans}, configuration(s) "
            f"{', '.join(request.configurations)}, folds {', '.join(str(f) for f in request.folds)} (nnU-Net v2 with "
            "nnunet-dp, DP-SGD).")
    how = (f"- epsilon = {eps}, delta = {release['delta']:g}, accountant: {release['accountant']} (every packed fold "
           "composed per training case, worst case over cases; release_privacy.json has the breakdown)")
    lines = [f"# {headline(release)}", "", what, "", "## Privacy", how, f"- privacy unit: {PRIVACY_UNIT}",
             f"- training epsilon (worst case over cases) = {release['epsilon_training']:.4f}",
             f"- DP-Morph postprocessing choice: {_selection(release)}",
             *[f"- {n}" for n in release["notes"]], "", *_fold_rows(release, reports, names), "",
             "## Not covered by epsilon"]
    lines += [f"- {p}" for p in release["not_covered"]] + [f"- {a}" for a in release["assumptions"]]
    return "\n".join([*lines, "", "## Use", *_use(request), ""])
