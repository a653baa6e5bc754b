"""The README's first command: nnUNetv2_dp_demo (here with --quick, the same pipeline on a minimal budget)."""
import json
import math
import os

from e2e import run


def test_demo_quick_runs_the_whole_pipeline(tmp_path):
    env = dict(os.environ, nnUNet_n_proc_DA="0", nnUNet_def_n_proc="1")  # OMP_NUM_THREADS: conftest.py
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_dp_config"):
        env.pop(key, None)  # the demo sets its own
    work = tmp_path / "demo"
    proc = run(["nnUNetv2_dp_demo", "-o", str(work), "--quick", "--fresh"], env)
    assert "==== nnunet-dp demo ====" in proc.stdout
    result = json.loads((work / "demo_result.json").read_text())
    privacy = json.loads(next(work.glob("nnUNet_results/*/*/fold_0/privacy.json")).read_text())
    assert result["epsilon"] == privacy["epsilon"] and 0 < result["epsilon"] <= privacy["target_epsilon"]
    assert result["steps"] == privacy["steps"] == privacy["planned_steps"]
    for key in ("dice_test", "dice_test_dpmorph"):
        assert set(result[key]) == {"1", "2"}
        assert all(0.0 <= v <= 1.0 and not math.isnan(v) for v in result[key].values())
    assert (work / "test_predictions_dpmorph").is_dir()
    assert result["dpmorph"]["dp_morph"]["privacy"]["private_selection"] is False  # the json says it is not private
