"""nnUNetv2_dp_experiment, DP-Morph: choose on the validation predictions (privately by default), apply to the test
predictions, score with nnU-Net's evaluation; how each choice was made and the ε a refined row carries (training ε +
ε_select, composed by nnunet_dp.release as nnUNetv2_dp_privacy does: morph_selection.selection_privacy); whether a
finished run's choice can be reported under this invocation's selection; the report's fields and line on it.
"""
from __future__ import annotations

import json
import os
from os.path import join
from typing import TYPE_CHECKING, Any

from nnunet_dp.experiment.aggregate import PUBLIC, is_dp
from nnunet_dp.tools.morph_selection import (
    NONPRIVATE,
    NOT_PRIVATE,
    PRIVATE,
    MorphSelection,
    Training,
    record_label,
    selection_privacy,
)

if TYPE_CHECKING:
    from nnunet_dp.experiment.run import Context

SELECTION_NOT_PRIVATE = f"no ({NOT_PRIVATE})"  # private_randomness of a refined row whose choice was not private


def choose_and_apply(validation: str, gt_segmentations: str, model: str, test_none: str, out_folder: str,
                     mode: str, num_processes: int, *, epsilon_select: float | None) -> dict[str, Any]:
    """Choose DP-Morph (`mode`) on the validation predictions and their references only (privately with
    epsilon_select, by argmax when it is None), then apply the choice to the test predictions. The test labels are
    not an argument: nothing here can read them."""
    from nnunetv2.postprocessing.remove_connected_components import apply_postprocessing_to_folder

    from nnunet_dp.postprocessing.determine import determine_dp_morph

    choice_folder = choice_dir(out_folder, mode)
    fns, kwargs = determine_dp_morph(validation, gt_segmentations, join(model, "plans.json"),
                                     join(model, "dataset.json"), num_processes, mode=mode,
                                     epsilon_select=epsilon_select, output_folder=choice_folder)
    apply_postprocessing_to_folder(test_none, out_folder, fns, kwargs, join(model, "plans.json"),
                                   join(model, "dataset.json"), num_processes)
    with open(join(choice_folder, "postprocessing.json")) as f:
        return json.load(f)["dp_morph"]["choice"]


def choice_dir(out_folder: str, mode: str) -> str:
    """Where choose_and_apply writes the choice for the refined predictions in out_folder."""
    return join(os.path.dirname(out_folder), f"dpmorph_{mode}")


def refine_all(ctx: Context, validation: str, model: str, test_none: str, test_folder: str, fold: str | None,
               training: Training) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Every DP-Morph mode of ctx.refinements: (choices, test scores, selection privacy per mode: how the choice was
    made and the composed epsilon of the model plus the choice, morph_selection.selection_privacy)."""
    choices, scores, privacy = {}, {}, {}
    for mode in (m for m in ctx.refinements if m != "none"):
        pred = join(test_folder, mode)
        choices[mode] = choose_and_apply(validation, ctx.gt_segmentations, model, test_none, pred, mode,
                                         ctx.num_processes, epsilon_select=ctx.selection.epsilon_select)
        scores[mode] = evaluate(pred, ctx.test_labels, model, ctx.num_processes)
        privacy[mode] = selection_privacy(choice_dir(pred, mode), fold, training)
    return choices, scores, privacy


def evaluate(pred: str, labels: str, model: str, num_processes: int,
             dataset_json_file: str | None = None) -> dict[str, Any]:
    """nnU-Net's compute_metrics_on_folder on the test cases: per-class Dice (and the rest of its summary), for the
    labels of the model's dataset.json or of `dataset_json_file` (a public model of other labels scored on the
    private labels: a class it never predicts scores 0 on every case that has it)."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    with open(dataset_json_file or join(model, "dataset.json")) as f:
        dataset_json = json.load(f)
    plans = PlansManager(join(model, "plans.json"))
    label_manager = plans.get_label_manager(dataset_json)
    summary = compute_metrics_on_folder(labels, pred, join(pred, "summary.json"), plans.image_reader_writer_class(),
                                        dataset_json["file_ending"], label_manager.foreground_labels,
                                        label_manager.ignore_label, num_processes)
    names = {v: k for k, v in dataset_json["labels"].items() if isinstance(v, int)}
    dice = {names.get(int(k), str(k)): float(m["Dice"]) for k, m in summary["mean"].items()}
    return {"dice": dice, "dice_mean": float(summary["foreground_mean"]["Dice"]),
            "num_cases": len(summary["metric_per_case"])}


