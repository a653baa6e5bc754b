"""The privacy of trained fold folders as a release sees it: privacy.json, the step journal, the fold's training cases
(splits_final.json) and a DP-Morph selection, read into nnunet_dp.release's FoldRun / SelectionRun."""

from __future__ import annotations

import json
import os
import re
from typing import Any

from nnunet_dp.errors import DPLedgerError
from nnunet_dp.journal import JOURNAL_FILE, ever_seeded, read_history, total_steps
from nnunet_dp.release import (
    DPReleaseError,
    FoldRun,
    SelectionRun,
    selection_from_summary,
)

RELEASE_JSON = "release_privacy.json"


_REQUIRED = ("epsilon", "delta", "accountant", "steps", "noise_multiplier", "sampling_rate", "rule", "clip_norm",
             "num_training_cases", "status", "assumptions")


def read_privacy_json(folder: str) -> dict[str, Any]:
    """privacy.json of a DP fold folder; stops with a message naming the folder when it is missing or not one."""
    path = os.path.join(folder, "privacy.json")
    if not os.path.isfile(path):
        raise DPReleaseError("FOLD_DIR", folder, "the fold folder of a DP trainer run (with privacy.json)",
                             _no_privacy_json(folder))
    try:
        with open(path) as f:
            rep = json.load(f)
        missing = [k for k in _REQUIRED if k not in rep]
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError) as e:
        raise DPReleaseError(path, f"{type(e).__name__}: {e}", "a readable privacy.json",
                             "It may be truncated (not valid JSON). Rerun the training with --c to rewrite it.") from e
    if missing:
        raise DPReleaseError(path, f"lacks {', '.join(missing)}", "a privacy.json written by an nnunet-dp trainer",
                             "Give the fold folders of DP trainer runs only.")
    return rep


def _no_privacy_json(folder: str) -> str:
    """What to do when `folder` has no privacy.json: it does not exist, it is the model folder (pick its folds), or
    it is not a DP run."""
    if not os.path.isdir(folder):
        return f"{folder!r} does not exist."
    folds = sorted(f for f in os.listdir(folder) if re.fullmatch(r"fold_(\d+|all)", f)
                   and os.path.isfile(os.path.join(folder, f, "privacy.json")))
    if folds:
        return (f"{folder!r} is a trained model folder; give its fold folders: pick one or more of "
                + ", ".join(os.path.join(folder, f) for f in folds) + ".")
    return f"No privacy.json in {folder!r}: is this the fold folder of a DP trainer run?"


def fold_summary(folder: str, rep: dict[str, Any]) -> str:
    return (f"{folder}: epsilon = {rep['epsilon']:.4f} at delta = {rep['delta']} ({rep['accountant']}), "
            f"{rep['steps']} steps, sigma = {rep['noise_multiplier']:.4f}, q = {rep['sampling_rate']:.4f}, "
            f"rule = {rep['rule']}, C = {rep['clip_norm']}, N = {rep['num_training_cases']}, status: {rep['status']}")


def _history(folder: str, rep: dict[str, Any]) -> tuple[tuple[tuple[float, float, int], ...], str]:
    """Every step the folder ran: the journal (write-ahead, crashed runs included) or privacy.json's ledger,
    whichever knows more steps; (sigma, q, steps) of privacy.json for files without a ledger history."""
    ledger = rep.get("ledger_history")
    ledger = [(float(s), float(q), int(n)) for s, q, n in ledger] if ledger is not None else \
        [(float(rep["noise_multiplier"]), float(rep["sampling_rate"]), int(rep["steps"]))]
    try:
        journal = read_history(os.path.join(folder, JOURNAL_FILE))
    except DPLedgerError as e:
        raise DPReleaseError(f"{JOURNAL_FILE} in {folder}", "damaged", "a readable privacy journal", str(e)) from e
    if journal and total_steps(journal) >= total_steps(ledger):
        return tuple(journal), JOURNAL_FILE
    return tuple(ledger), "privacy.json ledger_history" if "ledger_history" in rep else "privacy.json steps"


def _read_optional_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _dataset(folder: str) -> str | None:
    plans = _read_optional_json(os.path.join(os.path.dirname(os.path.abspath(folder)), "plans.json"))
    return plans.get("dataset_name") if isinstance(plans, dict) else None


