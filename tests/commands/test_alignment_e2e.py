"""nnUNetv2_dp_alignment and training-time recording end to end, on a tiny synthetic 2D dataset trained by
nnUNetv2_train (one training serves both)."""
from __future__ import annotations

import json
import math
import sys

import pytest
from e2e import nnunet_env, prepare, run

from nnunet_dp.alignment_report import read_csv

DS = 995
TRAINER = "nnUNetTrainerDP_TestAlignment"  # nnUNetTrainerDP + maybe_record_alignment before each private step
CFG = {"num_epochs": 1, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1, "expected_batch_size": 3,
       "alignment_every": 1, "seed": 3}
RULES = {"flat", "autos", "nsgd", "psac"}
CLI = [sys.executable, "-m", "nnunet_dp.commands.alignment"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("align")
    prepare(root, dataset_id=DS, shape=(32, 32), configuration="2d", num_train=10, num_test=0)
    run(["nnUNetv2_train", str(DS), "2d", "0", "-tr", TRAINER, "-device", "cpu"],
        nnunet_env(root, CFG, nnUNet_def_n_proc="1"))
    return root, root / "res" / f"Dataset{DS}_Test{DS}" / f"{TRAINER}__nnUNetPlans__2d" / "fold_0"


def in_range(row, keys=("bias_alignment", "private_alignment", "private_alignment_mc")):
    return all(-1 <= row[k] <= 1 for k in keys) and row["snr"] > 0 and row["normalized_deviation"] >= 0


def test_training_records_alignment_every_k_steps(trained):
    _, fold = trained
    rows = read_csv(str(fold / "alignment.csv"))
    privacy = json.loads((fold / "privacy.json").read_text())
    steps = sorted({r["step"] for r in rows})
    assert rows and set(steps) <= {0, 1} and privacy["steps"] == 2
    for step in steps:
        assert {r["rule"] for r in rows if r["step"] == step} == RULES
    for r in rows:
        assert r["source"] == "training" and r["batch_size"] >= 1 and in_range(r)
        assert r["noise_multiplier"] == pytest.approx(privacy["noise_multiplier"])
        assert r["sensitivity"] == privacy["clip_norm"]
    assert any("alignment" in a for a in privacy["assumptions"])


def test_cli_on_trained_and_fresh_network(trained):
    root, fold = trained
    out = root / "align_out"
    proc = run([*CLI, "-d", str(DS), "-c", "2d", "-f", "0", "-tr", TRAINER, "-chk", "none", "checkpoint_final.pth",
                "-n", "2", "-mc", "2", "-device", "cpu", "-o", str(out), "-ref", "dataset", "-ref_steps", "2"],
               nnunet_env(root))
    assert "PSAC assumption" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["results"]) == {"init", "checkpoint_final"} and summary["reference"] == "dataset"
    assert summary["noise_multiplier"] == pytest.approx(json.loads((fold / "privacy.json").read_text())[
        "noise_multiplier"])
    for res in summary["results"].values():
        assert res["steps"] + res["empty_batches"] == 2 and res["cases"] >= 1
        for m in res["rules"].values():
            assert -1 <= m["bias_alignment"]["mean"] <= 1 and m["snr"]["mean"] > 0
        rho = res["psac_assumption"]["spearman_norm_cos"]
        assert math.isnan(rho) or -1 <= rho <= 1
    steps, cases = read_csv(str(out / "alignment.csv")), read_csv(str(out / "alignment_cases.csv"))
    assert all(in_range(r) for r in steps) and {r["rule"] for r in steps} == RULES
    assert all(r["norm"] > 0 and all(0 < r[f"weight_{k}"] <= 1 + 1e-9 for k in RULES) for r in cases)
    assert len(cases) == sum(r["batch_size"] for r in steps if r["rule"] == "flat")
    for png in ("bias_alignment_steps", "private_alignment_steps", "norm_vs_alignment", "weight_curves",
                "norm_histogram", "overview", "training_bias_alignment_steps"):
        assert 5_000 < (out / f"{png}.png").stat().st_size < 300_000, png
    assert not list(fold.glob("alignment_log*")) and len(list(fold.glob("training_log_*.txt"))) == 1


