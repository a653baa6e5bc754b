"""nnUNetv2_dp_experiment for a study of the fine-tuning levers: the grid rule × ε × lr × trainable ×
K × EMA and its names, --seeds K (mean ± sd against numpy), the seeded case-level public part of --public-fraction,
the checks of --public-fraction and --pretrained before any work, and one end-to-end run (public pretraining once,
DP fine-tuning from it with the moved public plans, two seeds) that a second invocation skips entirely."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from e2e import nnunet_env, run

import nnunet_dp.experiment
from nnunet_dp.commands import experiment as experiment_cli
from nnunet_dp.config import DPConfig
from nnunet_dp.experiment import grid as experiment_grid
from nnunet_dp.experiment import public_alone
from nnunet_dp.experiment.aggregate import CHOSEN, DEFAULT
from nnunet_dp.experiment.budget import Fold, format_budget, plan_runs, read_planned, resolve_for_dataset
from nnunet_dp.experiment.data import check_public_fraction, derived_datasets, split_public
from nnunet_dp.experiment.errors import ExperimentError
from nnunet_dp.experiment.grid import execution_order
from nnunet_dp.experiment.levers import DEFAULT_LEVERS, Levers, check_seeds, lever_grid, reference_grid
from nnunet_dp.experiment.plan import BUDGETS, dp_settings, run_grid, split_cases
from nnunet_dp.experiment.pretrain import PublicPretraining, plans_network, pretrained_problems
from nnunet_dp.experiment.report import write_report
from nnunet_dp.experiment.run import Context
from nnunet_dp.experiment.trainers.nnunet_dp_experiment_trainers import BUDGET_KEYS as NONPRIVATE_BUDGET_KEYS
from nnunet_dp.synthetic import make_dataset
from nnunet_dp.tools.morph_selection import DEFAULT_EPSILON_SELECT

PLANS = Path(__file__).resolve().parents[2] / "benchmarks" / "plans" / "Dataset902_Hippocampus_nnUNetPlans.json"
DATASET_JSON = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "anterior": 1, "posterior": 2},
                "file_ending": ".nii.gz", "numTraining": 4}
DATASET_ID = 973
MINIMAL = {"num_epochs": 1, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1, "batch_size": 2,
           "save_every": 1, "features_per_stage": [8, 16, 32]}


# ---- the grid ------------------------------------------------------------------------------------------------------
def test_default_levers_keep_todays_names_and_settings():
    today = run_grid(["nonprivate", "flat", "psac"], [1, 8], [0.05])
    levers = run_grid(["nonprivate", "flat", "psac"], [1, 8], [0.05], lever_grid(), check_seeds(1))
    assert [s.name for s in levers] == [s.name for s in today] == [
        "nonprivate", "flat_eps1", "flat_eps1_lr0.05", "flat_eps8", "flat_eps8_lr0.05", "psac_eps1",
        "psac_eps1_lr0.05", "psac_eps8", "psac_eps8_lr0.05"]
    assert all(s.cell == s.name and s.repeat is None for s in levers)
    for spec in levers:
        settings = dp_settings(spec, BUDGETS["tiny"])
        assert not {"trainable", "augmentations_per_case", "ema_decay", "seed"} & set(settings)
    assert lever_grid(["all"], [1], ["none"]) == [DEFAULT_LEVERS] and DEFAULT_LEVERS.settings() == {}


def test_levers_are_a_cross_product_named_by_their_non_default_values():
    levers = lever_grid(["all", "norm_bias"], [1, 4], ["none", "0.999"])
    assert len(levers) == 8
    specs = run_grid(["nonprivate", "flat"], [8], [0.05], levers)
    names = [s.name for s in specs]
    assert names[0] == "nonprivate" and len(names) == 1 + 2 * 8  # the reference gets no levers
    assert names[1:9] == ["flat_eps8", "flat_eps8_ema0.999", "flat_eps8_k4", "flat_eps8_k4_ema0.999",
                          "flat_eps8_norm_bias", "flat_eps8_norm_bias_ema0.999", "flat_eps8_norm_bias_k4",
                          "flat_eps8_norm_bias_k4_ema0.999"]
    assert "flat_eps8_lr0.05_norm_bias_k4_ema0.999" in names and len(set(names)) == len(names)
    spec = next(s for s in specs if s.name == "flat_eps8_norm_bias_k4_ema0.999")
    settings = dp_settings(spec, BUDGETS["tiny"])
    assert (settings["trainable"], settings["augmentations_per_case"], settings["ema_decay"]) == ("norm_bias", 4, 0.999)
    cfg = DPConfig.from_mapping(settings)  # the trainers' own check accepts every run's settings
    assert (cfg.trainable, cfg.augmentations_per_case, cfg.ema_decay) == ("norm_bias", 4, 0.999)
    assert spec.levers.label == "norm_bias, K=4, EMA 0.999" and Levers().label == "defaults"
    assert "trainable" not in dp_settings(next(s for s in specs if s.name == "flat_eps8_k4"), BUDGETS["tiny"])


def test_seeds_repeat_every_run_and_seed_only_under_reproducible():
    specs = run_grid(["nonprivate", "flat"], [8], [], lever_grid(["norm_bias"]), check_seeds(3))
    assert [s.name for s in specs] == ["nonprivate_s1", "nonprivate_s2", "nonprivate_s3", "flat_eps8_norm_bias_s1",
                                       "flat_eps8_norm_bias_s2", "flat_eps8_norm_bias_s3"]
    assert {s.cell for s in specs} == {"nonprivate", "flat_eps8_norm_bias"}
    assert all("seed" not in dp_settings(s, BUDGETS["tiny"]) for s in specs)  # private: fresh OS entropy per repeat
    assert [dp_settings(s, BUDGETS["tiny"], 7).get("seed") for s in specs] == [None, None, None, 7, 8, 9]
    b = resolve_for_dataset("tiny", BUDGETS["tiny"], read_planned(str(PLANS), "2d"), Fold(40, 10, 12))
    plans, problems = plan_runs(specs, b, None, "tiny")
    assert not problems and [p.spec.name for p in execution_order(plans)] == [
        "flat_eps8_norm_bias_s1", "flat_eps8_norm_bias_s2", "flat_eps8_norm_bias_s3", "nonprivate_s1",
        "nonprivate_s2", "nonprivate_s3"]
    two = run_grid(["flat", "psac"], [8], [], lever_grid(), 2)
    order = [p.spec.name for p in execution_order(plan_runs(two, b, None, "tiny")[0])]
    assert order == ["flat_eps8_s1", "psac_eps8_s1", "flat_eps8_s2", "psac_eps8_s2"]  # every run once first


@pytest.mark.parametrize(("call", "fragments"), [
    (lambda: lever_grid(["everything"]), ["--trainable = 'everything'", "'all', 'norm_bias', 'decoder'"]),
    (lambda: lever_grid(augmentations=[0]), ["--augmentations-per-case = 0", "[1, 64]"]),
    (lambda: lever_grid(ema=["1.5"]), ["--ema-decay = 1.5", "'none' or numbers in (0, 1)"]),
    (lambda: lever_grid(ema=["fast"]), ["--ema-decay = 'fast'", "'none' or a number", "--ema-decay none 0.999"]),
    (lambda: lever_grid(ema=["0.999", "0.9990001"]), ["--ema-decay", "first 6 significant digits"]),
    (lambda: lever_grid(["norm_bias"], dp_rules=False), ["--trainable", "DP rules in --rules too", "Add a DP rule"]),
    (lambda: check_seeds(0), ["--seeds = 0", "an integer >= 1", "Use --seeds 3"]),
])
def test_bad_levers_name_option_value_allowed_and_fix(call, fragments):
    with pytest.raises(ExperimentError) as info:
        call()
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


# ---- --seeds: mean ± sd -------------------------------------------------------------------------------------------
def _result(run, cell, repeat, rule, eps, dice, val, levers="defaults", status="ok"):
    if status != "ok":
        return {"run": run, "cell": cell, "repeat": repeat, "rule": rule, "target_epsilon": eps, "levers": levers,
                "status": "failed", "error": "RuntimeError: boom", "log": "log.txt", "initial_lr": None,
                "seconds": 3.0}
    privacy = {"noise_multiplier": 2.6, "clip_norm": 1.0, "expected_batch_size": 32.0, "planned_steps": 400} if eps \
        else {"noise_multiplier": None}
    return {"run": run, "cell": cell, "repeat": repeat, "rule": rule, "target_epsilon": eps, "epsilon": eps,
            "levers": levers, **privacy, "steps": 4, "initial_lr": 0.1 if rule == "nonprivate" else None,
            "scores": {"none": {"dice": {"disk": dice, "ring": dice / 2}, "dice_mean": dice, "num_cases": 2}},
            "validation_dice": {"none": val}, "train_seconds": 6.0, "seconds": 9.0}


def _repeats(cell, rule, eps, values, val, levers="defaults"):
    """result.json of each repeat k = 1.. of a cell, with the test Dice `values` (and validation Dice `val`)."""
    vals = val if isinstance(val, list) else [val] * len(values)
    return [_result(f"{cell}_s{k}", cell, k, rule, eps, d, v, levers) for k, (d, v) in enumerate(zip(values, vals), 1)]


PUBLIC_START = {"from": "public part", "public_fraction": 0.3, "num_public_cases": 4}


def _header(seeds, *, reproducible=False, start=None):
    return {"dataset": "Dataset973_Lev", "configuration": "2d", "seed": 0, "reproducible": reproducible,
            "seeds": seeds, "budget": {"name": "minimal", "steps": 4, "batch_size": 4},
            "command": "nnUNetv2_dp_experiment ...", "split": {"num_test": 2, "num_train": 10, "num_val": 3},
            "start": start or {"from": "scratch"}}


def test_seeds_tables_show_mean_and_sd_and_choose_levers_on_validation(tmp_path):
    ref, flat, bias = [0.80, 0.84, 0.86], [0.30, 0.50, 0.46], [0.62, 0.58, 0.61]
    results = _repeats("nonprivate", "nonprivate", None, ref, 0.9) + _repeats("flat_eps8", "flat", 8.0, flat, 0.5)
    results += _repeats("flat_eps8_norm_bias", "flat", 8.0, bias, [0.6, 0.7, 0.65], "norm_bias")
    results.append(_result("flat_eps8_norm_bias_s4", "flat_eps8_norm_bias", 4, "flat", 8.0, 0, 0, "norm_bias",
                           "failed"))
    write_report(str(tmp_path), _header(4, start=PUBLIC_START), results)
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["row"] for r in table].count("repeat") == len(results)
    means = {r["run"]: r for r in table if r["row"] == "mean ± sd"}
    assert set(means) == {"nonprivate", "flat_eps8", "flat_eps8_norm_bias"}
    for cell, values in (("nonprivate", ref), ("flat_eps8", flat), ("flat_eps8_norm_bias", bias)):
        assert float(means[cell]["dice_mean"]) == pytest.approx(np.mean(values))
        assert float(means[cell]["dice_mean_sd"]) == pytest.approx(np.std(values, ddof=1))
        assert float(means[cell]["dice_ring"]) == pytest.approx(np.mean(values) / 2)
        assert means[cell]["n"] == "3"
        assert float(means[cell]["ratio_to_nonprivate"]) == pytest.approx(np.mean(values) / np.mean(ref))
    assert means["flat_eps8_norm_bias"]["n_failed"] == "1" and "1 of 4 repeats FAILED" in \
        means["flat_eps8_norm_bias"]["status"]
    repeat = next(r for r in table if r["run"] == "flat_eps8_s2")
    assert float(repeat["ratio_to_nonprivate"]) == pytest.approx(0.50 / np.mean(ref))  # to the reference's mean
    # the choice among settings is made on the mean validation Dice (norm_bias 0.65 > 0.5), never on test
    assert means["flat_eps8_norm_bias"]["choice"] == CHOSEN and means["flat_eps8"]["choice"] == DEFAULT
    md = (tmp_path / "results.md").read_text()
    def sd(v):
        return f"{np.mean(v):.4f} ± {np.std(v, ddof=1):.4f}"

    assert f"| 8 | flat | default (0.0308) | defaults | {sd(flat)} |" in md
    assert f"| norm_bias | {sd(bias)} |" in md and CHOSEN in md
    assert f"Non-private reference: mean test Dice {sd(ref)} (n = 3)" in md
    assert "an in-distribution split of the same dataset (0.3 of the non-test cases" in md
    assert "as close to the private data as public data can be" in md and "--seeds 4" in md
    assert (tmp_path / "dice_vs_epsilon.png").stat().st_size > 0


def test_reference_trainable_adds_a_subset_reference_that_no_ratio_divides_by(tmp_path):
    """--reference-trainable norm_bias: a second non-private reference (budget JSON with `trainable`), reported on its
    own line with its ratio to the ordinary reference, which stays the denominator of every ratio."""
    refs = reference_grid(["norm_bias"])
    assert refs == [Levers(), Levers(trainable="norm_bias")]  # the ordinary reference always comes first
    assert reference_grid(["norm_bias", "all", "norm_bias"]) == refs and reference_grid() == [Levers()]
    specs = run_grid(["nonprivate", "flat"], [8], [], lever_grid(), check_seeds(2), refs)
    assert [s.name for s in specs] == ["nonprivate_s1", "nonprivate_s2", "nonprivate_norm_bias_s1",
                                       "nonprivate_norm_bias_s2", "flat_eps8_s1", "flat_eps8_s2"]
    budget = {s.name: dp_settings(s, BUDGETS["tiny"]) for s in specs}
    assert "trainable" not in budget["nonprivate_s1"]  # today's reference folders resume unchanged
    assert budget["nonprivate_norm_bias_s1"] == {**budget["nonprivate_s1"], "trainable": "norm_bias"}
    assert set(budget["nonprivate_norm_bias_s1"]) <= set(NONPRIVATE_BUDGET_KEYS)  # what the trainer accepts
    for call, fragments in ((lambda: reference_grid(["everything"]), ["--reference-trainable = 'everything'",
                                                                     "'all', 'norm_bias', 'decoder'"]),
                            (lambda: reference_grid(["norm_bias"], reference=False),
                             ["--reference-trainable", "'nonprivate' in --rules too", "Add nonprivate"])):
        with pytest.raises(ExperimentError) as info:
            call()
        for fragment in fragments:
            assert fragment in str(info.value), (fragment, str(info.value))
    assert reference_grid(["all"], reference=False) == [Levers()]

    ref, subset, flat = [0.80, 0.84], [0.60, 0.62], [0.40, 0.44]
    results = _repeats("nonprivate", "nonprivate", None, ref, 0.9)
    results += _repeats("nonprivate_norm_bias", "nonprivate", None, subset, 0.7, "norm_bias")
    results += _repeats("flat_eps8", "flat", 8.0, flat, 0.5)
    write_report(str(tmp_path), _header(2), results)
    with open(tmp_path / "results.csv") as f:
        means = {r["run"]: r for r in csv.DictReader(f) if r["row"] == "mean ± sd"}
    assert float(means["flat_eps8"]["ratio_to_nonprivate"]) == pytest.approx(np.mean(flat) / np.mean(ref))
    assert float(means["nonprivate_norm_bias"]["ratio_to_nonprivate"]) == pytest.approx(np.mean(subset) / np.mean(ref))
    assert means["nonprivate_norm_bias"]["levers"] == "norm_bias" and means["nonprivate"]["levers"] == "n/a"
    md = (tmp_path / "results.md").read_text()
    sd = f"{np.mean(ref):.4f} ± {np.std(ref, ddof=1):.4f}"
    assert f"Non-private reference: mean test Dice {sd} (n = 2)" in md
    assert (f"Non-private reference training only `trainable: norm_bias` (--reference-trainable; what that subset can "
            f"hold without noise): mean test Dice {np.mean(subset):.4f} ± {np.std(subset, ddof=1):.4f} (n = 2), ratio "
            f"{np.mean(subset) / np.mean(ref):.4f}") in md


def _public_result(dice, val=0.6):
    """result.json of the public model alone (public_alone.execute's keys)."""
    return {"run": public_alone.PUBLIC_RUN, "rule": public_alone.PUBLIC_RULE, "target_epsilon": None,
            "cell": public_alone.PUBLIC_RUN, "repeat": None, "levers": "n/a", "epsilon": None, "noise_multiplier": None,
            "steps": 0, "initial_lr": None, "lr_used": None,
            "scores": {"none": {"dice": {"disk": dice, "ring": dice / 2}, "dice_mean": dice, "num_cases": 2}},
            "validation_dice": {"none": val}, "train_seconds": 0.0, "seconds": 5.0}


def test_public_model_alone_is_a_line_of_its_own_and_never_a_dp_row(tmp_path):
    """The public model alone: its own line in the headline (Dice, ratio to the ordinary reference), a row in the
    tables with no lr, steps 0 and no randomness; never in the DP headline rows nor in a choice; a failed one reads
    FAILED and is named."""
    ref, flat, public = [0.80, 0.84], [0.40, 0.44], 0.70
    results = [_public_result(public), *_repeats("nonprivate", "nonprivate", None, ref, 0.9),
               *_repeats("flat_eps8", "flat", 8.0, flat, 0.5)]
    header = _header(2, reproducible=True, start=PUBLIC_START)
    write_report(str(tmp_path), header, results)
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    row = next(r for r in table if r["run"] == public_alone.PUBLIC_RUN)
    assert float(row["ratio_to_nonprivate"]) == pytest.approx(public / np.mean(ref))
    assert (row["lr"], row["lr_source"], row["steps"], row["private_randomness"], row["choice"]) == \
        ("–", "–", "0", "n/a", "")
    flat_mean = next(r for r in table if r["run"] == "flat_eps8" and r["row"] == "mean ± sd")
    assert float(flat_mean["ratio_to_nonprivate"]) == pytest.approx(np.mean(flat) / np.mean(ref))  # still the reference
    md = (tmp_path / "results.md").read_text()
    assert (f"Public model alone (the public pretraining, no training on the private cases: ε = 0 for them): mean test "
            f"Dice {public:.4f}, ratio {public / np.mean(ref):.4f}.") in md
    headline = md.split("## Headline")[1].split("## All runs")[0]
    assert "| 8 | flat |" in headline and "| public |" not in headline and "public_alone" not in headline
    assert (tmp_path / "dice_vs_epsilon.png").stat().st_size > 0

    failed = public_alone.failed_result("CommandError: no checkpoint", 2.0, "log.txt")
    write_report(str(tmp_path), header, [failed, *results[1:]])
    md = (tmp_path / "results.md").read_text()
    assert "- **public_alone**: `CommandError: no checkpoint`" in md and "Public model alone (" not in md
    # run, refinement, epsilon, selection, epsilon_select, epsilon_total, sigma, steps, lr, then the Dice cells
    assert re.search(r"\| public_alone \| – \| – \| – \| – \| – \| – \| 0 \| – \| FAILED \|", md)


def test_public_model_alone_step_reports_a_failure_and_reads_back_a_finished_one(tmp_path, monkeypatch, capsys):
    ctx = Context("Dataset998_XPrivate", "2d", str(tmp_path), str(tmp_path / "pre"), "imgs", "labels", "cpu", 1, {},
                  ("none",))

    def boom(ctx_, step):
        raise RuntimeError("the public checkpoint is unreadable")

    monkeypatch.setattr(public_alone, "execute", boom)
    result = experiment_grid._public_alone(ctx, None)
    assert result["status"] == "failed" and result["error"] == "RuntimeError: the public checkpoint is unreadable"
    assert "[0] public model alone: FAILED after" in capsys.readouterr().out
    done = tmp_path / "runs" / public_alone.PUBLIC_RUN / "result.json"
    done.parent.mkdir(parents=True)
    done.write_text(json.dumps(_public_result(0.5)))
    assert experiment_grid._public_alone(ctx, None) == _public_result(0.5)  # not executed again
    assert "public model alone: finished earlier, skipped" in capsys.readouterr().out


# ---- --public-fraction ----------------------------------------------------------------------------------------------
def test_public_part_is_seeded_disjoint_case_level_and_sized():
    cases = [f"patient_{i:03d}" for i in range(60)]
    base = split_cases(cases, test_fraction=0.2, seed=5)
    a = split_public(base, public_fraction=0.3, seed=5)
    again = split_public(split_cases(list(reversed(cases)), test_fraction=0.2, seed=5), public_fraction=0.3, seed=5)
    assert a == again  # deterministic for a seed, whatever the input order
    assert a["test"] == base["test"]  # the held-out split is made first and kept
    parts = [set(a[k]) for k in ("test", "public", "val", "train")]
    assert sum(map(len, parts)) == 60 and set.union(*parts) == set(cases)  # disjoint and complete
    assert set(a["public"]).issubset(base["train"] + base["val"]) and set(a["public"]).isdisjoint(base["test"])
    assert all(c in cases for c in a["public"])  # whole cases (patients), never parts of one
    assert len(a["public"]) == round(0.3 * 48) == 14 and len(a["val"]) == round(0.2 * 34) and len(a["train"]) == 27
    assert split_public(base, public_fraction=0.3, seed=6)["public"] != a["public"]


@pytest.mark.parametrize(("fraction", "cases", "fragments"), [
    (0.0, 48, ["--public-fraction = 0.0", "strictly between 0 and 1", "--public-fraction 0.3"]),
    (1.0, 48, ["--public-fraction = 1.0", "strictly between 0 and 1"]),
    (0.02, 48, ["--public-fraction = 0.02", "at least 2 public cases", "0.031 <= F < 0.969", "gives 1 public",
                "Choose F in that range"]),
    (0.8, 5, ["--public-fraction = 0.8", "at least 2 private", "one training, one validation",
              "gives 4 public, 1 private", "lower --test-fraction"]),
    (0.5, 3, ["no value: the dataset is too small"]),
])
def test_bad_public_fraction_names_option_value_allowed_and_fix(fraction, cases, fragments):
    with pytest.raises(ExperimentError) as info:
        check_public_fraction(fraction, cases)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_derived_dataset_ids_avoid_the_users_and_refuse_a_clash(tmp_path):
    data = derived_datasets(str(tmp_path), "Dataset999_Liver")
    assert (data.public, data.private) == ("Dataset998_LiverPublic", "Dataset997_LiverPrivate")
    (tmp_path / "nnUNet_raw" / "Dataset998_Other").mkdir(parents=True)
    with pytest.raises(ExperimentError, match=r"-o = .*no other dataset with id 998.*Dataset998_Other.*new output"):
        derived_datasets(str(tmp_path), "Dataset999_Liver")
    env = data.env({"nnUNet_raw": "/user/raw", "PATH": "x"})
    assert env["nnUNet_raw"] == str(tmp_path / "nnUNet_raw") and env["PATH"] == "x"


def test_options_that_cannot_go_together_stop_before_any_work(tmp_path, monkeypatch, capsys):
    for var in ("nnUNet_raw", "nnUNet_preprocessed"):
        monkeypatch.setenv(var, str(tmp_path / var))
    out = tmp_path / "out"
    for argv, fragments in (
            (["--public-fraction", "0.3", "--pretrained", "x.pth"], ["--pretrained = 'x.pth'", "--public-fraction",
                                                                     "Give one of the two"]),
            (["--public-fraction", "1.5"], ["--public-fraction = 1.5", "strictly between 0 and 1"]),
            (["--rules", "nonprivate", "--ema-decay", "0.999"], ["--ema-decay", "DP rules in --rules too"]),
            (["--public-epochs", "32"], ["--public-epochs = 32", "together with --public-fraction"]),
            (["--public-fraction", "0.3", "--public-epochs", "0"], ["--public-epochs = 0", "an integer >= 1"]),
            (["--rules", "flat", "--reference-trainable", "norm_bias"], ["--reference-trainable",
                                                                        "'nonprivate' in --rules too"])):
        with pytest.raises(SystemExit) as info:
            experiment_cli.main(["-d", "1", "-o", str(out), *argv])
        for fragment in fragments:
            assert fragment in str(info.value), (fragment, str(info.value))
    assert not out.exists()


# ---- --pretrained FILE ------------------------------------------------------------------------------------------------
def test_pretrained_file_is_checked_against_the_plans_network(tmp_path):
    state = plans_network(json.loads(PLANS.read_text()), DATASET_JSON, "2d").state_dict()
    good = {k: torch.zeros(v.shape) for k, v in state.items() if ".seg_layers." not in k}  # heads never transfer
    torch.save({"network_weights": good}, tmp_path / "good.pth")
    assert pretrained_problems(str(tmp_path / "good.pth"), str(PLANS), DATASET_JSON, "2d", nonprivate=True) == []
    key = next(k for k in good if k.endswith(".weight") and good[k].ndim == 4)
    torch.save({"network_weights": {**good, key: torch.zeros(3, 3)}}, tmp_path / "wrong.pth")
    torch.save({"network_weights": {k: v for k, v in good.items() if k != key}}, tmp_path / "partial.pth")
    torch.save({"state_dict": good}, tmp_path / "state.pth")
    (tmp_path / "text.pth").write_text("not a torch file")
    expect = {"missing.pth": ["an existing nnU-Net checkpoint file", "Check the path"],
              "wrong.pth": ["other shapes", key, "file (3, 3)", "nnUNetv2_move_plans_between_datasets", "--budget"],
              "partial.pth": ["1 of the network's", "missing", key], "state.pth": ["'network_weights'"],
              "text.pth": ["a checkpoint torch.load can read"]}
    for name, fragments in expect.items():
        problems = pretrained_problems(str(tmp_path / name), str(PLANS), DATASET_JSON, "2d", nonprivate=True)
        assert len(problems) == 1 and problems[0].startswith(f"--pretrained = '{tmp_path / name}'"), problems
        for fragment in fragments:
            assert fragment in problems[0], (name, fragment, problems[0])


def test_budget_print_states_the_start_and_the_repeats():
    b = resolve_for_dataset("tiny", BUDGETS["tiny"], read_planned(str(PLANS), "2d"), Fold(40, 10, 12))
    plans, _ = plan_runs(run_grid(["flat"], [8], [], lever_grid(["norm_bias"], [4], ["0.999"]), 2), b, None, "tiny")
    from nnunet_dp.experiment.budget import budget_summary

    summary = budget_summary(b, plans, "Dataset902_Hippocampus", "2d", {"from": "public part", "public_fraction": 0.3,
                                                                         "num_public_cases": 14}, 2)
    text = format_budget(summary)
    assert "at most: the fine-tuning rule sets it from the public weights" in text
    assert "14 public cases = --public-fraction 0.3" in text and "the ETA is measured on the first DP run after it" in text
    assert "--seeds 2" in text and "flat_eps8_norm_bias_k4_ema0.999_s2" in text
    run_ = summary["runs"][1]
    assert (run_["trainable"], run_["augmentations_per_case"], run_["ema_decay"], run_["repeat"]) == (
        "norm_bias", 4, 0.999, 2)
    assert summary["seeds"] == 2 and summary["start"]["from"] == "public part"
    longer = format_budget(budget_summary(b, plans, "Dataset902_Hippocampus", "2d", {
        "from": "public part", "public_fraction": 0.3, "num_public_cases": 14, "public_epochs": 32}, 2))
    assert f"32 epochs of {summary['num_iterations_per_epoch']} steps (--public-epochs)" in longer
    assert "same budget" in text and "same budget" not in longer


# ---- end to end ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def public_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("levers")
    make_dataset(str(root / "raw"), dataset_id=DATASET_ID, name="LevTest", num_train=16, num_test=0, shape=(32, 32),
                 seed=DATASET_ID)
    (root / "minimal.json").write_text(json.dumps(MINIMAL))
    out = root / "out"
    cmd = ["nnUNetv2_dp_experiment", "-d", str(DATASET_ID), "-c", "2d", "--rules", "flat", "--epsilons",
           "8", "--public-fraction", "0.3", "--public-epochs", "2", "--seeds", "2", "--trainable", "norm_bias", "--augmentations-per-case", "2",
           "--ema-decay", "0.9", "--refine", "none",
           "--budget", str(root / "minimal.json"), "-o", str(out), "-device", "cpu", "-np", "1"]
    env = nnunet_env(root)
    return {"out": out, "cmd": cmd, "env": env, "first": run(cmd, env)}


CELL = "flat_eps8_norm_bias_k2_ema0.9"
RUNS = (f"{CELL}_s1", f"{CELL}_s2")  # the non-private reference's repeats: test_seeds_tables_show_mean_and_sd...


def test_public_pretraining_then_private_fine_tuning_with_two_seeds(public_run):
    out, stdout = public_run["out"], public_run["first"].stdout
    assert stdout.count("[0] public pretraining: ordinary nnU-Net training") == 1  # trained once
    ckpt = next((out / "public" / "nnUNet_results").glob("Dataset*Public/*__nnUNetPlans__2d/fold_all/"
                                                         "checkpoint_final.pth"))
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    split = json.loads((out / "split.json").read_text())
    assert split["public_fraction"] == 0.3 and len(split["public"]) == 4  # round(0.3 x 13)
    assert set(split["public"]).isdisjoint(split["test"] + split["train"] + split["val"])
    public_raw = next((out / "nnUNet_raw").glob("Dataset*Public"))
    assert sorted(p.name[:-len(".nii.gz")] for p in (public_raw / "labelsTr").iterdir()) == split["public"]
    for name in RUNS:
        result = json.loads((out / "runs" / name / "result.json").read_text())
        model = Path(result["model_folder"])
        assert model.name.endswith("__nnUNetPlans_public__2d") and result["pretrained"] == str(ckpt)
        plans = json.loads((model / "plans.json").read_text())
        assert plans["plans_name"] == "nnUNetPlans_public" and plans["dataset_name"].endswith("Private")
        assert plans["configurations"]["2d"]["architecture"]["arch_kwargs"]["features_per_stage"] == [8, 16, 32]
        log = (out / "runs" / name / "log.txt").read_text()
        assert re.search(r"nnUNetv2_train \S+Private 2d 0 .*-p nnUNetPlans_public -pretrained_weights " +
                         re.escape(str(ckpt)), log)
        privacy = json.loads((model / "fold_0" / "privacy.json").read_text())
        assert privacy["pretrained_weights"]["sha256"] == digest and privacy["trainable"] == "norm_bias"
        assert privacy["pretrained_weights"]["heads_transferred"] is True
        assert privacy["augmentations_per_case"] == 2 and privacy["ema_decay"] == 0.9
        final = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
        assert final["ema_updates"] == privacy["steps"] and "raw_network_weights" in final  # EMA released
        assert privacy["num_training_cases"] == len(split["train"])
        assert "seed" not in json.loads((out / "runs" / name / "settings.json").read_text())
    md = (out / "results.md").read_text()
    assert "as close to the private data as public data can be" in md
    assert "--seeds 2" in md and re.search(r"\| 8 \| flat \| default \([0-9.]+\) \| norm_bias, K=2, EMA 0.9 \| "
                                         r"[0-9.]+ ± [0-9.]+ \|", md)
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["run"] for r in rows if r["row"] == "repeat"} == set(RUNS)
    assert {r["run"]: r["n"] for r in rows if r["row"] == "mean ± sd"} == {CELL: "2", public_alone.PUBLIC_RUN: "1"}
    assert [r["row"] for r in rows if r["run"] == public_alone.PUBLIC_RUN] == ["run", "mean ± sd"]
    budget = json.loads((out / "budget.json").read_text())
    assert budget["num_training_cases"] == len(split["train"]) and budget["seeds"] == 2
    # --public-epochs 2: the public model trained 2 epochs where the budget (MINIMAL) gives the DP runs 1
    assert json.loads((out / "public" / "settings.json").read_text())["num_epochs"] == 2 == 2 * MINIMAL["num_epochs"]
    public_log = next(ckpt.parent.glob("training_log_*.txt")).read_text()
    assert re.findall(r": Epoch (\d+)\s", public_log) == ["0", "1"]
    assert budget["start"]["public_epochs"] == 2 and "same budget but 2 epochs: --public-epochs" in md