def _splits_file(folder: str, given: str | None, dataset: str | None) -> tuple[str | None, list[str]]:
    """--splits, else splits_final.json where nnU-Net's debug.json says the run's preprocessed data were, else in
    $nnUNet_preprocessed/<dataset>; (None, the places looked in) when there is none."""
    if given is not None:
        if not os.path.isfile(given):
            raise DPReleaseError("--splits", given, "an existing splits_final.json")
        return given, [given]
    debug = _read_optional_json(os.path.join(folder, "debug.json"))
    places = [os.path.join(p, "splits_final.json") for p in (
        debug.get("preprocessed_dataset_folder_base") if isinstance(debug, dict) else None,
        os.path.join(os.environ["nnUNet_preprocessed"], dataset)
        if dataset and os.environ.get("nnUNet_preprocessed") else None) if p]
    return next((p for p in places if os.path.isfile(p)), None), places


def _membership(folder: str, rep: dict[str, Any], splits: str | None,
                looked: list[str]) -> tuple[frozenset[str] | None, str]:
    """The fold's training cases from splits_final.json (None: every case, an upper bound) and where they came from."""
    match = re.fullmatch(r"fold_(\d+|all)", os.path.basename(os.path.normpath(folder)))
    if match is None or match.group(1) == "all":
        why = "fold 'all' trains on every case" if match else "folder not named fold_N: assumed to hold every case"
        return None, why
    if splits is None:
        return None, f"no splits_final.json (looked in {looked}; pass --splits): assumed to hold every case (upper bound)"
    fold, table = int(match.group(1)), _read_optional_json(splits)
    if not isinstance(table, list) or not all(isinstance(s, dict) and isinstance(s.get("train"), list) for s in table):
        raise DPReleaseError("splits file", splits, "nnU-Net's splits_final.json: a list of {train: [...], val: [...]}")
    if fold >= len(table):
        return None, f"fold {fold} not in {splits} (nnU-Net used a random 80:20 split): assumed to hold every case"
    cases = frozenset(str(c) for c in table[fold]["train"])
    if len(cases) != int(rep["num_training_cases"]):
        raise DPReleaseError(f"training cases of fold {fold} in {splits}", len(cases),
                             f"num_training_cases = {rep['num_training_cases']} of {folder}/privacy.json",
                             "This is not the split the run trained with: pass the right file with --splits.")
    return cases, f"{splits}, fold {fold}"


def _private_randomness(folder: str, rep: dict[str, Any]) -> bool | None:
    """privacy.json's private_randomness, False when any session of the folder's journal was seeded (a resume
    without the seed does not make a seeded folder private)."""
    if ever_seeded(os.path.join(folder, JOURNAL_FILE)):
        return False
    return rep.get("private_randomness")


def load_fold(folder: str, splits: str | None = None) -> FoldRun:
    rep = read_privacy_json(folder)
    history, source = _history(folder, rep)
    dataset = _dataset(folder)
    cases, membership = _membership(folder, rep, *_splits_file(folder, splits, dataset))
    return FoldRun(folder=folder, history=history, history_source=source, accountant=str(rep["accountant"]),
                   delta=float(rep["delta"]), epsilon_reported=float(rep["epsilon"]), dataset=dataset,
                   num_training_cases=int(rep["num_training_cases"]), training_cases=cases,
                   membership_source=membership, private_randomness=_private_randomness(folder, rep),
                   status=str(rep["status"]))


def load_selection(path: str) -> tuple[SelectionRun, list[str]]:
    """The selection in a postprocessing folder (or its postprocessing.pkl/.json) and its assumptions."""
    folder = os.path.dirname(path) if os.path.isfile(path) else path
    if not (os.path.isfile(os.path.join(folder, "postprocessing.pkl"))
            or os.path.isfile(os.path.join(folder, "postprocessing.json"))):
        raise DPReleaseError("--postprocessing", path, "a folder with postprocessing.pkl and postprocessing.json "
                             "(written by nnUNetv2_dp_determine_postprocessing)")
    json_path = os.path.join(folder, "postprocessing.json")
    summary = _read_optional_json(json_path) if os.path.isfile(json_path) else None
    if os.path.isfile(json_path) and summary is None:
        raise DPReleaseError(json_path, "unreadable", "valid JSON", "Rerun the determination to rewrite it.")
    privacy = (summary or {}).get("dp_morph", {}).get("privacy", {}) if isinstance(summary, dict) else {}
    return selection_from_summary(json_path, summary), list(privacy.get("assumptions", []))
