"""How nnUNetv2_dp_experiment and nnUNetv2_dp_demo choose DP-Morph, and the epsilon a number "with DP-Morph" carries.

The choice reads the private validation cases' labels. By default it is made privately (determine_dp_morph with
epsilon_select = DEFAULT_EPSILON_SELECT: the exponential mechanism on fresh OS entropy); `nonprivate` keeps the old
argmax for comparison, and every number it gives is labelled NOT_PRIVATE. The epsilon of a fold's model plus its
choice is composed exactly as nnUNetv2_dp_privacy composes a release: nnunet_dp.release.compose_release over the fold
(nnunet_dp.release_folders.load_fold) and the selection recorded in the written postprocessing.json
(nnunet_dp.release.selection_from_summary). The rule is written there once, not here.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, Literal

from nnunet_dp.errors import DPError
from nnunet_dp.release import SelectionRun, compose_release, selection_from_summary
from nnunet_dp.release_folders import load_fold

SelectionMode = Literal["private", "nonprivate"]
SELECTION_MODES: tuple[SelectionMode, ...] = ("private", "nonprivate")
Training = Literal["dp", "nonprivate", "none"]  # a DP fold run; non-private training; no training on private cases
# epsilon_select of a private DP-Morph choice unless --epsilon-select says otherwise: one fixed value for every row (not
# a share of each run's ε), so that the refined rows of every ε, the non-private reference and the public model alone
# are chosen alike and every training ε grows by the same known amount. Measured (docs/dp_morph.md, "In the harness
# and the demo"; Dataset904, 42 validation cases): 1 keeps 37 % of the non-private gain on average, 0.1 (10 % of
# ε = 1) does worse than no refinement.
DEFAULT_EPSILON_SELECT = 1.0
NOT_PRIVATE = "selection not private"
PRIVATE = "private"


class DPSelectionError(DPError, ValueError):
    """A bad DP-Morph selection option of the harness or the demo."""

    def __init__(self, option: str, value: Any, allowed: str, fix: str = "") -> None:
        self.option, self.value, self.allowed, self.fix = option, value, allowed, fix
        super().__init__(f"{option} = {value!r} is not allowed: expected {allowed}." + (f" {fix}" if fix else ""))

    def __reduce__(self) -> tuple:
        return type(self), (self.option, self.value, self.allowed, self.fix)


@dataclass(frozen=True)
class MorphSelection:
    """How DP-Morph is chosen: privately with epsilon_select, or (mode nonprivate, epsilon_select None) by argmax."""

    mode: SelectionMode = "private"
    epsilon_select: float | None = DEFAULT_EPSILON_SELECT

    def record(self) -> dict[str, Any]:
        """What result.json, settings and results.md keep (compared on resume)."""
        return {"mode": self.mode, "epsilon_select": self.epsilon_select}

    @property
    def label(self) -> str:
        return NOT_PRIVATE if self.mode == "nonprivate" else f"private (ε_select = {self.epsilon_select:g})"


NONPRIVATE = MorphSelection("nonprivate", None)
DEFAULT = MorphSelection()  # private, DEFAULT_EPSILON_SELECT


def record_label(record: dict[str, Any] | None) -> str:
    """The label of a stored record (None: a result.json written before the option, whose choice was never private)."""
    return NONPRIVATE.label if not record else MorphSelection(record["mode"], record["epsilon_select"]).label


def morph_selection(mode: str, epsilon_select: float | None, *, mode_option: str = "--dpmorph-selection",
                    epsilon_option: str = "--epsilon-select") -> MorphSelection:
    """The checked selection: private with epsilon_select (default DEFAULT_EPSILON_SELECT), or nonprivate (no
    epsilon_select may be given then)."""
    if mode not in SELECTION_MODES:
        raise DPSelectionError(mode_option, mode, f"one of {list(SELECTION_MODES)}",
                               "private (default) draws the choice with the exponential mechanism; nonprivate takes "
                               "the best candidate on the validation cases (not private, for comparison).")
    if mode == "nonprivate":
        if epsilon_select is not None:
            raise DPSelectionError(epsilon_option, epsilon_select, f"no value with {mode_option} nonprivate (nothing "
                                   "is drawn)", f"Drop {epsilon_option}, or drop {mode_option} nonprivate.")
        return NONPRIVATE
    eps = DEFAULT_EPSILON_SELECT if epsilon_select is None else epsilon_select
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
        raise DPSelectionError(epsilon_option, eps, "a finite number > 0 (the ε of the private DP-Morph choice)",
                               f"E.g. {epsilon_option} {DEFAULT_EPSILON_SELECT:g}.")
    return MorphSelection("private", float(eps))


def read_selection(pp_folder: str) -> SelectionRun:
    """The selection recorded in pp_folder/postprocessing.json (nnunet_dp.release.selection_from_summary)."""
    path = os.path.join(pp_folder, "postprocessing.json")
    summary = None
    if os.path.isfile(path):
        with open(path) as f:
            summary = json.load(f)
    return selection_from_summary(path, summary)


def selection_privacy(pp_folder: str, fold: str | None, training: Training) -> dict[str, Any]:
    """What a number with this DP-Morph choice carries: `selection` (PRIVATE or NOT_PRIVATE), epsilon_select, and
    epsilon_total, the epsilon of the model plus the choice (None where no guarantee covers it).

    training 'dp': compose_release over the fold run `fold` and the selection, as nnUNetv2_dp_privacy does (one fold,
    its delta); 'none' (the public model alone: no training on the private cases): the selection's epsilon alone;
    'nonprivate' (the non-private reference): None.
    """
    selection = read_selection(pp_folder)
    covered = selection.epsilon_select is not None and not selection.problems
    out: dict[str, Any] = {"selection": PRIVATE if covered else NOT_PRIVATE,
                           "epsilon_select": selection.epsilon_select, "epsilon_training": None,
                           "epsilon_total": None, "delta": None, "not_covered": list(selection.problems)}
    if training == "none":
        out.update(epsilon_training=0.0, epsilon_total=selection.epsilon_select if covered else None, delta=0.0)
    elif training == "dp":
        if fold is None:
            raise ValueError("selection_privacy: training 'dp' needs the fold folder")
        release = compose_release([load_fold(fold)], selection)
        out.update(epsilon_training=release["epsilon_training"], epsilon_total=release["epsilon"],
                   delta=release["delta"], not_covered=release["not_covered"])
    else:
        out["not_covered"] = ["non-private training: no ε covers the model", *out["not_covered"]]
    return out
