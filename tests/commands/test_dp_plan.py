"""nnUNetv2_dp_plan: plans from user-given values only, and a DP training that reads no fingerprint."""
from __future__ import annotations

import hashlib
import inspect
import json

import pytest
from e2e import nnunet_env, run
from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_dp.commands import plan as dp_plan
from nnunet_dp.nnunet.plans import DP_PLAN_KEY, WITHHELD_FINGERPRINT, plans_provenance
from nnunet_dp.nnunet.report import ASSUMPTIONS
from nnunet_dp.synthetic import make_dataset
from nnunet_dp.tools.dp_plan import DPPlanError

D = 993
NAME = f"Dataset{D}_Test{D}"
TINY = {"num_epochs": 1, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1,
        "expected_batch_size": 3, "target_epsilon": 8.0}
POISON = {"foreground_intensity_properties_per_channel": {"0": {
    "mean": 1e9, "median": 1e9, "std": 1e-9, "min": 1e9, "max": 1e9, "percentile_00_5": 1e9, "percentile_99_5": 1e9}},
    "spacings": [[999.0, 1e-3, 1e-3]], "shapes_after_crop": [[1, 2, 2]], "median_relative_size_after_cropping": 0.01}


@pytest.fixture()
def dataset(tmp_path, monkeypatch):
    """A raw dataset (no image read by the planner) and nnU-Net's folder variables pointing at tmp_path."""
    make_dataset(str(tmp_path / "raw"), dataset_id=D, name=f"Test{D}", num_train=3, num_test=0, shape=(16, 16),
                 channels=2)
    from nnunetv2 import paths

    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "pre"), ("nnUNet_results", "res")):
        monkeypatch.setattr(paths, var, str(tmp_path / sub))
        monkeypatch.setenv(var, str(tmp_path / sub))
    return tmp_path


def plan(root, *args: str, p: str = "nnUNetPlans_dp") -> dict:
    dp_plan.main(["-d", NAME, *args, "-p", p])  # (a name: nnU-Net's id lookup read its folders at import)
    return json.loads((root / "pre" / NAME / f"{p}.json").read_text())


def test_plans_load_in_nnunet_with_its_topology_and_the_users_values(dataset):
    plans = plan(dataset, "-c", "3d_fullres", "--spacing", "3", "0.8", "0.8", "--patch-size", "40", "128", "128",
                 "--normalization", "ct-window:-160,240", "zscore-per-image")
    conf = PlansManager(plans).get_configuration("3d_fullres")
    _, strides, kernels, patch, _ = get_pool_and_conv_props([3.0, 0.8, 0.8], [40, 128, 128], 4, 999999)
    assert conf.spacing == [3.0, 0.8, 0.8] and conf.patch_size == [int(p) for p in patch] == [40, 128, 128]
    assert conf.pool_op_kernel_sizes == [list(s) for s in strides]
    assert conf.network_arch_init_kwargs["kernel_sizes"] == [list(k) for k in kernels]
    assert conf.normalization_schemes == ["CTNormalization", "ZScoreNormalization"]
    assert conf.use_mask_for_norm == [False, False]
    ct = PlansManager(plans).foreground_intensity_properties_per_channel["0"]
    assert (ct["percentile_00_5"], ct["percentile_99_5"], ct["mean"], ct["std"]) == (-160, 240, 40, 200)
    record = plans[DP_PLAN_KEY]
    assert record["source"] == "user-given values" and f"nnUNetv2_dp_plan -d {NAME}" in \
        record["configurations"]["3d_fullres"]["command"]
    assert plans_provenance(plans, "3d_fullres")["data_independent"]
    assert (dataset / "pre" / NAME / "dataset.json").is_file()  # nnUNetv2_preprocess reads it there


def test_plans_do_not_change_with_the_fingerprint_and_edits_are_noticed(dataset):
    args = ("-c", "2d", "--spacing", "1", "1", "--patch-size", "32", "32", "--normalization", "ct-window:-1,3,0,2")
    clean = plan(dataset, *args)
    (dataset / "pre" / NAME / "dataset_fingerprint.json").write_text(json.dumps(POISON))
    assert plan(dataset, *args) == clean
    assert clean["foreground_intensity_properties_per_channel"]["1"]["std"] == 2.0
    edited = json.loads(json.dumps(clean))
    edited["foreground_intensity_properties_per_channel"]["0"]["mean"] = 0.5  # e.g. from the private fingerprint
    prov = plans_provenance(edited, "2d")
    assert not prov["data_independent"] and "changed" in prov["why_not"]
    assert plans_provenance({"plans_name": "nnUNetPlans", "configurations": {"2d": {}}}, "2d")[
        "data_independent"] is False


