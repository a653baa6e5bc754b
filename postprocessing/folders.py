"""nnU-Net side of DP-Morph: dataset.json/plans, pairing prediction and reference folders, reading and scoring cases
in worker processes, and writing postprocessing.pkl / postprocessing.json as nnU-Net does."""
from __future__ import annotations

import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import load_json, save_json, save_pickle, subfiles
from nnunet_dp.postprocessing.errors import DPMorphError
from nnunet_dp.postprocessing.search import Candidate, case_dice, dice
from nnunetv2.imageio.base_reader_writer import BaseReaderWriter
from nnunetv2.postprocessing.remove_connected_components import apply_postprocessing
from nnunetv2.utilities.json_export import recursive_fix_for_json_export
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from tqdm import tqdm


@dataclass(frozen=True)
class DatasetInfo:
    """What the search needs from dataset.json and the plans (spacing in the files' array axis order)."""

    labels: tuple[int, ...]
    label_names: dict[int, str]
    ignore_label: int | None
    file_ending: str
    reader_writer: BaseReaderWriter
    median_spacing: tuple[float, ...]


def find_json(given: str | None, folder: str, name: str, option: str) -> str:
    """The given file, else `name` in the folder, its parent or grandparent (a fold's validation folder)."""
    if given is not None:
        if not os.path.isfile(given):
            raise DPMorphError(option, given, "an existing file")
        return given
    parent = os.path.dirname(os.path.abspath(folder))
    places = [folder, parent, os.path.dirname(parent)]
    for place in places:
        if os.path.isfile(os.path.join(place, name)):
            return os.path.join(place, name)
    raise DPMorphError(option, None, f"a {name}; none found in {places}", f"Pass {option} explicitly.")


def load_dataset_info(plans_file: str, dataset_json_file: str) -> DatasetInfo:
    plans_manager = PlansManager(plans_file)
    dataset_json = load_json(dataset_json_file)
    label_manager = plans_manager.get_label_manager(dataset_json)
    if label_manager.has_regions:
        raise DPMorphError("dataset.json regions_class_order", dataset_json.get("regions_class_order"),
                           "a label-based dataset (DP-Morph refines label maps class by class; regions are not "
                           "supported)")
    spacing_t = plans_manager.original_median_spacing_after_transp
    spacing = tuple(float(spacing_t[j]) for j in plans_manager.transpose_backward)  # back to the files' axis order
    names = {int(v): str(k) for k, v in dataset_json["labels"].items() if isinstance(v, int)}
    return DatasetInfo(tuple(int(i) for i in sorted(label_manager.foreground_labels)), names,
                       label_manager.ignore_label, dataset_json["file_ending"],
                       plans_manager.image_reader_writer_class(), spacing)


def check_folders(pred_folder: str, ref_folder: str) -> None:
    for option, folder in (("-i", pred_folder), ("-ref", ref_folder)):
        if not os.path.isdir(folder):
            raise DPMorphError(option, folder, "an existing folder")


def pair_cases(pred_folder: str, ref_folder: str, file_ending: str) -> list[tuple[str, str]]:
    """(prediction, reference) paths; every prediction needs a reference (extra references are fine)."""
    check_folders(pred_folder, ref_folder)
    preds = subfiles(pred_folder, suffix=file_ending, join=False)
    if not preds:
        raise DPMorphError("-i", pred_folder, f"a folder with predictions ending in {file_ending!r}; it is empty")
    refs = set(subfiles(ref_folder, suffix=file_ending, join=False))
    missing = [p for p in preds if p not in refs]
    if missing:
        raise DPMorphError("-ref", ref_folder, f"a reference for every prediction; missing for {len(missing)} of "
                           f"{len(preds)}: {missing[:5]}", "Prediction and reference folders must hold the same cases.")
    return [(os.path.join(pred_folder, p), os.path.join(ref_folder, p)) for p in preds]


