"""The budget advisor: the noise ratio in closed form, its warning threshold, the table calibrated as training is,
and nnUNetv2_dp_advise on a tiny preprocessed dataset (the parameter count of the network the DP trainer builds)."""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from e2e import BIN, nnunet_env, prepare
from hypothesis import given, settings
from hypothesis import strategies as st

from nnunet_dp.accounting import calibrate_noise, epsilon_for
from nnunet_dp.advise import (
    LEVERS,
    NOISE_RATIO_SEVERE,
    NOISE_RATIO_WARN,
    PUBLIC_LEVER,
    advice,
    advise_table,
    noise_summary,
    training_advice,
)
from nnunet_dp.commands import advise as advise_cli
from nnunet_dp.config import DPConfig
from nnunet_dp.optim import default_lr, noise_per_coordinate
from nnunet_dp.run import DPPlan, make_plan
from nnunet_dp.tools.advise import training_cases

DS = 996


# ---- the noise ratio and its warning ------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(sigma=st.floats(0.0, 1e3), clip=st.floats(1e-3, 1e3), ebs=st.floats(1e-2, 1e4), d=st.integers(1, 10**9))
def test_noise_ratio_closed_form(sigma: float, clip: float, ebs: float, d: int) -> None:
    s = noise_summary(noise_multiplier=sigma, clip_norm=clip, expected_batch_size=ebs, num_trained_parameters=d)
    norm = sigma * clip * math.sqrt(d) / ebs
    assert s["noise_norm"] == pytest.approx(norm, rel=1e-12, abs=1e-300)
    assert s["noise_ratio"] == pytest.approx(norm / clip, rel=1e-12, abs=1e-300)
    assert s["noise_per_coordinate"] == noise_per_coordinate(noise_multiplier=sigma, clip_norm=clip,
                                                             expected_batch_size=ebs)
    assert (advice(s) is None) == (s["noise_ratio"] <= NOISE_RATIO_WARN)


@pytest.mark.parametrize("examples", [[(2.61, 32, 230_000, 39.1), (0.724, 32, 230_000, 10.85),
                                       (15.781, 32, 230_000, 236.6)]])
def test_noise_ratio_of_the_documented_runs(examples: list[tuple[float, float, int, float]]) -> None:
    """The Hippocampus numbers behind the thresholds (docs/results.md): ~11 learned, ~39 learned only with the DP
    optimizer defaults, ~237 did not learn."""
    for sigma, ebs, d, ratio in examples:
        s = noise_summary(noise_multiplier=sigma, clip_norm=1.0, expected_batch_size=ebs, num_trained_parameters=d)
        assert s["noise_ratio"] == pytest.approx(ratio, rel=2e-3)
    levels = [noise_summary(noise_multiplier=s, clip_norm=1.0, expected_batch_size=b, num_trained_parameters=d)["level"]
              for s, b, d, _ in examples]
    assert levels == ["warn", "ok", "severe"]


def test_warning_exactly_above_the_threshold() -> None:
    # d = 10_000, qN = 10: ratio = sigma * 100 / 10 = 10 sigma exactly
    def summary(sigma: float) -> dict:
        return noise_summary(noise_multiplier=sigma, clip_norm=0.5, expected_batch_size=10.0,
                             num_trained_parameters=10_000)

    at, below, above = NOISE_RATIO_WARN / 10, NOISE_RATIO_WARN / 10 * (1 - 1e-12), NOISE_RATIO_WARN / 10 * (1 + 1e-12)
    assert summary(at)["noise_ratio"] == NOISE_RATIO_WARN
    assert advice(summary(below)) is None and advice(summary(at)) is None and summary(at)["level"] == "ok"
    text = advice(summary(above))
    assert text is not None and summary(above)["level"] == "warn" and "may learn little" in text
    for lever in ("-pretrained_weights", "norm_bias", "decoder", "expected_batch_size", "augmentations_per_case",
                  "ema_decay"):
        assert lever in text
    assert all(lever in text for lever in LEVERS)
    severe = NOISE_RATIO_SEVERE / 10
    assert summary(severe)["level"] == "warn" and summary(severe * (1 + 1e-12))["level"] == "severe"
    assert "not expected to learn" in advice(summary(severe * (1 + 1e-12)))
    # fine-tuning from public weights: same threshold, no from-scratch verdict, no "start from public weights" lever
    tuned = advice(summary(severe * 2), finetuning=True)
    assert advice(summary(at), finetuning=True) is None and "You fine-tune from public weights" in tuned
    assert "not expected to learn" not in tuned and "-pretrained_weights" not in tuned
    assert all(lever in tuned for lever in LEVERS[1:])
    assert tuned.index(PUBLIC_LEVER) < tuned.index(LEVERS[1]) and PUBLIC_LEVER not in text  # fine-tuning only


