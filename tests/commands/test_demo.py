"""The README's first command: nnUNetv2_dp_demo (here with --quick, the same pipeline on a minimal budget)."""
import json
import math
import os

import pytest
from e2e import run
from opacus.accountants import PRVAccountant, RDPAccountant

from nnunet_dp.tools.morph_selection import DEFAULT_EPSILON_SELECT


def _opacus_epsilon(privacy: dict) -> float:
    """The reference: one opacus accountant stepped through the run's ledger history, at its delta."""
    acc = RDPAccountant() if privacy["accountant"] == "rdp" else PRVAccountant()
    for sigma, q, n in privacy["ledger_history"]:
        for _ in range(n):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    return float(acc.get_epsilon(delta=privacy["delta"]))


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
    # the DP-Morph choice is private by default, and the numbers with it carry training + selection epsilon
    morph = result["dpmorph"]["dp_morph"]["privacy"]
    assert (morph["private_selection"], morph["private_randomness"]) == (True, True)
    assert morph["epsilon_select"] == result["epsilon_select"] == DEFAULT_EPSILON_SELECT
    assert result["dpmorph_selection"] == "private" and result["not_covered"] == []
    assert result["epsilon_training"] == pytest.approx(_opacus_epsilon(privacy), rel=1e-9)
    assert result["epsilon_total"] == pytest.approx(_opacus_epsilon(privacy) + DEFAULT_EPSILON_SELECT, rel=1e-9)
    assert (f"privacy with DP-Morph: epsilon = {result['epsilon_training']:.3f} (training) + "
            f"{DEFAULT_EPSILON_SELECT:g} (selection) = {result['epsilon_total']:.3f} (total, at delta = "
            f"{privacy['delta']:g}") in proc.stdout