def read_case(pred_file: str, ref_file: str, info: DatasetInfo) -> tuple[np.ndarray, np.ndarray]:
    """Prediction and reference label maps (nnU-Net's reader; channel axis dropped), checked against each other."""
    seg, ref = info.reader_writer.read_seg(pred_file)[0][0], info.reader_writer.read_seg(ref_file)[0][0]
    name = os.path.basename(pred_file)
    if seg.shape != ref.shape:
        raise DPMorphError(f"shape of {name}", seg.shape, f"the reference's shape {ref.shape}")
    allowed = {0, *info.labels}
    for what, array, extra in (("prediction", seg, set()), ("reference", ref, {info.ignore_label} - {None})):
        unknown = [int(v) if float(v).is_integer() else float(v)
                   for v in sorted(set(np.unique(array).tolist()) - allowed - extra)]
        if unknown:
            raise DPMorphError(f"labels in {what} {name}", unknown, f"labels of dataset.json {sorted(allowed | extra)}")
    return seg, ref


def score_case(pred_file: str, ref_file: str, info: DatasetInfo, candidates: Sequence[Candidate],
               spacing: Sequence[float] | None, slice_axis: int) -> tuple[np.ndarray, ...]:
    """search.case_dice on one case read from disk (runs in a worker): alone, every, kept, in_ref."""
    seg, ref = read_case(pred_file, ref_file, info)
    return case_dice(seg, ref, info.labels, candidates, spacing=spacing, slice_axis=slice_axis,
                     ignore_label=info.ignore_label, presence=True)


def final_case(pred_file: str, ref_file: str, info: DatasetInfo, pp_fns: list[Callable],
               pp_kwargs: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Dice per class before and after nnU-Net's own apply_postprocessing with the pkl content."""
    seg, ref = read_case(pred_file, ref_file, info)
    after = apply_postprocessing(seg, pp_fns, pp_kwargs)
    valid = None if info.ignore_label is None else ref != info.ignore_label
    scores = [[dice(s == label, ref == label, valid) for label in info.labels] for s in (seg, after)]
    return np.array(scores[0]), np.array(scores[1])


def _star(job: tuple[Callable, tuple]) -> Any:
    fn, args = job
    return fn(*args)


def map_cases(fn: Callable, jobs: Sequence[tuple], num_processes: int, desc: str) -> list:
    """fn(*job) for every job in order, with a progress bar; in this process when num_processes == 1."""
    if num_processes == 1 or len(jobs) == 1:
        return [fn(*job) for job in tqdm(jobs, desc=desc)]
    with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
        return list(tqdm(pool.imap(_star, [(fn, job) for job in jobs]), total=len(jobs), desc=desc))


BACKED_UP = ("postprocessing.pkl", "postprocessing.json", "postprocessing_scores.json")


def backup_previous(folder: str) -> list[str]:
    """Copy the files of an earlier determination in `folder` to <name>.bak-<time>[-<counter>] before anything is
    written there; a backup is never overwritten (the counter grows until every name is free). The paths made."""
    present = [name for name in BACKED_UP if os.path.isfile(os.path.join(folder, name))]
    if not present:
        return []
    stamp, counter = time.strftime("%Y%m%d-%H%M%S"), 0
    while True:
        suffix = f".bak-{stamp}" + (f"-{counter}" if counter else "")
        if not any(os.path.exists(os.path.join(folder, name + suffix)) for name in BACKED_UP):
            break
        counter += 1
    made = []
    for name in present:
        made.append(os.path.join(folder, name + suffix))
        shutil.copy2(os.path.join(folder, name), made[-1])
    return made


def write_postprocessing(folder: str, pp_fns: list[Callable], pp_kwargs: list[dict], summary: dict,
                         private_scores: dict | None = None) -> None:
    """postprocessing.pkl exactly as nnU-Net writes it ((fns, kwargs)) and postprocessing.json next to it.

    private_scores (only with private selection) goes to postprocessing_scores.json: it is not privatised. An older
    postprocessing_scores.json (kept by backup_previous) is removed when this choice has none, so it cannot pass for
    this choice's scores.
    """
    os.makedirs(folder, exist_ok=True)
    stale = os.path.join(folder, "postprocessing_scores.json")
    if private_scores is None and os.path.isfile(stale):
        os.remove(stale)
    save_pickle((pp_fns, pp_kwargs), os.path.join(folder, "postprocessing.pkl"))
    for name, content in (("postprocessing.json", summary), ("postprocessing_scores.json", private_scores)):
        if content is not None:
            recursive_fix_for_json_export(content)
            save_json(content, os.path.join(folder, name), sort_keys=False)