def test_training_advice_for_a_plan() -> None:
    plan = DPPlan(rule="flat", rule_constant=None, clip_norm=2.0, noise_multiplier=1.5, sampling_rate=0.25,
                  num_training_cases=40, planned_steps=100, max_steps=100, target_epsilon=8.0, delta=1e-5,
                  accountant="rdp")
    fields, warning = training_advice(plan, 64)  # ratio 1.5 * 8 / 10 = 1.2
    assert fields["noise"] == noise_summary(noise_multiplier=1.5, clip_norm=2.0, expected_batch_size=10.0,
                                            num_trained_parameters=64)
    assert fields["noise"]["noise_ratio"] == pytest.approx(1.2) and warning is None
    json.dumps(fields)  # privacy.json material
    fields, warning = training_advice(plan, 10**6)  # ratio 150
    assert fields["noise"]["level"] == "severe" and warning is not None and "1,000,000" in warning
    assert "not expected to learn" in warning and "not expected to learn" not in training_advice(plan, 10**6, True)[1]


# ---- the table: calibrated as training is -------------------------------------------------------------------------
def test_table_matches_the_training_calibration() -> None:
    cfg = DPConfig(target_epsilon=4.0, num_epochs=2, num_iterations_per_epoch=10, momentum=0.5)
    rows = advise_table(cfg, rule="flat", num_training_cases=20, plans_batch_size=2, num_trained_parameters=4096,
                        batch_sizes=[5, 30], epoch_counts=[1, 3])
    assert [(r["expected_batch_size"], r["epochs"]) for r in rows] == [(b, e) for b in (5, 30) for e in (1, 3)]
    for row in rows[:2]:
        q, steps = row["expected_batch_size"] / 20, row["epochs"] * 10
        sigma = calibrate_noise(target_epsilon=4.0, delta=1e-5, sampling_rate=q, steps=steps)
        assert row["feasible"] and row["steps"] == steps and row["sampling_rate"] == pytest.approx(q)
        assert row["noise_multiplier"] == sigma
        assert row["epsilon"] == epsilon_for(noise_multiplier=sigma, sampling_rate=q, steps=steps, delta=1e-5) <= 4.0
        lr = default_lr(noise_multiplier=sigma, clip_norm=1.0, expected_batch_size=q * 20, steps=steps, momentum=0.5)
        assert row["lr"] == lr and row["effective_step"] == pytest.approx(lr / 0.5)
        assert row["noise_ratio"] == pytest.approx(sigma * 64 / (q * 20))
    plan = make_plan(dataclasses.replace(cfg, expected_batch_size=5, num_epochs=3), rule="flat",
                     num_training_cases=20, plans_batch_size=2)
    assert rows[1]["noise_multiplier"] == plan.noise_multiplier and rows[1]["sampling_rate"] == plan.sampling_rate
    for row in rows[2:]:  # q = 30/20 > 1
        assert not row["feasible"] and "expected_batch_size" in row["reason"] and "(0, 1]" in row["reason"]


def test_table_with_a_fixed_sigma_and_a_bad_delta() -> None:
    cfg = DPConfig(target_epsilon=None, noise_multiplier=1.3, num_epochs=1, num_iterations_per_epoch=7)
    (row,) = advise_table(cfg, rule="psac", num_training_cases=10, plans_batch_size=2, num_trained_parameters=9,
                          batch_sizes=[4], epoch_counts=[2])
    assert row["noise_multiplier"] == 1.3 and row["target_epsilon"] is None and row["rule"] == "psac"
    assert row["epsilon"] == epsilon_for(noise_multiplier=1.3, sampling_rate=0.4, steps=14, delta=1e-5)
    rows = advise_table(DPConfig(delta=0.2), rule="flat", num_training_cases=10, plans_batch_size=2,
                        num_trained_parameters=9, batch_sizes=[2, 3], epoch_counts=[1])
    assert all(not r["feasible"] and r["reason"].startswith("delta = 0.2") for r in rows)


