"""The (epsilon, delta) of a release: the fold models that are ensembled for prediction plus a DP-Morph selection.

Per training case, the release runs every fold training whose training set holds that case (nnU-Net's 5-fold CV:
4 of the 5 folds) and, once, the postprocessing selection. So:
1. Training, per case: the accountant histories [(sigma, q, steps), ...] of the fold runs that contain the case are
   composed in ONE opacus accountant (the one the runs used) and converted to epsilon once, at one delta.
   RDP: Renyi divergences of (adaptively) composed mechanisms add order by order (Mironov, "Renyi Differential
   Privacy", CSF 2017, Prop. 1), and the sum converts to (epsilon, delta) at any single delta (Prop. 3; opacus uses
   the tighter conversion of Balle et al. 2020). PRV: the privacy loss distributions of the runs are convolved and
   epsilon read off at one delta (Gopi, Lee & Wutschitz, NeurIPS 2021). Either way the fold runs' deltas are NOT
   summed: the whole composition is (epsilon, delta) at the common delta.
   The training epsilon of the release is the worst case over cases (the max over the distinct fold-membership
   patterns that occur; a fold whose training cases are unknown counts as containing every case: an upper bound).
2. Selection: DP-Morph's exponential mechanism is (epsilon_select, 0)-DP on the validation cases. It is added by
   basic composition (Dwork & Roth, "The Algorithmic Foundations of DP", 2014, Thm. 3.16: (e1, d1) then (e2, d2)
   gives (e1 + e2, d1 + d2)): epsilon = max_case epsilon_train(case) + epsilon_select, delta = delta_train + 0.
   Adding the worst training epsilon to epsilon_select bounds every case, whichever fold it was validated in.
Anything whose privacy does not hold (a seeded run, a non-private selection) makes the release NOT covered: its
epsilon is then None, never a number with that part counted as 0.
"""
from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nnunet_dp.accounting import epsilon_of
from nnunet_dp.config import check_delta
from nnunet_dp.errors import DPError

History = tuple[tuple[float, float, int], ...]
TRAINING_RULE = ("per case: the accountant histories of all fold runs whose training set contains the case, composed "
                 "in one accountant and converted at one delta (RDP: Mironov 2017, Prop. 1 and 3; PRV: Gopi et al. "
                 "2021); worst case over cases")
SELECTION_RULE = ("basic composition (Dwork & Roth 2014, Thm. 3.16): epsilon = worst-case training epsilon + "
                  "epsilon_select; the exponential mechanism adds no delta")
DELTA_RULE = ("one delta for the whole composition (not a sum of the folds' deltas): the composed RDP/PRV is "
              "converted once; the selection is pure DP (delta 0)")

NO_SELECTION = ("No postprocessing selection was given (--postprocessing): a postprocessing.pkl released with the "
                "models is not covered by this epsilon.")


class DPReleaseError(DPError, ValueError):
    """A folder or file given to nnUNetv2_dp_privacy cannot be part of one release."""

    def __init__(self, setting: str, value: Any, allowed: str, fix: str = "") -> None:
        self.setting, self.value, self.allowed = setting, value, allowed
        super().__init__(f"{setting} = {value!r} is not allowed: expected {allowed}." + (f" {fix}" if fix else ""))


@dataclass(frozen=True)
class FoldRun:
    """What the release needs from one DP fold run (read from its privacy.json, journal and splits)."""

    folder: str
    history: History
    history_source: str
    accountant: str
    delta: float
    epsilon_reported: float
    dataset: str | None
    num_training_cases: int
    training_cases: frozenset[str] | None  # None: every case (fold 'all', or membership unknown: an upper bound)
    membership_source: str
    private_randomness: bool | None  # None: privacy.json does not say (counts as not private)
    status: str


@dataclass(frozen=True)
class SelectionRun:
    """A postprocessing choice: epsilon_select is None when it is not private; problems say why it is not covered."""

    source: str
    epsilon_select: float | None
    problems: tuple[str, ...]


def _not_private(source: str, why: str) -> SelectionRun:
    return SelectionRun(source, None, (f"{source}: {why}",))


