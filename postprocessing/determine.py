"""determine_dp_morph: search DP-Morph on a folder of predictions and write postprocessing.pkl / .json.

Mirrors nnunetv2.postprocessing.remove_connected_components.determine_postprocessing: same folders and files, so
`nnUNetv2_apply_postprocessing -pp_pkl_file <folder>/postprocessing.pkl` (the command nnU-Net prints after
nnUNetv2_find_best_configuration) applies the result unchanged.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Literal

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunet_dp.postprocessing.errors import DPMorphError
from nnunet_dp.postprocessing.folders import (
    DatasetInfo,
    backup_previous,
    check_folders,
    final_case,
    find_json,
    load_dataset_info,
    map_cases,
    pair_cases,
    score_case,
    write_postprocessing,
)
from nnunet_dp.postprocessing.privacy import check_seed, selection_generator, selection_probabilities
from nnunet_dp.postprocessing.refine import Operation, Plane, refine_label_map
from nnunet_dp.postprocessing.report import build_summary, format_result, privacy_record
from nnunet_dp.postprocessing.search import MODES, Candidate, Mode, Selection, make_candidates, select

RadiusUnit = Literal["voxel", "mm"]
ALL_OPERATIONS: tuple[Operation, ...] = ("opening", "closing", "opening_closing", "closing_opening")


def _check_options(mode: str, radius_unit: str, margin: float, num_processes: int,
                   epsilon_select: float | None, seed: int | None) -> None:
    if mode not in MODES:
        raise DPMorphError("mode", mode, f"one of {list(MODES)}")
    if radius_unit not in ("voxel", "mm"):
        raise DPMorphError("radius_unit", radius_unit, "'voxel' or 'mm'")
    if not (np.isfinite(margin) and margin >= 0):
        raise DPMorphError("margin", margin, "a finite number >= 0 (Dice points, e.g. 0.001)")
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise DPMorphError("-np", num_processes, "an integer >= 1")
    if epsilon_select is not None:
        selection_probabilities(np.zeros(1), epsilon=epsilon_select, sensitivity=1.0)  # validates epsilon_select
    check_seed(seed)
    if seed is not None and epsilon_select is None:
        raise DPMorphError("seed", seed, "only together with -epsilon_select",
                           "Without -epsilon_select the best candidate is taken and nothing is drawn: drop -seed.")


def geometry(info: DatasetInfo, first_pred: str, planes: Sequence[Plane]) -> tuple[int, tuple[Plane, ...]]:
    """Slice axis (the coarsest axis, or a singleton axis of 2D data) and the planes that make sense for it."""
    shape = info.reader_writer.read_seg(first_pred)[0][0].shape
    singleton = [axis for axis, n in enumerate(shape) if n == 1]
    slice_axis = singleton[0] if singleton else int(np.argmax(info.median_spacing))
    usable = ("in_plane",) if singleton else ("in_plane", "volumetric")
    chosen = tuple(p for p in dict.fromkeys(planes) if p in usable)
    if not chosen:
        raise DPMorphError("planes", list(planes), f"one of {list(usable)} for images of shape {shape}",
                           "2D images (a singleton axis) only allow in_plane.")
    return slice_axis, chosen


def _connected_components(pred_folder: str, ref_folder: str, plans_file: str, dataset_json_file: str,
                          num_processes: int) -> tuple[list[Callable], list[dict], dict, str]:
    """nnU-Net's own determination first; DP-Morph is then searched on its postprocessed predictions."""
    from nnunetv2.postprocessing.remove_connected_components import determine_postprocessing

    fns, kwargs = determine_postprocessing(pred_folder, ref_folder, plans_file, dataset_json_file, num_processes,
                                           keep_postprocessed_files=True)
    cc_summary = load_json(os.path.join(pred_folder, "postprocessing.json"))
    return list(fns), list(kwargs), cc_summary, os.path.join(pred_folder, "postprocessed")