@pytest.mark.parametrize("total", [5, 7, 12, 13, 24])
def test_training_cases_as_nnunet_splits(tmp_path: Path, total: int) -> None:
    """Without splits_final.json: the size of the fold nnU-Net's generate_crossval_split will make."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    splits = generate_crossval_split([f"case_{i:03d}" for i in range(total)], seed=12345, n_splits=5)
    for fold in range(5):
        n, source = training_cases(str(tmp_path), {"numTraining": total}, fold)
        assert n == len(splits[fold]["train"]) and "no splits_final.json" in source
    assert training_cases(str(tmp_path), {"numTraining": total}, 5)[0] == int(total * 0.8)
    assert training_cases(str(tmp_path), {"numTraining": total}, "all")[0] == total


def test_advise_core_does_not_import_nnunetv2() -> None:
    code = ("import sys, nnunet_dp.advise\n"
            "bad = [m for m in sys.modules if m.startswith(('nnunetv2', 'batchgenerators', 'dynamic_network'))]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- the command on a tiny preprocessed dataset -------------------------------------------------------------------
REFERENCE = """
import json, sys, torch
from nnunetv2.run.run_training import get_trainer_from_args
from nnunet_dp.nnunet.selection import select_trainable
t = get_trainer_from_args(sys.argv[1], "2d", 0, "nnUNetTrainerDP", device=torch.device("cpu"))
t.initialize()
net = t._plain_network()
print(json.dumps({"all": sum(p.numel() for p in net.parameters()), "n_train": len(t.do_split()[0]),
                  "decoder": sum(p.numel() for n, p in net.named_parameters() if n.startswith("decoder.")),
                  "norm_bias": select_trainable(net, "norm_bias").num_trained}))
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("advise")
    prepare(root, dataset_id=DS, shape=(32, 32), configuration="2d")  # 12 cases: fold 0 trains on 9
    return root