def selection_from_summary(source: str, summary: dict[str, Any] | None) -> SelectionRun:
    """The selection recorded in a postprocessing.json (None: the folder has a postprocessing.pkl without it)."""
    if summary is None:
        return _not_private(source, "postprocessing.pkl without postprocessing.json: how the choice was made cannot "
                                    "be checked, so it counts as not private")
    record = summary.get("dp_morph") if isinstance(summary, dict) else None
    if not isinstance(record, dict) or not isinstance(record.get("privacy"), dict):
        return _not_private(source, "not a DP-Morph selection (nnU-Net's own postprocessing determination looks at "
                                    "the validation cases without noise)")
    privacy = record["privacy"]
    if not privacy.get("private_selection"):
        return _not_private(source, "the DP-Morph choice was made without -epsilon_select: it is not private. Rerun "
                                    "nnUNetv2_dp_determine_postprocessing with -epsilon_select")
    eps = privacy.get("epsilon_select")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 < eps < float("inf")):
        raise DPReleaseError(f"epsilon_select in {source}", eps, "a finite number > 0 (a private DP-Morph choice)")
    problems = []
    if privacy.get("private_randomness") is not True:
        problems.append(f"{source}: the selection was seeded (private_randomness {privacy.get('private_randomness')}):"
                        " epsilon_select does not hold")
    if summary.get("nnunet_connected_components") is not None:
        problems.append(f"{source}: nnU-Net's connected-component choice (--with_connected_components), made first, "
                        "is not private")
    return SelectionRun(source, float(eps), tuple(problems))


def check_folds(folds: Sequence[FoldRun]) -> None:
    """One release: at least one fold, no folder twice, one dataset, one accountant."""
    if not folds:
        raise DPReleaseError("FOLD_DIR", [], "at least one fold folder of a DP training run")
    seen = Counter(f.folder for f in folds)
    twice = [name for name, n in seen.items() if n > 1]
    if twice:
        raise DPReleaseError("FOLD_DIR", twice[0], "each fold folder once", "Remove the repeated folder.")
    first = folds[0]
    for fold in folds[1:]:
        if fold.accountant != first.accountant:
            raise DPReleaseError(f"accountant of {fold.folder}", fold.accountant,
                                 f"{first.accountant!r}, the accountant of {first.folder}",
                                 "Histories of different accountants cannot be composed in one accountant: release "
                                 "folds trained with the same 'accountant' setting.")
    if len(folds) > 1:
        for fold in folds:
            if fold.dataset is None:
                raise DPReleaseError(f"dataset of {fold.folder}", None, "a dataset name from plans.json in the "
                                     "trained model folder (the fold folder's parent)",
                                     "Without it the folds cannot be checked to belong to one dataset.")
            if fold.dataset != first.dataset:
                raise DPReleaseError(f"dataset of {fold.folder}", fold.dataset,
                                     f"{first.dataset!r}, the dataset of {first.folder}",
                                     "A release composes the folds of one dataset; give its fold folders only.")


def membership_groups(folds: Sequence[FoldRun]) -> dict[tuple[int, ...], int]:
    """{indices of the folds that train on a case: number of such cases}; folds with unknown cases join every group."""
    everywhere = tuple(i for i, f in enumerate(folds) if f.training_cases is None)
    cases = set(itertools.chain.from_iterable(f.training_cases for f in folds if f.training_cases is not None))
    groups: Counter[tuple[int, ...]] = Counter()
    for case in cases:
        groups[tuple(sorted({*everywhere, *(i for i, f in enumerate(folds)
                                            if f.training_cases is not None and case in f.training_cases)}))] += 1
    if not groups:
        groups[everywhere] = max(f.num_training_cases for f in folds)
    return dict(groups)


def common_delta(folds: Sequence[FoldRun], delta: float | None) -> tuple[float, str]:
    """The delta the composition is converted at: the given one, else the runs' (the smallest if they differ)."""
    if delta is not None:
        if not (0.0 < delta < 1.0):
            raise DPReleaseError("--delta", delta, "a number in (0, 1), e.g. 1e-5")
        check_delta(delta, max(f.num_training_cases for f in folds), key="--delta", source="nnUNetv2_dp_privacy")
        return float(delta), "given with --delta"
    deltas = sorted({f.delta for f in folds})
    if len(deltas) == 1:
        return deltas[0], "the fold runs' delta"
    return deltas[0], f"the smallest of the fold runs' deltas {deltas} (the strictest any run claimed)"