def _numpy_dice(pred: Path, labels: Path, cases: list[str], classes: dict[str, int]) -> dict[str, float]:
    """nnU-Net's Dice recomputed with numpy: per class and case 2|P∩G| / (|P| + |G|) (NaN where both are empty), the
    mean over the cases that are not NaN."""
    out = {}
    for name, value in classes.items():
        per_case = []
        for case in cases:
            p, g = (sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{case}.nii.gz"))) == value
                    for folder in (pred, labels))
            per_case.append(np.nan if p.sum() + g.sum() == 0 else 2 * (p & g).sum() / (p.sum() + g.sum()))
        out[name] = float(np.nanmean(per_case))
    return out


def _public_setup(public_run):
    """(the public checkpoint, the split, the class labels, the private gt_segmentations) of the fixture's folder."""
    out = public_run["out"]
    ckpt = next((out / "public" / "nnUNet_results").glob("*/*/fold_all/checkpoint_final.pth"))
    labels = json.loads((ckpt.parent.parent / "dataset.json").read_text())["labels"]
    gt = next((out / "nnUNet_preprocessed").glob("Dataset*Private")) / "gt_segmentations"
    return ckpt, json.loads((out / "split.json").read_text()), {k: v for k, v in labels.items() if v != 0}, gt


def _cases(folder: Path) -> set[str]:
    return {f.name[:-len(".nii.gz")] for f in folder.iterdir() if f.name.endswith(".nii.gz")}