def validation_dice(validation: str, test_folder: str, refinements: tuple[str, ...]) -> dict[str, float]:
    """Mean foreground Dice on the validation fold per refinement, the scores the DP-Morph choice was made with:
    nnU-Net's validation summary for 'none', DP-Morph's dice_after on the same cases for the others (in
    postprocessing_scores.json for a private choice: not privatised, they stay in the run folder). Never test."""
    with open(join(validation, "summary.json")) as f:
        out = {"none": float(json.load(f)["foreground_mean"]["Dice"])}
    for mode in (m for m in refinements if m != "none"):
        folder = join(test_folder, f"dpmorph_{mode}")
        with open(join(folder, "postprocessing.json")) as f:
            record = json.load(f)["dp_morph"]
        if "dice_after" not in record:
            with open(join(folder, "postprocessing_scores.json")) as f:
                record = json.load(f)
        out[mode] = float(record["dice_after"]["foreground_mean"])
    return out


def stale_choice(result: dict[str, Any], selection: MorphSelection) -> str | None:
    """Why a finished run's DP-Morph rows cannot be reported under `selection` (None: they can). A result.json
    written before the selection options has no record: its choices were made without privacy."""
    if result.get("status") == "failed" or not any(m != "none" for m in result.get("scores", {})):
        return None
    old = result.get("dpmorph_selection") or NONPRIVATE.record()
    if old == selection.record():
        return None
    return (f"its DP-Morph choice ({record_label(old)}) is not this invocation's ({selection.label}): choosing again "
            "on the validation predictions (training and test predictions reused)")


def selection_fields(r: dict[str, Any], refine: str, training_randomness: str) -> dict[str, Any]:
    """A results row's fields on how its DP-Morph choice was made: `selection` (PRIVATE, NOT_PRIVATE; '–' without
    refinement), `epsilon_select`, `epsilon_total` (the model's ε plus the choice's; for 'none' the training ε, 0 for
    the public model alone) and `private_randomness` (the training's, and 'no' where the choice was not private)."""
    public = r["rule"] == PUBLIC
    if refine == "none":
        return {"selection": "–", "epsilon_select": None, "epsilon_total": 0.0 if public else r.get("epsilon"),
                "private_randomness": training_randomness}
    rec = (r.get("selection") or {}).get(refine) or {"selection": NOT_PRIVATE, "epsilon_select": None,
                                                     "epsilon_total": None}
    private = rec["selection"] == PRIVATE
    randomness = training_randomness  # seeded DP training (--reproducible) says so already; the reference: n/a
    if public or (is_dp(r) and training_randomness == "yes"):
        randomness = "yes" if private else SELECTION_NOT_PRIVATE
    return {"selection": rec["selection"], "epsilon_select": rec["epsilon_select"],
            "epsilon_total": rec["epsilon_total"], "private_randomness": randomness}


def gain_selection(r: dict[str, Any]) -> str:
    """The gains table's `selection` of a run: how its refined rows were chosen."""
    labels = [selection_fields(r, m, "n/a")["selection"] for m in r.get("scores", {}) if m != "none"]
    return " / ".join(dict.fromkeys(labels)) or "–"


def public_morph_sentence(rows: list[dict[str, Any]]) -> str:
    """What the public model alone's refined rows spend: its DP-Morph choice reads the private validation labels."""
    refined = [row for row in rows if row["refinement"] != "none"]
    if not refined:
        return ""
    if all(row["selection"] == PRIVATE and row["epsilon_total"] is not None for row in refined):
        eps = ", ".join(dict.fromkeys(f"{row['epsilon_total']:g}" for row in refined))
        return (f" With DP-Morph its ε is the selection's alone: ε = ε_select = {eps} for the private cases (the "
                "choice reads their validation labels, privately).")
    return (f" With DP-Morph: {NOT_PRIVATE} (the choice reads the private validation labels without noise), so those "
            "rows spend privacy that no ε covers.")


def selection_line(header: dict[str, Any]) -> str:
    """The results.md paragraph on how DP-Morph was chosen and what epsilon_total means."""
    record = header.get("dpmorph_selection")
    if record is None or record["mode"] == "nonprivate":
        return (f"**DP-Morph: {NOT_PRIVATE}** (`--dpmorph-selection nonprivate`): every refined row's choice is the "
                "best candidate on the private validation cases, without noise. Those rows read "
                f"'{NOT_PRIVATE}' and carry no `epsilon_total`: their `epsilon` covers the training only, not the "
                "choice (for comparison with the private default).")
    return (f"DP-Morph: private selection, ε_select = {record['epsilon_select']:g} per refined row (`--epsilon-select`):"
            " the exponential mechanism draws each choice on the validation cases from fresh OS entropy (no seed). "
            "`epsilon_total` = the run's training ε + ε_select, composed as `nnUNetv2_dp_privacy` does "
            "(nnunet_dp.release, basic composition); for the public model alone it is ε_select alone (no training "
            "on the private cases); the non-private reference has none. Each refined row is one release (the "
            "model and that mode's choice): releasing both modes of a run would add ε_select twice.")