def test_a_second_configuration_joins_the_same_plans(dataset):
    plan(dataset, "-c", "2d", "--spacing", "1", "1", "--patch-size", "32", "32", "--normalization", "zscore-per-image")
    plans = plan(dataset, "-c", "3d_fullres", "--spacing", "1", "1", "1", "--patch-size", "16", "32", "32",
                 "--normalization", "zscore-per-image", "--features", "8")
    assert set(plans["configurations"]) == {"2d", "3d_fullres"} == set(plans[DP_PLAN_KEY]["configurations"])
    assert plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"][:3] == [8, 16, 32]
    assert all(plans_provenance(plans, c)["data_independent"] for c in ("2d", "3d_fullres"))


@pytest.mark.parametrize("args,option,words", [
    (("-c", "2d", "--spacing", "-1", "1", "--patch-size", "32", "32", "--normalization", "nonorm"),
     "--spacing", "positive"),
    (("-c", "3d_fullres", "--spacing", "1", "1", "1", "--patch-size", "32", "32", "--normalization", "nonorm"),
     "--patch-size", "3 positive integers"),
    (("-c", "2d", "--spacing", "1", "1", "--patch-size", "32", "32", "--normalization", "percentile"),
     "--normalization", "zscore-per-image"),
    (("-c", "2d", "--spacing", "1", "1", "--patch-size", "32", "32", "--normalization", "ct-window:100,-100"),
     "--normalization", "LO < HI"),
    (("-c", "2d", "--spacing", "1", "1", "--patch-size", "32", "32", "--normalization", "nonorm", "nonorm",
      "nonorm"), "--normalization", "one per channel"),
    (("-c", "3d_lowres", "--spacing", "1", "1", "1", "--patch-size", "32", "32", "32", "--normalization", "nonorm"),
     "-c", "2d or 3d_fullres"),
    (("-c", "2d", "--spacing", "1", "1", "--patch-size", "32", "32", "--normalization", "nonorm", "--features", "4",
      "8"), "--features", "one per stage"),
])
def test_bad_values_stop_naming_option_value_allowed_and_fix(dataset, args, option, words):
    with pytest.raises(DPPlanError, match="Fix:") as err:
        dp_plan.main(["-d", NAME, *args])
    assert err.value.option == option and f"{option} = " in str(err.value) and words in str(err.value)
    assert not (dataset / "pre" / NAME / "nnUNetPlans_dp.json").exists()


def test_nnunet_on_train_start_is_the_one_start_without_fingerprint_mirrors():
    """plans.start_without_fingerprint copies nnUNetTrainer.on_train_start of nnunetv2 2.8 minus the fingerprint
    copy. If nnU-Net changes that method, re-check the copy and update this hash."""
    source = inspect.getsource(nnUNetTrainer.on_train_start)
    assert "dataset_fingerprint.json" in source
    assert hashlib.sha256(source.encode()).hexdigest() == \
        "cbf4259a673f7a875cebdc120f360732c850547c719977b9b8bc22b4d016e96c"


def test_e2e_dp_plan_preprocess_poison_fingerprint_train(tmp_path):
    """nnUNetv2_dp_plan -> nnUNetv2_preprocess -> absurd fingerprint -> nnUNetTrainerDP -p: trains, the fingerprint is
    neither used nor copied, and privacy.json names the plans instead of the plans-statistics assumption."""
    make_dataset(str(tmp_path / "raw"), dataset_id=D, name=f"Test{D}", num_train=12, num_test=2, shape=(32, 32),
                 seed=D)
    env = nnunet_env(tmp_path)
    run(["nnUNetv2_dp_plan", "-d", str(D), "-c", "2d", "--spacing", "1", "1", "--patch-size", "32", "32",
         "--normalization", "zscore-per-image", "-p", "nnUNetPlans_dp"], env)
    run(["nnUNetv2_preprocess", "-d", str(D), "-plans_name", "nnUNetPlans_dp", "-c", "2d", "-np", "1"], env)
    pre = tmp_path / "pre" / NAME
    (pre / "dataset_fingerprint.json").write_text(json.dumps(POISON))
    run(["nnUNetv2_train", str(D), "2d", "0", "-tr", "nnUNetTrainerDP", "-p", "nnUNetPlans_dp", "-device", "cpu"],
        nnunet_env(tmp_path, TINY))
    model = tmp_path / "res" / NAME / "nnUNetTrainerDP__nnUNetPlans_dp__2d"
    rep = json.loads((model / "fold_0" / "privacy.json").read_text())
    assert rep["status"] == "finished" and rep["steps"] == 2 and rep["epsilon"] <= 8
    assert rep["plans"]["data_independent"] and rep["plans"]["plans_name"] == "nnUNetPlans_dp"
    assert rep["plans"]["values"]["normalization"] == ["zscore-per-image"]
    assert ASSUMPTIONS[0] not in rep["assumptions"]
    assert any("nnUNetv2_dp_plan" in a and "'nnUNetPlans_dp'" in a for a in rep["assumptions"])
    assert json.loads((model / "dataset_fingerprint.json").read_text()) == WITHHELD_FINGERPRINT
    assert json.loads((model / "plans.json").read_text())[DP_PLAN_KEY]["source"] == "user-given values"