def test_the_public_model_alone_is_scored_like_a_run(public_run):
    """With --public-fraction the public model itself, no private training, is predicted on the private validation
    cases and the test cases and scored (Dice against numpy), right after the pretraining; results.md has its line."""
    out, stdout = public_run["out"], public_run["first"].stdout
    ckpt, split, classes, gt = _public_setup(public_run)
    folder = out / "runs" / public_alone.PUBLIC_RUN
    result = json.loads((folder / "result.json").read_text())
    assert (result["rule"], result["steps"], result["epsilon"], result["checkpoint"]) == ("public", 0, None, str(ckpt))
    log = (folder / "log.txt").read_text()
    assert log.count("nnUNetv2_predict_from_modelfolder -i ") == 2 and f" -m {ckpt.parent.parent} -f all " in log
    assert _cases(folder / "validation") == set(split["val"]) and _cases(folder / "test" / "none") == set(split["test"])
    dice = _numpy_dice(folder / "test" / "none", out / "test_data" / "labelsTs", split["test"], classes)
    assert result["scores"]["none"]["dice"] == pytest.approx(dice)
    assert result["scores"]["none"]["dice_mean"] == pytest.approx(np.mean(list(dice.values())))
    val = _numpy_dice(folder / "validation", gt, split["val"], classes)
    assert result["validation_dice"]["none"] == pytest.approx(np.mean(list(val.values())))
    assert stdout.index("[0] public pretraining: done") < stdout.index("[0] public model alone: done in") < \
        stdout.index("[1/")
    md = (out / "results.md").read_text()
    assert f"Public model alone (the public pretraining, no training on the private cases: ε = 0 for them): mean " \
           f"test Dice {result['scores']['none']['dice_mean']:.4f}, ratio –." in md  # no reference in this grid