def _versions() -> dict[str, str]:
    out = {}
    for package in ("nnunet-dp", "nnunetv2", "numpy", "scipy", "edt"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "not installed"
    return out


def _settings(folders: tuple[str, str, str], mode: Mode, candidates: Sequence[Candidate], radius_unit: RadiusUnit,
              spacing: list[float] | None, slice_axis: int, margin: float, info: DatasetInfo) -> dict[str, Any]:
    ops = [c for c in candidates if c.operation != "none"]
    return {
        "mode": mode, "input_folder": os.path.abspath(folders[0]), "searched_folder": os.path.abspath(folders[1]),
        "reference_folder": os.path.abspath(folders[2]),
        "labels": {str(label): info.label_names.get(label, str(label)) for label in info.labels},
        "candidates": {"operations": list(dict.fromkeys(c.operation for c in ops)),
                       "radii": sorted({c.radius for c in ops}), "radius_unit": radius_unit,
                       "planes": list(dict.fromkeys(c.plane for c in ops)), "spacing": spacing,
                       "slice_axis": slice_axis},
        "margin": margin, "versions": _versions(),
    }


def _score(pairs: list[tuple[str, str]], info: DatasetInfo, candidates: list[Candidate], spacing: list[float] | None,
           slice_axis: int, num_processes: int) -> tuple[np.ndarray, ...]:
    """Per-case arrays [n_cases, n_candidates, n_labels]: Dice with the class refined alone / all classes refined,
    whether the class keeps a voxel (all refined); and [n_cases, n_labels]: whether the reference has the class."""
    scores = map_cases(score_case, [(p, r, info, candidates, spacing, slice_axis) for p, r in pairs],
                       num_processes, "DP-Morph: scoring candidates")
    return tuple(np.stack([s[i] for s in scores]) for i in range(4))


def _select(scores: tuple[np.ndarray, ...], labels: Sequence[int], candidates: list[Candidate], mode: Mode,
            margin: float, epsilon_select: float | None, seed: int | None) -> Selection:
    """The selection. A private one draws from fresh OS entropy unless seeded; the seed is never returned (inv. 8)."""
    rng = None if epsilon_select is None else selection_generator(seed)
    alone, every, kept, in_ref = scores
    return select(alone, every, labels, candidates, mode=mode, margin=margin, epsilon_select=epsilon_select, rng=rng,
                  presence=(kept, in_ref))


def _backup(folders: Sequence[str]) -> None:
    """Keep an earlier determination's files (nnU-Net's connected-component step writes into -i as well)."""
    for folder in dict.fromkeys(folders):
        for path in backup_previous(folder):
            print(f"DP-Morph: kept the previous {os.path.basename(path).split('.bak-')[0]} as {path}")


def determine_dp_morph(folder_predictions: str, folder_ref: str, plans_file: str | None = None,
                       dataset_json_file: str | None = None, num_processes: int = 2, *, mode: Mode = "adaptive",
                       operations: Sequence[Operation] = ALL_OPERATIONS, radii: Sequence[float] = (1, 2, 3),
                       radius_unit: RadiusUnit = "voxel", planes: Sequence[Plane] = ("in_plane", "volumetric"),
                       margin: float = 0.001, epsilon_select: float | None = None, seed: int | None = None,
                       with_connected_components: bool = False,
                       output_folder: str | None = None) -> tuple[list[Callable], list[dict]]:
    """Search DP-Morph, write <output_folder or folder_predictions>/postprocessing.pkl and .json; return the pkl.

    Private selection (epsilon_select) draws from fresh OS entropy. seed makes it reproducible and NOT private: the
    json then says private_randomness false. The seed itself is never written (invariant 8).
    """
    _check_options(mode, radius_unit, margin, num_processes, epsilon_select, seed)
    candidates = make_candidates(operations, radii, planes)
    check_folders(folder_predictions, folder_ref)  # before looking for plans.json beside -i
    plans_file = find_json(plans_file, folder_predictions, "plans.json", "-plans_json")
    dataset_json_file = find_json(dataset_json_file, folder_predictions, "dataset.json", "-dataset_json")
    info = load_dataset_info(plans_file, dataset_json_file)
    pairs = search_pairs = pair_cases(folder_predictions, folder_ref, info.file_ending)
    slice_axis, usable = geometry(info, pairs[0][0], planes)
    candidates = [c for c in candidates if c.plane in usable or c.operation == "none"]
    cc_fns, cc_kwargs, cc_summary, searched = [], [], None, folder_predictions
    _backup([output_folder or folder_predictions, *([folder_predictions] if with_connected_components else [])])
    if with_connected_components:
        cc_fns, cc_kwargs, cc_summary, searched = _connected_components(
            folder_predictions, folder_ref, plans_file, dataset_json_file, num_processes)
        search_pairs = pair_cases(searched, folder_ref, info.file_ending)
    spacing = list(info.median_spacing) if radius_unit == "mm" else None
    scores = _score(search_pairs, info, candidates, spacing, slice_axis, num_processes)
    alone, every = scores[:2]
    selection = _select(scores, info.labels, candidates, mode, margin, epsilon_select, seed)
    kwargs = {"steps": [s.to_kwargs() for s in selection.steps], "spacing": spacing, "slice_axis": slice_axis}
    pp_fns, pp_kwargs = (cc_fns + [refine_label_map], cc_kwargs + [kwargs]) if selection.steps else (cc_fns, cc_kwargs)
    finals = map_cases(final_case, [(p, r, info, pp_fns, pp_kwargs) for p, r in pairs], num_processes,
                       "DP-Morph: checking the result")
    settings = _settings((folder_predictions, searched, folder_ref), mode, candidates, radius_unit, spacing,
                         slice_axis, margin, info)
    privacy = privacy_record(epsilon_select, len(search_pairs), len(info.labels) if mode == "adaptive" else 1,
                             with_connected_components, seeded=seed is not None)
    main, scores = build_summary(settings, privacy, selection, candidates, (alone, every),
                                 (np.stack([f[0] for f in finals]), np.stack([f[1] for f in finals])),
                                 (pp_fns, pp_kwargs), cc_summary)
    write_postprocessing(output_folder or folder_predictions, pp_fns, pp_kwargs, main, scores)
    print(format_result(main, output_folder or folder_predictions))
    return pp_fns, pp_kwargs
