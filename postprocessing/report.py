"""The readable record of a DP-Morph search (postprocessing.json; fields documented in docs/dp_morph.md)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from nnunet_dp.postprocessing.search import Candidate, Selection

DICE_CONVENTION = ("mean over cases of Dice = 2|P&R|/(|P|+|R|), voxels with the ignore label excluded; a case where "
                   "both masks are empty counts as 1 (nnU-Net's summary.json leaves such cases out)")
NOT_PRIVATE = ("These Dice values are computed from the validation cases and are NOT privatised. Keep this file with "
               "the private data; releasing it is not covered by epsilon_select.")

ERASES = ("not eligible: deletes every voxel of a class that the validation references contain (global mode never "
          "chooses such a candidate)")

SEEDED = ("the selection was seeded (-seed): it is reproducible, not private, so its epsilon_select does not hold; "
          "whoever knows the seed recomputes the choice from the utilities (the seed is not recorded)")


def privacy_record(epsilon_select: float | None, num_cases: int, num_selections: int,
                   with_connected_components: bool, *, seeded: bool = False) -> dict[str, Any]:
    """How the choice was made; epsilon_select is what to add to the training epsilon.

    Takes whether a seed was given, never the seed: no seed or generator state goes into a file (invariant 8).
    """
    if epsilon_select is None:
        return {"private_selection": False, "epsilon_select": None,
                "note": "The choice is not privatised: it was made on the validation cases and is not covered by "
                        "the training epsilon. Pass -epsilon_select to choose with the exponential mechanism."}
    assumptions = ["the number of validation cases and the candidate set are public",
                   "neighbouring datasets replace one validation case",
                   "postprocessing_scores.json holds non-private Dice values and is not released"]
    if with_connected_components:
        assumptions.append("nnU-Net's connected-component choice, made first, is not privatised")
    if seeded:
        assumptions.insert(0, SEEDED)
    randomness = ("seeded by -seed: reproducible, not private" if seeded else
                  "fresh OS entropy (numpy default_rng without a seed); no seed or generator state is kept")
    return {"private_selection": True, "epsilon_select": float(epsilon_select), "private_randomness": not seeded,
            "randomness": randomness,
            "mechanism": "exponential mechanism (McSherry & Talwar 2007): P(c) ~ exp(eps * u(c) / (2 * du))",
            "utility": "mean Dice over the cases, minus the margin for every candidate except none (global mode: a "
                       "case in which the candidate deletes a class that its reference and prediction hold scores 0)",
            "sensitivity": 1.0 / num_cases, "num_cases": num_cases, "num_selections": num_selections,
            "epsilon_per_selection": float(epsilon_select) / num_selections,
            "composition": "basic: the selections' epsilons add up to epsilon_select", "assumptions": assumptions}


def mean_dice(per_case: np.ndarray, labels: Sequence[str]) -> dict[str, float]:
    """{label: mean over cases, ..., "foreground_mean": mean over labels} from an array [n_cases, n_labels]."""
    means = per_case.mean(axis=0)
    out = {label: float(m) for label, m in zip(labels, means)}
    out["foreground_mean"] = float(means.mean())
    return out


def _describe(cand: Candidate) -> dict[str, Any]:
    if cand.operation == "none":
        return {"operation": "none", "radius": None, "plane": None}
    return {"operation": cand.operation, "radius": cand.radius, "plane": cand.plane}


def build_summary(settings: dict[str, Any], privacy: dict[str, Any], selection: Selection,
                  candidates: Sequence[Candidate], searched: tuple[np.ndarray, np.ndarray],
                  final: tuple[np.ndarray, np.ndarray], pkl: tuple[list[Callable], list[dict]],
                  cc_summary: dict | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(postprocessing.json content, postprocessing_scores.json content or None when the choice is not private)."""
    labels = list(settings["labels"])
    alone, every = searched
    table = [{**_describe(c), "mean_dice_class_alone": mean_dice(alone[:, i], labels),
              "mean_dice_all_classes": mean_dice(every[:, i], labels)} for i, c in enumerate(candidates)]
    choice = {key: _describe(candidates[index]) for key, index in selection.chosen.items()}
    utilities = {key: {"utility": selection.utilities[key][index], "utility_none": selection.utilities[key][0]}
                 for key, index in selection.chosen.items()}
    scores = {"choice_utility": utilities, "dice_before": mean_dice(final[0], labels),
              "dice_after": mean_dice(final[1], labels), "candidate_dice": table}
    record = {**settings, "num_cases": int(alone.shape[0]), "choice": choice, "privacy": privacy,
              "dice_convention": DICE_CONVENTION}
    if selection.excluded:  # only for a non-private choice, whose scores are in this file anyway
        record["excluded_candidates"] = {"reason": ERASES, "candidates": [_describe(candidates[i])
                                                                          for i in selection.excluded]}
    if privacy["private_selection"]:
        record["scores"] = "withheld (not privatised): see postprocessing_scores.json"
        private_scores: dict[str, Any] | None = {"note": NOT_PRIVATE, **scores}
    else:
        record.update(scores)
        private_scores = None
    main = {"dp_morph": record, "postprocessing_fns": [f"{fn.__module__}.{fn.__name__}" for fn in pkl[0]],
            "postprocessing_kwargs": pkl[1], "nnunet_connected_components": cc_summary}
    return main, private_scores



def format_result(main: dict[str, Any], folder: str) -> str:
    """A few lines for the console: the choice per class and, unless private, the Dice before and after."""
    record = main["dp_morph"]
    lines = [f"DP-Morph ({record['mode']}) on {record['num_cases']} cases, written to {folder}/postprocessing.pkl"]
    for key, choice in record["choice"].items():
        name = "all classes" if key == "all" else f"class {key} ({record['labels'][key]})"
        unit = record["candidates"]["radius_unit"]
        what = "none" if choice["operation"] == "none" else \
            f"{choice['operation']}, radius {choice['radius']:g} {unit}, {choice['plane']}"
        lines.append(f"  {name}: {what}")
    if record.get("excluded_candidates"):
        lines.append(f"  {len(record['excluded_candidates']['candidates'])} candidate(s) not eligible: they delete "
                     "every voxel of a class that the references contain")
    if "dice_before" in record:
        for key in [*record["labels"], "foreground_mean"]:
            lines.append(f"  Dice {key}: {record['dice_before'][key]:.4f} -> {record['dice_after'][key]:.4f}")
    else:
        lines.append(f"  private selection, epsilon_select = {record['privacy']['epsilon_select']:g}; the Dice values "
                     "are in postprocessing_scores.json (not privatised)")
        if not record["privacy"]["private_randomness"]:
            lines.append("  seeded (-seed): reproducible, NOT private; epsilon_select does not hold")
    return "\n".join(lines)