def test_cli_errors_are_clear(trained, monkeypatch, capsys):
    from nnunet_dp.commands.alignment import main

    root, _ = trained
    for k, v in nnunet_env(root).items():
        if k.startswith("nnUNet"):
            monkeypatch.setenv(k, v)

    def error(*argv: str) -> str:
        with pytest.raises(SystemExit) as e:
            main(["-c", "2d", "-tr", TRAINER, "-device", "cpu", *argv])
        assert e.value.code not in (0, None)
        return str(e.value.code)

    missing = error("-d", str(DS), "-f", "0", "-chk", "checkpoint_best_x.pth")
    assert "checkpoint_best_x.pth" in missing and "checkpoint_final.pth" in missing
    no_fold = error("-d", str(DS), "-f", "3")
    assert "no fold folder" in no_fold and "-chk none" in no_fold
    assert "dataset '998' not found" in error("-d", "998", "-f", "0")
    assert "configuration '3d_lowres'" in error("-d", str(DS), "-f", "0", "-c", "3d_lowres")
    assert "not a DP trainer" in error("-d", str(DS), "-f", "0", "-tr", "nnUNetTrainer", "-chk", "none")
    monkeypatch.delenv("nnUNet_results")
    assert "nnUNet_results is not set" in error("-d", str(DS), "-f", "0")


def test_cli_on_another_trainers_checkpoint_with_the_dp_settings_given(trained, tmp_path):
    """The public model a DP run fine-tunes from is another trainer's checkpoint (no dp_config): with the DP
    settings of the fold folder (dp_config.json), of nnUNet_dp_config or of a DP checkpoint also given, it is analysed
    exactly as the same weights inside a DP checkpoint are (same seed: same batches, same numbers); without any
    settings it stops and says where they can come from."""
    import torch

    root, fold = trained
    dp = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    public = {k: v for k, v in dp.items() if not k.startswith("dp_")}
    public["trainer_name"] = "nnUNetTrainer"
    torch.save(public, root / "public_model.pth")

    def rows(out, chk, env):
        run([*CLI, "-d", str(DS), "-c", "2d", "-f", "0", "-tr", TRAINER, "-chk", *chk, "-n", "2", "-mc", "0",
             "-device", "cpu", "-o", str(root / out)], env)
        return read_csv(str(root / out / "alignment.csv"))

    reference = rows("align_dp", ["checkpoint_final.pth"], nnunet_env(root))
    from_fold = rows("align_public", [str(root / "public_model.pth")], nnunet_env(root))
    from_env = rows("align_public_env", [str(root / "public_model.pth")], nnunet_env(root, CFG))
    mixed = rows("align_mixed", [str(root / "public_model.pth"), "checkpoint_final.pth"], nnunet_env(root))
    numbers = ("batch_size", "dim", "noise_multiplier", "bias_alignment", "private_alignment", "snr")
    assert {r["source"] for r in mixed} == {f"{root.name}/public_model", "checkpoint_final"}  # where each is from
    for other in (from_fold, from_env, [r for r in mixed if r["source"] == f"{root.name}/public_model"]):
        assert [[r[k] for k in numbers] for r in other] == [[r[k] for k in numbers] for r in reference]
    no_fold = tmp_path / "res"  # nnUNet_results without the fold: no dp_config.json, no nnUNet_dp_config
    alone = run([*CLI, "-d", str(DS), "-c", "2d", "-f", "0", "-tr", TRAINER, "-chk", str(root / "public_model.pth"),
                 "-n", "2", "-device", "cpu", "-o", str(tmp_path / "out")],
                nnunet_env(root, nnUNet_results=str(no_fold)), check=False)
    assert alone.returncode != 0 and "'nnUNetTrainer', not by a DP trainer" in alone.stderr
    assert "nnUNet_dp_config=FILE" in alone.stderr and "dp_config.json" in alone.stderr