def test_the_public_model_alone_gets_dp_morph_chosen_on_validation(public_run, tmp_path):
    """The step with DP-Morph (here global, into another folder that already holds the grid's predictions: they are
    not predicted again): the choice is made on the validation predictions (its dice_after is the validation score),
    privately by default (ε = ε_select alone: no training on the private cases), and applied to the test
    predictions, scored against numpy; without refinement the scores equal the grid's."""
    out = public_run["out"]
    ckpt, split, classes, _ = _public_setup(public_run)
    data = derived_datasets(str(out), f"Dataset{DATASET_ID}_LevTest")
    env = dict(public_run["env"])  # where the harness's nnU-Net commands find its non-private trainer (cli._environment)
    env["nnUNet_extTrainer"] += os.pathsep + str(Path(nnunet_dp.experiment.__file__).parent / "trainers")
    ctx = Context(data.private, "2d", str(tmp_path), data.preprocessed, str(out / "test_data" / "imagesTs"),
                  str(out / "test_data" / "labelsTs"), "cpu", 1, data.env(env), ("none", "global"),
                  "nnUNetPlans_public")
    step = public_alone.PublicAlone(PublicPretraining(data, "2d", "cpu", {}, env), tuple(split["val"]), ".nii.gz")
    assert step.pretraining.checkpoint == str(ckpt)
    done = out / "runs" / public_alone.PUBLIC_RUN  # its predictions are reused: a folder that holds them is skipped
    for sub in ("validation", "test/none"):
        shutil.copytree(done / sub, tmp_path / "runs" / public_alone.PUBLIC_RUN / sub)
    result = public_alone.execute(ctx, step)
    assert not (tmp_path / "runs" / public_alone.PUBLIC_RUN / "log.txt").exists()  # no nnU-Net command ran
    grid = json.loads((out / "runs" / public_alone.PUBLIC_RUN / "result.json").read_text())
    assert result["scores"]["none"] == grid["scores"]["none"]  # the same model, the same cases: the same prediction
    chosen = json.loads((tmp_path / "runs" / public_alone.PUBLIC_RUN / "test" / "dpmorph_global" /
                         "postprocessing.json").read_text())["dp_morph"]
    assert result["dpmorph_choice"]["global"] == chosen["choice"]
    assert chosen["privacy"]["private_selection"] is True and chosen["privacy"]["private_randomness"] is True
    assert chosen["privacy"]["epsilon_select"] == DEFAULT_EPSILON_SELECT and "dice_after" not in chosen
    withheld = json.loads((tmp_path / "runs" / public_alone.PUBLIC_RUN / "test" / "dpmorph_global" /
                           "postprocessing_scores.json").read_text())  # not privatised: kept beside the choice
    assert result["validation_dice"]["global"] == withheld["dice_after"]["foreground_mean"]
    assert result["dpmorph_selection"] == {"mode": "private", "epsilon_select": DEFAULT_EPSILON_SELECT}
    morph = result["selection"]["global"]
    assert (morph["selection"], morph["epsilon_training"], morph["epsilon_total"]) == ("private", 0.0,
                                                                                      DEFAULT_EPSILON_SELECT)
    write_report(str(tmp_path), _header(1, start=PUBLIC_START), [result])
    with open(tmp_path / "results.csv") as f:
        row = next(r for r in csv.DictReader(f) if r["refinement"] == "global")
    assert (row["selection"], float(row["epsilon_total"]), row["private_randomness"]) == (
        "private", DEFAULT_EPSILON_SELECT, "yes")
    assert (f"With DP-Morph its ε is the selection's alone: ε = ε_select = {DEFAULT_EPSILON_SELECT:g} for the private "
            "cases") in (tmp_path / "results.md").read_text()
    refined = tmp_path / "runs" / public_alone.PUBLIC_RUN / "test" / "global"
    assert _cases(refined) == set(split["test"])
    dice = _numpy_dice(refined, out / "test_data" / "labelsTs", split["test"], classes)
    assert result["scores"]["global"]["dice"] == pytest.approx(dice)


