"""Where a trained fold lives (-d -c -f -tr -p), with errors that name the option, the value and what exists.

Environment variables are read when called (not when nnunetv2 is imported), so the commands can run in-process.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from os.path import isdir, join

from nnunet_dp.errors import DPError


class AuditInputError(DPError):
    """Bad input to nnUNetv2_dp_audit; the message names the option, the value seen and what is allowed."""


@dataclass(frozen=True)
class Fold:
    dataset: str  # DatasetXXX_Name
    configuration: str
    trainer: str
    plans: str
    fold: int | str
    model_folder: str  # $nnUNet_results/DatasetXXX_Name/TRAINER__PLANS__CONF
    fold_folder: str  # model_folder/fold_F


def env_folder(var: str) -> str:
    root = os.environ.get(var)
    if not root or not isdir(root):
        raise AuditInputError(f"environment variable {var} = {root!r} is not an existing folder: set it as for "
                              "nnUNetv2_train (nnU-Net's documentation/setting_up_paths.md)")
    return root


def dataset_name(dataset: str, roots: list[str]) -> str:
    """-d as an id (4) or a name (Dataset004_Hippocampus), found in the first of `roots` that holds it."""
    if not (dataset.isdigit() or dataset.startswith("Dataset")):
        raise AuditInputError(f"-d {dataset!r} is not allowed: a dataset id (e.g. 4) or name (Dataset004_Hippocampus)")
    for root in roots:
        names = sorted(n for n in os.listdir(root) if isdir(join(root, n)) and (
            n == dataset if dataset.startswith("Dataset") else n.startswith(f"Dataset{int(dataset):03d}_")))
        if len(names) > 1:
            raise AuditInputError(f"-d {dataset}: several datasets with this id in {root}: {', '.join(names)}; give "
                                  "the full name")
        if names:
            return names[0]
    raise AuditInputError(f"-d {dataset}: no such dataset in {' or '.join(roots)}")


def locate_fold(dataset: str, configuration: str, fold: int | str, trainer: str, plans: str) -> Fold:
    """The fold folder of a finished (or running) training; missing pieces stop with what exists instead."""
    results = env_folder("nnUNet_results")
    name = dataset_name(dataset, [results])
    model_folder = join(results, name, f"{trainer}__{plans}__{configuration}")
    if not isdir(model_folder):
        have = sorted(n for n in os.listdir(join(results, name)) if isdir(join(results, name, n)))
        raise AuditInputError(f"-tr {trainer} -p {plans} -c {configuration}: no model folder {model_folder}; trained "
                              f"models of {name}: {', '.join(have) or 'none'} (TRAINER__PLANS__CONFIGURATION)")
    fold_folder = join(model_folder, f"fold_{fold}")
    if not isdir(fold_folder):
        have = sorted(n.removeprefix("fold_") for n in os.listdir(model_folder) if n.startswith("fold_"))
        raise AuditInputError(f"-f {fold}: no fold folder {fold_folder}; folds trained here: {', '.join(have) or 'none'}")
    return Fold(dataset=name, configuration=configuration, trainer=trainer, plans=plans, fold=fold,
                model_folder=model_folder, fold_folder=fold_folder)


def load_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AuditInputError(f"{what} {path} cannot be read ({type(e).__name__}: {e})") from None


def output_folder(out: str | None, default: str) -> str:
    """-o (created when missing) or the default folder."""
    folder = out or default
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise AuditInputError(f"-o {out}: cannot create it ({e.strerror}); give a writable folder") from None
    if not os.access(folder, os.W_OK):
        raise AuditInputError(f"-o {folder}: not writable; give a writable folder")
    return folder
