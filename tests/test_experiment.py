"""nnUNetv2_dp_experiment: the held-out split, the DP-Morph choice blind to test labels, and a minimal end-to-end
run (non-private + flat at one ε, all three refinements) with resume."""
from __future__ import annotations

import csv
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from e2e import nnunet_env, run

from nnunet_dp.nnunet.experiment_plan import (
    BUDGETS,
    ExperimentError,
    dp_settings,
    resolve_budget,
    run_grid,
    split_cases,
)
from nnunet_dp.nnunet.experiment_run import choose_and_apply
from nnunet_dp.nnunet.synthetic import make_dataset

DATASET_ID = 977
MINIMAL = {"num_epochs": 1, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1, "batch_size": 4,
           "save_every": 1, "features_per_stage": [8, 16]}


def test_split_is_deterministic_disjoint_and_complete():
    cases = [f"case_{i:03d}" for i in range(50)]
    a = split_cases(cases, test_fraction=0.2, seed=3)
    b = split_cases(list(reversed(cases)), test_fraction=0.2, seed=3)
    assert a == b
    assert len(a["test"]) == 10 and len(a["val"]) == 8 and len(a["train"]) == 32
    parts = [set(a[k]) for k in ("test", "val", "train")]
    assert sum(len(p) for p in parts) == 50 and set.union(*parts) == set(cases)
    assert split_cases(cases, test_fraction=0.2, seed=4)["test"] != a["test"]


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1])
def test_bad_test_fraction_names_the_option(bad):
    with pytest.raises(ExperimentError, match="--test-fraction"):
        split_cases(["a", "b", "c", "d", "e"], test_fraction=bad)


def test_run_grid_and_settings():
    specs = run_grid(["flat", "nonprivate", "psac"], [1, 8])
    assert [s.name for s in specs] == ["nonprivate", "flat_eps1", "flat_eps8", "psac_eps1", "psac_eps8"]
    with pytest.raises(ExperimentError, match="--rules.*'clip'"):
        run_grid(["clip"], [1])
    with pytest.raises(ExperimentError, match="--epsilons"):
        run_grid(["flat"], [0])
    dp = dp_settings(specs[1], BUDGETS["tiny"], seed=5)
    assert dp["target_epsilon"] == 1 and dp["expected_batch_size"] == BUDGETS["tiny"].batch_size and dp["seed"] == 5
    base = dp_settings(specs[0], BUDGETS["tiny"], seed=5)
    assert base["batch_size"] == dp["expected_batch_size"] and base["num_epochs"] == dp["num_epochs"]
    assert base["num_iterations_per_epoch"] == dp["num_iterations_per_epoch"]
    with pytest.raises(ExperimentError, match="--budget"):
        resolve_budget("huge")


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiment")
    make_dataset(str(root / "raw"), dataset_id=DATASET_ID, name="ExpTest", num_train=16, num_test=0,
                 shape=(32, 32), seed=DATASET_ID)
    (root / "minimal.json").write_text(json.dumps(MINIMAL))
    out = root / "out"
    cmd = ["nnUNetv2_dp_experiment", "-d", str(DATASET_ID), "-c", "2d", "--rules", "nonprivate", "flat",
           "--epsilons", "8", "--budget", str(root / "minimal.json"), "-o", str(out), "-device", "cpu", "-np", "1"]
    env = nnunet_env(root)
    first = run(cmd, env)
    return {"root": root, "out": out, "cmd": cmd, "env": env, "first": first}


def test_end_to_end_files_plots_and_dice(experiment):
    out = experiment["out"]
    assert "Results:" in experiment["first"].stdout
    for name in ("results.csv", "results.md", "split.json", "dice_vs_epsilon.png", "adaptive_gain_per_class.png"):
        assert (out / name).is_file(), name
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert {(r["run"], r["refinement"]) for r in table} == {
        (run_, ref) for run_ in ("nonprivate", "flat_eps8") for ref in ("none", "global", "adaptive")}
    for row in table:
        for key in ("dice_disk", "dice_ring", "dice_mean"):
            assert 0.0 <= float(row[key]) <= 1.0
    flat = json.loads((out / "runs" / "flat_eps8" / "result.json").read_text())
    assert flat["epsilon"] <= 8.0 and flat["steps"] == 2 and flat["noise_multiplier"] > 0
    split = json.loads((out / "split.json").read_text())
    splits_final = json.loads((out / "nnUNet_preprocessed" / "Dataset977_ExpTest" / "splits_final.json").read_text())
    assert set(split["test"]).isdisjoint(splits_final[0]["train"] + splits_final[0]["val"])
    validated = {f.split(".")[0] for f in os.listdir(Path(flat["model_folder"]) / "fold_0" / "validation")
                 if f.endswith(".nii.gz")}
    assert validated == set(split["val"])
    tested = {f.split(".")[0] for f in os.listdir(out / "runs" / "flat_eps8" / "test" / "adaptive")
              if f.endswith(".nii.gz")}
    assert tested == set(split["test"])


def test_second_invocation_skips_finished_runs(experiment):
    out = experiment["out"]
    ckpts = [Path(json.loads((out / "runs" / r / "result.json").read_text())["model_folder"]) / "fold_0" /
             "checkpoint_final.pth" for r in ("nonprivate", "flat_eps8")]
    before = [c.stat().st_mtime_ns for c in ckpts]
    again = run(experiment["cmd"], experiment["env"])
    assert again.stdout.count("finished earlier, skipped") == 2
    assert "nnUNetv2_train" not in again.stdout
    assert [c.stat().st_mtime_ns for c in ckpts] == before
    assert (out / "results.md").is_file()


def _scramble_labels(folder: Path, cases: list[str], seed: int) -> None:
    """Overwrite these cases' label files with random labels (same geometry)."""
    rng = np.random.default_rng(seed)
    for case in cases:
        path = folder / f"{case}.nii.gz"
        img = sitk.ReadImage(str(path.resolve()))
        arr = rng.integers(0, 3, sitk.GetArrayFromImage(img).shape).astype(np.uint8)
        new = sitk.GetImageFromArray(arr)
        new.CopyInformation(img)
        path.unlink()
        sitk.WriteImage(new, str(path))


def test_dpmorph_choice_does_not_depend_on_test_labels(experiment, tmp_path):
    """By construction: scramble every copy of the test labels (the test folder and the test cases' entries in
    gt_segmentations); the choice made on validation predictions is the same pkl, byte for byte."""
    out = experiment["out"]
    result = json.loads((out / "runs" / "flat_eps8" / "result.json").read_text())
    model, test = Path(result["model_folder"]), json.loads((out / "split.json").read_text())["test"]
    gt = tmp_path / "gt"
    shutil.copytree(out / "nnUNet_preprocessed" / "Dataset977_ExpTest" / "gt_segmentations", gt, symlinks=False)
    choices = []
    for i, scramble in enumerate((False, True)):
        if scramble:
            _scramble_labels(gt, test, seed=1)
        target = tmp_path / f"choice{i}" / "adaptive"
        choose_and_apply(str(model / "fold_0" / "validation"), str(gt), str(model),
                         str(out / "runs" / "flat_eps8" / "test" / "none"), str(target), "adaptive", 1)
        with open(target.parent / "dpmorph_adaptive" / "postprocessing.pkl", "rb") as f:
            choices.append(pickle.dumps(pickle.load(f)))
    assert choices[0] == choices[1]