def test_a_public_model_of_other_labels_is_scored_on_the_private_labels_without_dp_morph(public_run, tmp_path):
    """Label shift: the private dataset.json has other labels than the public model (here anterior only). The public
    model alone is scored on the private labels as it predicts (Dice against numpy), no DP-Morph is chosen for it
    (a class-wise choice needs the private classes; before, the choice failed on labels it did not know and the
    row was lost), and the report still writes its line."""
    out = public_run["out"]
    _, split, classes, gt = _public_setup(public_run)
    data = derived_datasets(str(out), f"Dataset{DATASET_ID}_LevTest")
    env = dict(public_run["env"])
    env["nnUNet_extTrainer"] += os.pathsep + str(Path(nnunet_dp.experiment.__file__).parent / "trainers")
    private = tmp_path / "pre" / data.private
    private.mkdir(parents=True)
    (private / "gt_segmentations").symlink_to(gt)
    dataset_json = json.loads((gt.parent / "dataset.json").read_text())
    dataset_json["labels"] = {"background": 0, "anterior": 1}
    (private / "dataset.json").write_text(json.dumps(dataset_json))
    ctx = Context(data.private, "2d", str(tmp_path), str(tmp_path / "pre"), str(out / "test_data" / "imagesTs"),
                  str(out / "test_data" / "labelsTs"), "cpu", 1, data.env(env), ("none", "global"),
                  "nnUNetPlans_public")
    step = public_alone.PublicAlone(PublicPretraining(data, "2d", "cpu", {}, env), tuple(split["val"]), ".nii.gz")
    done = out / "runs" / public_alone.PUBLIC_RUN
    for sub in ("validation", "test/none"):
        shutil.copytree(done / sub, tmp_path / "runs" / public_alone.PUBLIC_RUN / sub)
    result = public_alone.execute(ctx, step)
    assert set(result["scores"]) == {"none"} and result["dpmorph_choice"] == {} and "no DP-Morph" in result["labels"]
    folder = tmp_path / "runs" / public_alone.PUBLIC_RUN
    assert not (folder / "test" / "dpmorph_global").exists()
    dice = _numpy_dice(folder / "test" / "none", out / "test_data" / "labelsTs", split["test"], {"anterior": 1})
    assert result["scores"]["none"]["dice"] == pytest.approx(dice)
    grid = json.loads((done / "result.json").read_text())
    assert grid["labels"] == "same as the private dataset" and set(grid["scores"]["none"]["dice"]) == set(classes)
    write_report(str(tmp_path), _header(1, start=PUBLIC_START), [result])
    assert "Public model alone" in (tmp_path / "results.md").read_text()


