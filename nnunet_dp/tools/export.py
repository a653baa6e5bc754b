"""nnUNetv2_dp_export: a zip with only the releasable files of a DP model, the release's epsilon and a model card.

nnU-Net's nnUNetv2_export_model_to_zip packs debug.json, progress.png, validation/summary.json,
dataset_fingerprint.json and the checkpoints as they are: unnoised statistics of the private cases (docs/invariants.md,
invariant 7). This command keeps nnU-Net's zip layout (paths relative to nnUNet_results, so
nnUNetv2_install_pretrained_model_from_zip installs it and nnUNetv2_predict uses it) and packs only
  <Dataset>/<trainer>__<plans>__<configuration>/plans.json, dataset.json
  .../fold_X/checkpoint_final.pth, privacy.json, dp_config.json (checkpoint_best.pth with --with-best)
  .../crossval_results_folds_<folds>/postprocessing.pkl, postprocessing.json (with --postprocessing)
  release_privacy.json and MODEL_CARD.md next to the model folder (the dataset folder for several configurations).
Checkpoints that still hold nnU-Net's logger (written by an older nnunet-dp) and postprocessing.json files with
validation scores go into the zip as cleaned copies; the user's files are only read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from nnunet_dp.nnunet.report import versions
from nnunet_dp.release import DPReleaseError, compose_release
from nnunet_dp.release_folders import RELEASE_JSON, load_fold, load_selection, read_privacy_json
from nnunet_dp.tools.model_card import BEST_NOTE, CARD_FILE, headline, model_card
from nnunet_dp.tools.release_files import (
    BEST_FILE,
    FOLD_FILES,
    MODEL_FILES,
    Entry,
    Model,
    checked_checkpoint,
    left_out,
    postprocessing_files,
)


@dataclass(frozen=True)
class Request:
    """What to export: nnUNetv2_dp_export's options."""

    output: str
    dataset: str
    configurations: tuple[str, ...]
    folds: tuple[int | str, ...] = (0, 1, 2, 3, 4)
    trainer: str = "nnUNetTrainerDP"
    plans: str = "nnUNetPlans"
    with_best: bool = False
    postprocessing: str | None = None  # folder with postprocessing.pkl/.json
    splits: str | None = None
    delta: float | None = None
    overwrite: bool = False
    allow_not_covered: bool = False


def locate(dataset: str, configurations: Sequence[str], trainer: str, plans: str,
           folds: Sequence[int | str]) -> Model:
    """The model folders nnU-Net's export would read (get_output_folder), checked to exist."""
    from nnunetv2.paths import nnUNet_results
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    if not nnUNet_results or not os.path.isdir(nnUNet_results):
        raise DPReleaseError("nnUNet_results", nnUNet_results, "the folder of trained models",
                             "export nnUNet_results as for nnUNetv2_train")
    try:
        name = maybe_convert_to_dataset_name(dataset)
    except RuntimeError as e:
        raise DPReleaseError("-d", dataset, "a dataset id or name known to nnU-Net", str(e)) from e
    model_dirs = tuple(get_output_folder(name, trainer, plans, c) for c in dict.fromkeys(configurations))
    fold_dirs = tuple(os.path.join(m, f"fold_{f}") for m in model_dirs for f in dict.fromkeys(folds))
    for folder in (*model_dirs, *fold_dirs):
        if not os.path.isdir(folder):
            raise DPReleaseError("-d/-c/-tr/-p/-f", folder, "an existing trained model folder",
                                 "Check the dataset, configuration, trainer (-tr), plans (-p) and folds (-f).")
    return Model(nnUNet_results, model_dirs, fold_dirs, tuple(dict.fromkeys(folds)))


def _file(folder: str, name: str, why: str) -> str:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise DPReleaseError(name, f"missing in {folder}", f"the file {why}", "Finish the training of this fold "
                             "(nnUNetv2_train ... --c) or leave the fold out with -f.")
    return path


def releasable_files(model: Model, with_best: bool) -> list[Entry]:
    """plans.json and dataset.json per model folder; per fold the final (and best) checkpoint, privacy.json, dp_config."""
    names = FOLD_FILES + ((BEST_FILE,) if with_best else ())
    out = [Entry(model.arc(p), p) for m in model.model_dirs for p in (_file(m, n, "nnU-Net writes") for n in MODEL_FILES)]
    for fold in model.fold_dirs:
        out += [Entry(model.arc(p), p) for p in (_file(fold, n, "a DP training writes") for n in names)]
    return out