def _fold_entry(fold: FoldRun, delta: float) -> dict[str, Any]:
    return {"kind": "fold_run", "folder": fold.folder, "dataset": fold.dataset, "status": fold.status,
            "accountant": fold.accountant, "delta_of_run": fold.delta, "history": [list(h) for h in fold.history],
            "history_source": fold.history_source, "steps": sum(n for _, _, n in fold.history),
            "epsilon_reported": fold.epsilon_reported,
            "epsilon_alone": epsilon_of(fold.history, delta=delta, accountant=fold.accountant),  # type: ignore[arg-type]
            "num_training_cases": fold.num_training_cases, "membership": fold.membership_source,
            "private_randomness": fold.private_randomness}


def _selection_entry(selection: SelectionRun) -> dict[str, Any]:
    return {"kind": "selection", "source": selection.source, "epsilon_select": selection.epsilon_select,
            "delta": 0.0 if selection.epsilon_select is not None else None, "covered": not selection.problems,
            "problems": list(selection.problems), "composition": SELECTION_RULE}


def training_composition(folds: Sequence[FoldRun], delta: float) -> dict[str, Any]:
    """Epsilon of every fold-membership pattern and the worst one (the release's training epsilon)."""
    accountant = folds[0].accountant
    rows = []
    for members, count in sorted(membership_groups(folds).items()):
        history = [h for i in members for h in folds[i].history]
        rows.append({"folds": [folds[i].folder for i in members], "num_cases": count,
                     "epsilon": epsilon_of(history, delta=delta, accountant=accountant)})  # type: ignore[arg-type]
    worst = max(rows, key=lambda r: r["epsilon"])
    return {"rule": TRAINING_RULE, "accountant": accountant, "epsilon": worst["epsilon"],
            "worst_case_folds": worst["folds"], "groups": rows}


def _problems(folds: Sequence[FoldRun], selection: SelectionRun | None) -> list[str]:
    out = [f"{f.folder}: private_randomness = {f.private_randomness} in privacy.json (a seeded run, or one that does "
           "not record it): the noise may be regenerated from the seed, so its epsilon does not hold"
           for f in folds if f.private_randomness is not True]
    return out + list(selection.problems if selection is not None else ())


def compose_release(folds: Sequence[FoldRun], selection: SelectionRun | None = None, *,
                    delta: float | None = None) -> dict[str, Any]:
    """release_privacy.json content: epsilon and delta of the release, the rule, and one entry per fold/selection."""
    check_folds(folds)
    at, delta_source = common_delta(folds, delta)
    training = training_composition(folds, at)
    problems = _problems(folds, selection)
    eps_select = 0.0 if selection is None else selection.epsilon_select
    covered = not problems and eps_select is not None
    breakdown = [_fold_entry(f, at) for f in folds] + ([] if selection is None else [_selection_entry(selection)])
    notes = [] if selection is not None else [NO_SELECTION]
    return {"epsilon": training["epsilon"] + eps_select if covered else None, "delta": at, "covered": covered,
            "not_covered": problems, "epsilon_training": training["epsilon"],
            "epsilon_select": None if selection is None else selection.epsilon_select,
            "accountant": training["accountant"], "delta_rule": f"{DELTA_RULE}; delta = {delta_source}",
            "composition": {"training": training, "selection": SELECTION_RULE}, "breakdown": breakdown,
            "notes": notes}


def format_release(report: dict[str, Any], path: str) -> str:
    """A few lines for the console."""
    lines = []
    for entry in report["breakdown"]:
        if entry["kind"] == "fold_run":
            lines.append(f"  fold run {entry['folder']}: {entry['steps']} steps, epsilon alone = "
                         f"{entry['epsilon_alone']:.4f}, N = {entry['num_training_cases']}, cases: "
                         f"{entry['membership']}")
        else:
            eps = entry["epsilon_select"]
            lines.append(f"  selection {entry['source']}: epsilon_select = "
                         f"{'not private' if eps is None else format(eps, 'g')}")
    training = report["composition"]["training"]
    lines.append(f"  training, worst case over cases ({len(training['worst_case_folds'])} fold run(s) contain it): "
                 f"epsilon = {training['epsilon']:.4f} ({training['accountant']})")
    lines.extend(f"  note: {n}" for n in report["notes"])
    if report["covered"]:
        head = f"Release: epsilon = {report['epsilon']:.4f} at delta = {report['delta']:g}"
    else:
        head = "Release: NOT covered by a privacy guarantee:\n" + "\n".join(f"  - {p}" for p in report["not_covered"])
    return "\n".join([head, *lines, f"Written to {path}"])