def test_second_invocation_skips_the_pretraining_and_every_run(public_run):
    out = public_run["out"]
    ckpts = sorted(out.glob("**/checkpoint_final.pth"))
    assert len(ckpts) == 1 + len(RUNS)
    before = [c.stat().st_mtime_ns for c in ckpts]
    again = run(public_run["cmd"], public_run["env"])
    assert "public pretraining: finished earlier, skipped" in again.stdout
    assert "public model alone: finished earlier, skipped" in again.stdout
    assert again.stdout.count("finished earlier, skipped") == 2 + len(RUNS)
    assert "nnUNetv2_train" not in again.stdout and "Preprocessing:" not in again.stdout
    assert [c.stat().st_mtime_ns for c in ckpts] == before
    other = [a if a != "2" or p != "--public-epochs" else "3" for p, a in zip(["", *public_run["cmd"]], public_run["cmd"])]
    refused = run(other, public_run["env"], check=False)  # the folder's public model trained 2 epochs, not 3
    assert refused.returncode != 0 and "num_epochs 2 -> 3" in refused.stderr and "--public-epochs" in refused.stderr
    assert [c.stat().st_mtime_ns for c in ckpts] == before


def test_a_given_pretrained_file_starts_every_run_of_a_real_grid(public_run, tmp_path):
    """--pretrained FILE (here the public model above, as a user would bring one): checked, then passed to
    nnUNetv2_train -pretrained_weights of the DP run, recorded with its sha256 in privacy.json, budget.json and the
    report; --reference-trainable norm_bias trains a second reference with the kernels frozen."""
    ckpt = next((public_run["out"] / "public" / "nnUNet_results").glob("*/*/fold_all/checkpoint_final.pth"))
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    out = tmp_path / "out"
    budget = public_run["out"].parent / "minimal.json"
    run(["nnUNetv2_dp_experiment", "-d", str(DATASET_ID), "-c", "2d", "--rules", "nonprivate", "flat", "--epsilons", "8",
         "--pretrained", str(ckpt), "--trainable", "norm_bias", "--reference-trainable", "norm_bias", "--refine", "none",
         "--budget", str(budget), "-o", str(out), "-device", "cpu", "-np", "1"], public_run["env"])
    result = json.loads((out / "runs" / "flat_eps8_norm_bias" / "result.json").read_text())
    assert result["pretrained"] == str(ckpt)
    privacy = json.loads((Path(result["model_folder"]) / "fold_0" / "privacy.json").read_text())
    assert privacy["pretrained_weights"]["sha256"] == digest and privacy["trainable"] == "norm_bias"
    assert "-pretrained_weights " + str(ckpt) in (out / "runs" / "flat_eps8_norm_bias" / "log.txt").read_text()
    # same labels: the DP run and the non-private reference both start from the public heads too
    assert privacy["pretrained_weights"]["heads_transferred"] is True
    for name in ("flat_eps8_norm_bias", "nonprivate"):
        assert "segmentation heads transferred from the public checkpoint too" in (
            out / "runs" / name / "log.txt").read_text(), name
    assert json.loads((out / "budget.json").read_text())["start"] == {"from": "file", "path": str(ckpt),
                                                                     "sha256": digest}
    # --reference-trainable norm_bias: nnU-Net's own step trains the biases, norms and heads only; every convolution
    # kernel (4-D weight outside the heads) stays as loaded, where the ordinary reference changes them all
    public = torch.load(ckpt, map_location="cpu", weights_only=False)["network_weights"]
    for name, subset in (("nonprivate", False), ("nonprivate_norm_bias", True)):
        folder = Path(json.loads((out / "runs" / name / "result.json").read_text())["model_folder"]) / "fold_0"
        final = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
        kernels = [k for k, v in public.items() if v.ndim == 4 and ".seg_layers." not in k]
        others = [k for k in public if k not in kernels and ".seg_layers." not in k and public[k].is_floating_point()]
        assert len(kernels) > 5 and others
        assert all(torch.equal(final[k], public[k]) for k in kernels) is subset, name
        assert not all(torch.equal(final[k], public[k]) for k in others), name  # the biases and norms trained
    log = (out / "runs" / "nonprivate_norm_bias" / "log.txt").read_text()
    assert re.search(r"non-private reference: trainable=norm_bias: \d+ of \d+ parameters trained", log)
    md = (out / "results.md").read_text()
    assert "Non-private reference training only `trainable: norm_bias` (--reference-trainable" in md
    assert f"**Start: fine-tuned from {ckpt}** (sha256 {digest})" in (out / "results.md").read_text()