def advise_cmd(root: Path, *args: str) -> subprocess.CompletedProcess:
    exe = BIN / "nnUNetv2_dp_advise"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "nnunet_dp.commands.advise"]
    return subprocess.run([*cmd, *args], env=nnunet_env(root, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=600, check=False)


def test_cli_table_json_and_parameter_count(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "advice.json"
    proc = advise_cmd(root, "-d", str(DS), "-c", "2d", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "N = 9 training cases (no splits_final.json yet" in proc.stdout and "ratio" in proc.stdout
    report = json.loads(out.read_text())
    # defaults: batch sizes {B=2, 2B, 4B, N/4 = 2.25} <= N, epochs {50, 100, 200}; target epsilon 8
    assert [(r["expected_batch_size"], r["epochs"]) for r in report["rows"]] == \
        [(b, e) for b in (2.0, 2.25, 4.0, 8.0) for e in (50, 100, 200)]
    assert all(r["feasible"] and r["target_epsilon"] == 8.0 for r in report["rows"])
    assert report["current"][0]["expected_batch_size"] == 2.0 and report["current"][0]["level"] == "severe"
    assert "DP noise warning" in proc.stdout and len(proc.stdout.splitlines()) >= 12 + 8
    ref = subprocess.run([sys.executable, "-c", REFERENCE, str(DS)], env=nnunet_env(root, OMP_NUM_THREADS="1"),
                         capture_output=True, text=True, timeout=600, check=True)
    ref = json.loads(ref.stdout.strip().splitlines()[-1])
    assert report["num_parameters"] == report["num_trained_parameters"] == ref["all"]
    assert report["num_training_cases"] == ref["n_train"] == 9
    # the trainer wrote splits_final.json: now read from it; trainable modes shrink d as the trainer selects
    for mode in ("decoder", "norm_bias"):
        proc = advise_cmd(root, "-d", f"Dataset{DS}_Test{DS}", "-c", "2d", "--trainable", mode, "--target-epsilon",
                          "8", "64", "--batch-sizes", "3", "12", "--epochs", "2", "--json", str(out))
        assert proc.returncode == 0, proc.stderr
        report = json.loads(out.read_text())
        assert report["num_trained_parameters"] == ref[mode] < ref["all"] == report["num_parameters"]
        assert report["num_training_cases_source"] == "splits_final.json, fold 0"
        assert [r["feasible"] for r in report["rows"]] == [True, False, True, False]  # 12 > N = 9
        assert "infeasible: expected_batch_size = 12.0" in proc.stdout
    # nothing feasible (a batch above N in every row and in the settings): the table, then a non-zero exit
    settings = tmp_path / "dp.json"
    settings.write_text(json.dumps({"expected_batch_size": 12}))
    exe = BIN / "nnUNetv2_dp_advise"
    proc = subprocess.run([str(exe), "-d", str(DS), "-c", "2d", "--batch-sizes", "12", "--epochs", "2"],
                          env={**nnunet_env(root, OMP_NUM_THREADS="1"), "nnUNet_dp_config": str(settings)},
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode != 0 and "no setting in the table is feasible" in proc.stderr, proc.stderr
    assert "infeasible: expected_batch_size = 12.0" in proc.stdout


@pytest.mark.parametrize("args,words", [
    (["-d", "999", "-c", "2d"], ["-d 999", "nnUNetv2_plan_and_preprocess -d 999 -c 2d"]),
    (["-d", str(DS), "-c", "2d", "--trainable", "everything"], ["--trainable", "'everything'", "norm_bias"]),
    (["-d", str(DS), "-c", "3d_fullres"], ["-c 3d_fullres", "allowed: 2d"]),
    (["-d", str(DS), "-c", "2d", "-tr", "nnUNetTrainer"], ["-tr nnUNetTrainer", "not a DP trainer"]),
    (["-d", str(DS), "-c", "2d", "--batch-sizes", "0"], ["--batch-sizes", "'0'", "> 0"]),
])
def test_cli_bad_inputs(root: Path, args: list[str], words: list[str], monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture[str]) -> None:
    # in-process (the command reads nnUNet_preprocessed from the environment at call time): a subprocess per case
    # would cost an nnU-Net import each; the good path above runs as a subprocess, as a user runs it
    for key, value in nnunet_env(root).items():
        if key.startswith("nnUNet"):
            monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as exit_info:
        advise_cli.main(args)
    out, err = capsys.readouterr()
    assert exit_info.value.code != 0 and not out
    assert all(w in err for w in words), err


def test_prediction_per_lever_from_the_law_in_closed_form():
    """The advisor's prediction: the law's interval at s = N eps / sqrt(d ln(1/delta)) for the settings' d and every
    lever's, the N for ratios 0.5 and 0.8 (the law inverted), and the lever with the highest interval."""
    import math

    from nnunet_dp import law
    from nnunet_dp.tools.prediction import predict, render_prediction

    curve = law.Law("scratch", slope=1.5, midpoint=math.log(3.0), floor=0.0, half_width=0.1, num_cells=12, source="t")
    levers = [{"lever": "all", "settings": {"trainable": "all"}, "d": 100_000},
              {"lever": "norm_bias", "settings": {"trainable": "norm_bias"}, "d": 1_000},
              {"lever": "projection k=16", "settings": {"projection": "public", "projection_dim": 16}, "d": 16}]
    p = predict(levers=levers, cfg=DPConfig(), num_cases=150, epsilon=8.0, pretrained=False,
                laws={"scratch": curve})
    s = 150 * 8 / math.sqrt(100_000 * math.log(1e5))
    assert p["s"] == pytest.approx(s) and (p["predicted_ratio_low"], p["predicted_ratio_high"]) == curve.interval(s)
    assert p["cases_for_ratio_0.5"] == math.ceil(3.0 * math.sqrt(100_000 * math.log(1e5)) / 8)
    assert p["best_lever"] == "projection k=16" and len(p["levers"]) == 3
    public = " ".join(render_prediction(predict(levers=levers, cfg=DPConfig(), num_cases=150, epsilon=8.0,
                                                pretrained=True, laws={})))
    assert "no calibrated law from a public model" in public and "Score the public model alone" in public
    assert "no calibrated law for this start" in " ".join(render_prediction(predict(
        levers=levers, cfg=DPConfig(), num_cases=150, epsilon=8.0, pretrained=False, laws={})))
    assert any("the lever that moves it most: projection k=16" in line for line in render_prediction(p))
    assert p["law_held_out"] is None and not any("not fitted on" in line for line in render_prediction(p))
    checked = law.Law(**{**curve.__dict__, "held_out": "0 of 8 cells of x inside the interval, 8 below it"})
    shown = render_prediction(predict(levers=levers, cfg=DPConfig(), num_cases=150, epsilon=8.0, pretrained=False,
                                      laws={"scratch": checked}))
    assert "  on data it was not fitted on: 0 of 8 cells of x inside the interval, 8 below it" in shown