def postprocessing_dir(model: Model) -> str:
    """Where nnU-Net keeps the postprocessing of these folds: crossval_results_folds_* (one configuration) or the
    ensemble folder (several; named as nnUNetv2_find_best_configuration names it)."""
    from nnunetv2.utilities.file_path_utilities import folds_tuple_to_string

    folds = folds_tuple_to_string(list(model.folds))
    if len(model.model_dirs) == 1:
        return f"{model.arc(model.model_dirs[0])}/crossval_results_folds_{folds}"
    names = "___".join(os.path.basename(m) for m in model.model_dirs)
    return f"{model.arc(os.path.dirname(model.model_dirs[0]))}/ensembles/ensemble___{names}___{folds}"


def compose(model: Model, postprocessing: str | None, splits: str | None, delta: float | None,
            with_best: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """release_privacy.json over exactly the packed folds (and selection), as nnUNetv2_dp_privacy composes it; fold
    and selection names are their paths in the zip. Also the folds' privacy.json."""
    reports = [read_privacy_json(f) for f in model.fold_dirs]
    folds = [dataclasses.replace(load_fold(f, splits), folder=model.arc(f)) for f in model.fold_dirs]
    selection, pp_assumptions = (None, []) if postprocessing is None else load_selection(postprocessing)
    if selection is not None:
        arc = f"{postprocessing_dir(model)}/postprocessing.json"
        selection = dataclasses.replace(selection, source=arc, problems=tuple(
            p.replace(selection.source, arc) for p in selection.problems))
    release = compose_release(folds, selection, delta=delta)
    release["assumptions"] = list(dict.fromkeys([a for r in reports for a in r["assumptions"]] + pp_assumptions))
    release["notes"] += [BEST_NOTE] if with_best else []
    return release, reports


def check_output(path: str, overwrite: bool) -> None:
    if os.path.isdir(path):
        raise DPReleaseError("-o", path, "a zip file name, not a folder")
    if os.path.exists(path) and not overwrite:
        raise DPReleaseError("-o", path, "a file that does not exist yet", "Pass --overwrite to replace it.")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise DPReleaseError("-o", path, "a file in an existing folder", f"Create {parent} first.")


@contextmanager
def zip_writer(path: str) -> Iterator[zipfile.ZipFile]:
    """A zip written to a temporary file and moved to `path` at the end: a failed export leaves no zip behind."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            yield zf
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def add(zf: zipfile.ZipFile, entry: Entry) -> Entry:
    """Write one entry (a checkpoint checked first, one in memory at a time); the entry without its bytes."""
    entry = checked_checkpoint(entry) if entry.arcname.endswith(".pth") else entry
    if entry.data is not None:
        zf.writestr(entry.arcname, entry.data)
    else:
        zf.write(entry.source, entry.arcname)
    return dataclasses.replace(entry, data=None)


def export(request: Request) -> tuple[list[Entry], list[str], dict[str, Any]]:
    """Check, compose and write the zip: (packed entries, what was left out, release_privacy.json content)."""
    r = request
    check_output(r.output, r.overwrite)
    model = locate(r.dataset, r.configurations, r.trainer, r.plans, r.folds)
    files = releasable_files(model, r.with_best)
    release, reports = compose(model, r.postprocessing, r.splits, r.delta, r.with_best)
    if not release["covered"] and not r.allow_not_covered:
        raise DPReleaseError("release", "NOT covered by a privacy guarantee", "a release covered by epsilon",
                             "Why:\n  - " + "\n  - ".join(release["not_covered"]) + "\nFix that, or pass "
                             "--allow-not-covered to pack it with NOT covered in release_privacy.json and the card.")
    if r.postprocessing is not None:
        files += postprocessing_files(r.postprocessing, postprocessing_dir(model))
    folder = os.path.commonpath([model.arc(m) for m in model.model_dirs])
    with zip_writer(r.output) as zf:
        files = [add(zf, e) for e in files]
        release = {"release": headline(release), **release, "packed": [e.arcname for e in files],
                   "versions": versions()}
        card = model_card(release, reports, [model.arc(f) for f in model.fold_dirs], r)
        files += [add(zf, Entry(f"{folder}/{RELEASE_JSON}", data=json.dumps(release, indent=2).encode())),
                  add(zf, Entry(f"{folder}/{CARD_FILE}", data=card.encode()))]
    packed = {os.path.abspath(e.source) for e in files if e.source is not None}
    return files, left_out(model, r.postprocessing, packed), release
