"""End to end on tiny folders: nnUNetv2_dp_determine_postprocessing writes a pkl that nnU-Net's own
nnUNetv2_apply_postprocessing applies unchanged; bad input stops with a clear message."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from batchgenerators.utilities.file_and_folder_operations import load_pickle
from dpmorph_helpers import make_case, write_label_map, write_model_folder
from nnunet_dp.postprocessing.determine import determine_dp_morph
from nnunet_dp.postprocessing.refine import refine_label_map
from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
from nnunetv2.postprocessing.remove_connected_components import remove_all_but_largest_component_from_segmentation

from nnunet_dp.commands.determine_postprocessing import main
from nnunet_dp.errors import DPError

APPLY = os.path.join(os.path.dirname(sys.executable), "nnUNetv2_apply_postprocessing")


def read(path: Path) -> np.ndarray:
    return SimpleITKIO().read_seg(str(path))[0][0]


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    tp, fp, fn, _ = compute_tp_fp_fn_tn(ref, pred)
    return 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def mean_dice(folder: Path, gt: Path, labels=(1, 2, 3)) -> np.ndarray:
    files = sorted(p.name for p in gt.glob("*.nii.gz"))
    return np.array([[dice(read(folder / f) == label, read(gt / f) == label) for label in labels]
                     for f in files]).mean(axis=0)


def test_adaptive_pkl_is_applied_unchanged_by_nnunet(tiny_model, tmp_path):
    validation, gt = tiny_model["validation"], tiny_model["gt"]
    main(["-i", str(validation), "-ref", str(gt), "-np", "1", "-radii", "1", "2"])  # plans/dataset.json found in ../..
    fns, kwargs = load_pickle(str(validation / "postprocessing.pkl"))
    assert [f"{f.__module__}.{f.__name__}" for f in fns] == ["nnunet_dp.postprocessing.refine.refine_label_map"]
    record = json.loads((validation / "postprocessing.json").read_text())["dp_morph"]
    assert record["choice"]["3"]["operation"] == "none"
    assert record["privacy"]["private_selection"] is False
    assert len(record["candidate_dice"]) == 1 + 4 * 2 * 2
    out = tmp_path / "applied"
    subprocess.run([APPLY, "-i", str(validation), "-o", str(out), "-pp_pkl_file",
                    str(validation / "postprocessing.pkl"),
                    "-np", "1", "-plans_json", str(tiny_model["root"] / "plans.json"),
                    "-dataset_json", str(tiny_model["root"] / "dataset.json")], check=True, capture_output=True)
    for case in sorted(gt.glob("*.nii.gz")):
        assert np.array_equal(read(out / case.name), refine_label_map(read(validation / case.name), **kwargs[0]))
    before, after = mean_dice(validation, gt), mean_dice(out, gt)
    assert np.all(after >= before) and after.mean() > before.mean()
    assert np.allclose(after, [record["dice_after"][k] for k in ("1", "2", "3")])


def test_global_mode_on_a_crossval_folder_writes_to_o(tiny_model, tmp_path):
    crossval = tiny_model["root"] / "crossval_results_folds_0"
    shutil.copytree(tiny_model["validation"], crossval)
    for name in ("plans.json", "dataset.json"):
        shutil.copy(tiny_model["root"] / name, crossval / name)
    out = tmp_path / "pp_global"
    _, kwargs = determine_dp_morph(str(crossval), str(tiny_model["gt"]), num_processes=1, mode="global",
                                   operations=["opening", "closing"], radii=[1, 2], output_folder=str(out))
    assert (out / "postprocessing.pkl").is_file() and not (crossval / "postprocessing.pkl").exists()
    steps = kwargs[0]["steps"]
    assert len({(s["operation"], s["radius"], s["plane"]) for s in steps}) == 1 and len(steps) == 3
    record = json.loads((out / "postprocessing.json").read_text())["dp_morph"]
    assert record["dice_after"]["foreground_mean"] > record["dice_before"]["foreground_mean"]


def test_with_connected_components_one_pkl_holds_both(tmp_path):
    # binary (class 1 only) keeps nnU-Net's determination short: salt speckle makes keep-largest-component win,
    # then two holes inside the ball leave work for a closing
    cases = {}
    for i in range(3):
        ref, pred = (np.where(a == 1, 1, 0).astype(np.uint8) for a in make_case(i))
        centre = np.round(np.argwhere(ref == 1).mean(axis=0)).astype(int)
        pred[tuple(centre)] = pred[tuple(centre + [0, 0, 2])] = 0
        cases[f"case_{i}"] = (ref, pred)
    paths = write_model_folder(tmp_path / "model", cases, labels={"background": 0, "speckled": 1})
    validation, gt = paths["validation"], paths["gt"]
    fns, kwargs = determine_dp_morph(str(validation), str(gt), num_processes=1, operations=["closing"], radii=[1],
                                     planes=["volumetric"], margin=0.0, with_connected_components=True)
    assert fns[0] is remove_all_but_largest_component_from_segmentation
    record = json.loads((validation / "postprocessing.json").read_text())
    assert record["nnunet_connected_components"]["postprocessing_fns"] == [f.__name__ for f in fns if f is fns[0]]
    assert record["postprocessing_fns"][-1] == "nnunet_dp.postprocessing.refine.refine_label_map"
    out = tmp_path / "applied"
    subprocess.run([APPLY, "-i", str(validation), "-o", str(out), "-pp_pkl_file",
                    str(validation / "postprocessing.pkl"),
                    "-np", "1", "-plans_json", str(paths["root"] / "plans.json"),
                    "-dataset_json", str(paths["root"] / "dataset.json")], check=True, capture_output=True)
    for name in cases:
        expected = read(validation / f"{name}.nii.gz")
        for fn, kw in zip(fns[:-1], kwargs[:-1]):
            expected = fn(expected, **kw)
        assert np.array_equal(read(out / f"{name}.nii.gz"), refine_label_map(expected, **kwargs[-1]))


def test_private_selection_records_epsilon_and_withholds_scores(tiny_model):
    validation, gt = tiny_model["validation"], tiny_model["gt"]
    determine_dp_morph(str(validation), str(gt), num_processes=1, radii=[1], planes=["volumetric"],
                       epsilon_select=2.0)
    record = json.loads((validation / "postprocessing.json").read_text())["dp_morph"]
    privacy = record["privacy"]
    assert privacy["private_selection"] is True and privacy["epsilon_select"] == 2.0
    assert privacy["private_randomness"] is True and "seed" not in privacy
    assert privacy["sensitivity"] == pytest.approx(1 / 4) and privacy["epsilon_per_selection"] == pytest.approx(2 / 3)
    assert "candidate_dice" not in record and "dice_after" not in record
    scores = json.loads((validation / "postprocessing_scores.json").read_text())
    assert "NOT privatised" in scores["note"] and len(scores["candidate_dice"]) == 5


def run_cli_error(capsys, args) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return str(exit_info.value.code)


def test_bad_input_stops_with_the_setting_the_value_and_what_is_allowed(tiny_model, tmp_path, capsys):
    validation, gt = tiny_model["validation"], tiny_model["gt"]
    base = ["-ref", str(gt), "-np", "1"]
    assert "radii = 0.0" in run_cli_error(capsys, ["-i", str(validation), *base, "-radii", "0"])
    assert "radii = -1.0" in run_cli_error(capsys, ["-i", str(validation), *base, "-radii", "1", "-1"])
    empty = tmp_path / "empty"
    empty.mkdir()
    message = run_cli_error(capsys, ["-i", str(empty), *base, "-plans_json", str(tiny_model["root"] / "plans.json"),
                                     "-dataset_json", str(tiny_model["root"] / "dataset.json")])
    assert "it is empty" in message
    assert "epsilon_select" in run_cli_error(capsys, ["-i", str(validation), *base, "-epsilon_select", "0"])
    assert "margin" in run_cli_error(capsys, ["-i", str(validation), *base, "-margin", "-0.1"])


def test_case_sets_shapes_and_labels_are_checked(tmp_path):
    cases = {f"case_{i}": make_case(i) for i in range(2)}
    paths = write_model_folder(tmp_path / "model", cases)
    validation, gt = paths["validation"], paths["gt"]
    (gt / "case_1.nii.gz").unlink()
    with pytest.raises(DPError, match=r"missing for 1 of 2: \['case_1.nii.gz'\]"):
        determine_dp_morph(str(validation), str(gt), num_processes=1)
    ref, pred = cases["case_1"]
    write_label_map(ref[:, :, :-1], gt / "case_1.nii.gz")
    with pytest.raises(DPError, match=r"shape of case_1.nii.gz = \(12, 18, 54\)"):
        determine_dp_morph(str(validation), str(gt), num_processes=1)
    write_label_map(ref, gt / "case_1.nii.gz")
    write_label_map(np.where(pred == 3, 7, pred).astype(np.uint8), validation / "case_1.nii.gz")
    with pytest.raises(DPError, match=r"labels in prediction case_1.nii.gz = \[7\]"):
        determine_dp_morph(str(validation), str(gt), num_processes=2)  # raised in a worker, still intact


def test_region_datasets_are_refused(tmp_path):
    labels = {"background": 0, "whole": [1, 2], "core": 2}
    paths = write_model_folder(tmp_path / "model", {"case_0": make_case(0)}, labels=labels)
    dataset = json.loads((paths["root"] / "dataset.json").read_text())
    dataset["regions_class_order"] = [1, 2]
    (paths["root"] / "dataset.json").write_text(json.dumps(dataset))
    with pytest.raises(DPError, match="regions"):
        determine_dp_morph(str(paths["validation"]), str(paths["gt"]), num_processes=1)
