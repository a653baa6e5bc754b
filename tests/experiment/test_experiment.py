"""nnUNetv2_dp_experiment: the held-out split, the DP-Morph choice blind to test labels and private by default (each
refined row's ε composed with ε_select), the lr sweep and its choice on validation, and a minimal end-to-end run
(non-private + flat at one ε with the default lr rule and --lrs 0.05, all three refinements) with resume."""
from __future__ import annotations

import csv
import json
import math
import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from e2e import nnunet_env, run
from opacus.accountants import PRVAccountant, RDPAccountant

from nnunet_dp.commands import experiment as experiment_cli
from nnunet_dp.config import DPConfig
from nnunet_dp.experiment.aggregate import CHOSEN, DEFAULT, mark_choice
from nnunet_dp.experiment.dpmorph import choose_and_apply, stale_choice
from nnunet_dp.experiment.grid import finished_result
from nnunet_dp.experiment.plan import (
    BUDGETS,
    ExperimentError,
    dp_settings,
    resolve_budget,
    run_grid,
    split_cases,
)
from nnunet_dp.experiment.report import write_report
from nnunet_dp.experiment.run import Context
from nnunet_dp.optim import default_lr
from nnunet_dp.release import compose_release
from nnunet_dp.release_folders import load_fold
from nnunet_dp.synthetic import make_dataset
from nnunet_dp.tools.morph_selection import (
    DEFAULT as PRIVATE_DEFAULT,
)
from nnunet_dp.tools.morph_selection import (
    DEFAULT_EPSILON_SELECT,
    NONPRIVATE,
    NOT_PRIVATE,
    MorphSelection,
    read_selection,
)

DATASET_ID = 977
SWEEP_LR = 0.05  # the end-to-end run's --lrs
RUNS = ("nonprivate", "flat_eps8", f"flat_eps8_lr{SWEEP_LR:g}")
MINIMAL = {"num_epochs": 1, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1, "batch_size": 4,
           "save_every": 1, "features_per_stage": [8, 16, 32]}  # 3 stages: nnU-Net's loss is NaN with 2


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
    dp = dp_settings(specs[1], BUDGETS["tiny"])
    assert dp["target_epsilon"] == 1 and dp["expected_batch_size"] == BUDGETS["tiny"].batch_size
    base = dp_settings(specs[0], BUDGETS["tiny"])
    assert base["batch_size"] == dp["expected_batch_size"] and base["num_epochs"] == dp["num_epochs"]
    assert base["num_iterations_per_epoch"] == dp["num_iterations_per_epoch"]
    with pytest.raises(ExperimentError, match="--budget"):
        resolve_budget("huge")


def test_dp_runs_get_no_seed_unless_reproducible():
    """docs/invariants.md, invariant 8: by default no DP run's settings hold a seed (fresh OS entropy); --seed seeds the split
    only. --reproducible passes it to the DP runs, never to the non-private baseline."""
    specs = run_grid(["nonprivate", "flat", "psac"], [1, 8])
    assert all("seed" not in dp_settings(s, BUDGETS["tiny"]) for s in specs)
    assert all("seed" not in dp_settings(s, BUDGETS["tiny"], None) for s in specs)
    assert [dp_settings(s, BUDGETS["tiny"], 7).get("seed") for s in specs] == [None, 7, 7, 7, 7]
    parser = experiment_cli.build_parser()
    args = parser.parse_args(["-d", "1"])
    assert args.seed == 0 and args.reproducible is False
    assert parser.parse_args(["-d", "1", "--reproducible", "--seed", "3"]).reproducible is True
    assert "held-out test split only" in " ".join(parser.format_help().split())


def test_dp_settings_have_no_initial_lr_unless_lrs():
    """DP runs leave the lr to the trainers' default rule (no initial_lr, no momentum: the DP default 0.9); --lrs adds
    one run per lr with initial_lr = LR. The baseline keeps the budget's lr in every case."""
    budget = BUDGETS["tiny"]
    plain = run_grid(["nonprivate", "flat", "psac"], [1, 8])
    assert [s.lr for s in plain] == [None] * 5
    settings = [dp_settings(s, budget) for s in plain]
    assert settings[0]["initial_lr"] == budget.nonprivate_lr
    assert all("initial_lr" not in d and "momentum" not in d for d in settings[1:])
    specs = run_grid(["nonprivate", "flat"], [1, 8], [0.05, 0.2, 0.05])
    assert [s.name for s in specs] == ["nonprivate", "flat_eps1", "flat_eps1_lr0.05", "flat_eps1_lr0.2", "flat_eps8",
                                       "flat_eps8_lr0.05", "flat_eps8_lr0.2"]
    assert [dp_settings(s, budget).get("initial_lr") for s in specs] == [
        budget.nonprivate_lr, None, 0.05, 0.2, None, 0.05, 0.2]
    assert all("momentum" not in dp_settings(s, budget) for s in specs)
    assert experiment_cli.build_parser().parse_args(["-d", "1", "--lrs", "0.05", "0.2"]).lrs == [0.05, 0.2]


@pytest.mark.parametrize("bad", [[0.0], [-0.1], [float("nan")], [float("inf")], [0.1, 0.1000000001]])
def test_bad_lrs_name_the_option(bad):
    with pytest.raises(ExperimentError, match="--lrs"):
        run_grid(["flat"], [8], bad)


def test_bad_lrs_stop_before_any_work(tmp_path, monkeypatch):
    for var in ("nnUNet_raw", "nnUNet_preprocessed"):
        monkeypatch.setenv(var, str(tmp_path / var))
    with pytest.raises(SystemExit, match=r"--lrs = -0\.1 is not allowed: expected finite numbers > 0"):
        experiment_cli.main(["-d", "1", "--rules", "flat", "--lrs", "0.05", "-0.1", "-o", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match=r"--lrs.*DP rules"):
        experiment_cli.main(["-d", "1", "--rules", "nonprivate", "--lrs", "0.05", "-o", str(tmp_path / "out")])
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(("argv", "fragments"), [
    (["--epsilon-select", "0"], ["--epsilon-select = 0.0 is not allowed: expected a finite number > 0",
                                 "--epsilon-select 1"]),
    (["--epsilon-select", "inf"], ["--epsilon-select = inf"]),
    (["--dpmorph-selection", "nonprivate", "--epsilon-select", "2"], [
        "--epsilon-select = 2.0 is not allowed: expected no value with --dpmorph-selection nonprivate",
        "Drop --epsilon-select"]),
    (["--dpmorph-selection", "argmax"], ["--dpmorph-selection = 'argmax'", "['private', 'nonprivate']"]),
])
def test_bad_selection_options_stop_before_any_work(tmp_path, monkeypatch, argv, fragments):
    for var in ("nnUNet_raw", "nnUNet_preprocessed"):
        monkeypatch.setenv(var, str(tmp_path / var))
    with pytest.raises(SystemExit) as info:
        experiment_cli.main(["-d", "1", "-o", str(tmp_path / "out"), *argv])
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
    assert os.listdir(tmp_path) == []


def _refined(run_, rule, eps, selection, *, total=None, dice=0.45, public=False):
    """A result.json with none and global scores; `selection` None: one written before the selection options."""
    r = _fake_result(run_, rule, eps, dice=dice)
    r["scores"]["global"] = {"dice": {"disk": 0.6, "ring": 0.5}, "dice_mean": dice + 0.1, "num_cases": 2}
    r["validation_dice"]["global"] = 0.35
    if public:
        r.update(rule="public", target_epsilon=None, epsilon=None, steps=0, initial_lr=None, lr_used=None)
    if selection is not None:
        r["dpmorph_selection"] = selection.record()
        private = selection.mode == "private"
        r["selection"] = {"global": {"selection": "private" if private else NOT_PRIVATE,
                                     "epsilon_select": selection.epsilon_select, "epsilon_total": total}}
    return r


def test_report_labels_every_refined_row_by_how_its_choice_was_made(tmp_path):
    """Private: the row carries ε_select and the composed ε (the plot places it there); not private (the option, or a
    result.json from before it): 'selection not private', no epsilon_total, private_randomness no; the public model
    alone: ε_select alone."""
    private = MorphSelection("private", 0.5)
    results = [_refined("nonprivate", "nonprivate", None, private, dice=0.8),
               _refined("flat_eps8", "flat", 8.0, private, total=8.5),
               _refined("flat_eps1", "flat", 1.0, None),
               _refined("public_alone", "public", None, private, total=0.5, public=True)]
    write_report(str(tmp_path), {**_header(), "dpmorph_selection": private.record()}, results)
    with open(tmp_path / "results.csv") as f:
        table = {(r["run"], r["refinement"]): r for r in csv.DictReader(f)}
    fields = ("selection", "epsilon_select", "epsilon_total", "private_randomness")
    assert [table[("flat_eps8", "global")][k] for k in fields] == ["private", "0.5", "8.5", "yes"]
    assert [table[("flat_eps8", "none")][k] for k in fields] == ["–", "", "8.0", "yes"]
    assert [table[("flat_eps1", "global")][k] for k in fields] == [NOT_PRIVATE, "", "", "no (selection not private)"]
    assert [table[("nonprivate", "global")][k] for k in fields] == ["private", "0.5", "", "n/a"]
    assert [table[("public_alone", "global")][k] for k in fields] == ["private", "0.5", "0.5", "yes"]
    assert [table[("public_alone", "none")][k] for k in fields] == ["–", "", "0.0", "n/a"]
    md = (tmp_path / "results.md").read_text()
    assert "DP-Morph: private selection, ε_select = 0.5 per refined row" in md
    assert "| run | refinement | epsilon | selection | epsilon_select | epsilon_total |" in md
    assert "| flat_eps8 | global | 8.0000 | private | 0.5000 | 8.5000 |" in md
    assert f"| flat_eps1 | global | 1.0000 | {NOT_PRIVATE} | – | – |" in md
    assert "ε = ε_select = 0.5 for the private cases" in md
    gains = md.split("## DP-Morph gains")[1]
    assert "| flat_eps8 | private |" in gains and f"| flat_eps1 | {NOT_PRIVATE} |" in gains
    write_report(str(tmp_path), {**_header(), "dpmorph_selection": NONPRIVATE.record()},
                 [_refined("flat_eps8", "flat", 8.0, NONPRIVATE), _refined("public_alone", "public", None,
                                                                           NONPRIVATE, public=True)])
    md = (tmp_path / "results.md").read_text()
    assert f"**DP-Morph: {NOT_PRIVATE}** (`--dpmorph-selection nonprivate`)" in md
    assert f"With DP-Morph: {NOT_PRIVATE} (the choice reads the private validation labels without noise)" in md


def test_a_changed_selection_makes_a_finished_run_choose_again(tmp_path):
    """A result.json is reported only under the selection it was made with; one from before the options counts as not
    private; a run without refinement has nothing to choose again."""
    result = _refined("flat_eps8", "flat", 8.0, PRIVATE_DEFAULT, total=9.0)
    assert stale_choice(result, PRIVATE_DEFAULT) is None
    assert f"choice (private (ε_select = 1)) is not this invocation's ({NOT_PRIVATE}): choosing again" in \
        stale_choice(result, NONPRIVATE)
    assert "private (ε_select = 2)" in stale_choice(result, MorphSelection("private", 2.0))
    old = _refined("flat_eps8", "flat", 8.0, None)
    assert f"choice ({NOT_PRIVATE}) is not this invocation's (private (ε_select = 1))" in \
        stale_choice(old, PRIVATE_DEFAULT)
    assert stale_choice(old, NONPRIVATE) is None and stale_choice(_fake_result("a", "flat", 8.0), PRIVATE_DEFAULT) is None
    ctx = Context("D", "2d", str(tmp_path), "pre", "img", "lab", "cpu", 1, {}, ("none", "global"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "result.json").write_text(json.dumps(old))
    assert finished_result(ctx, str(tmp_path / "run"))[1] == stale_choice(old, PRIVATE_DEFAULT)
    assert finished_result(ctx, str(tmp_path / "none")) == (None, None)


def _row(rule, eps, refine, lr, val, source="--lrs"):
    return {"run": f"{rule}_{eps}_{lr}", "rule": rule, "target_epsilon": eps, "refinement": refine, "lr_value": lr,
            "lr_source": source, "validation_dice": val, "dice_mean": 0.5}


def test_mark_choice_on_hand_made_rows():
    """Per (rule, ε, refinement) with several lrs: the best validation Dice is chosen (never the test Dice; equals: the
    first; non-finite never), the default-rule row is labelled; single-lr groups and the baseline stay unmarked."""
    table = [_row("nonprivate", None, "none", 0.01, 0.9, "budget"),
             _row("flat", 8.0, "none", 0.03, 0.40, DEFAULT), _row("flat", 8.0, "none", 0.05, 0.60),
             _row("flat", 8.0, "none", 0.2, 0.50),
             _row("flat", 8.0, "global", 0.03, 0.70, DEFAULT), _row("flat", 8.0, "global", 0.05, 0.65),
             _row("flat", 8.0, "global", 0.2, float("nan")),
             _row("flat", 1.0, "none", 0.01, 0.1, DEFAULT), _row("flat", 1.0, "none", 0.05, 0.1),
             _row("psac", 8.0, "none", 0.03, 0.3, DEFAULT), _row("psac", 8.0, "none", 0.05, None),
             _row("autos", 8.0, "none", 0.03, 0.3, DEFAULT)]
    table[2]["dice_mean"] = 0.0  # the test Dice plays no part
    marked = mark_choice(table)
    assert [r["choice"] for r in marked] == ["", DEFAULT, CHOSEN, "", CHOSEN, "", "", CHOSEN, "", CHOSEN, "", ""]
    assert "choice" not in table[0]  # a pure function: the input rows are unchanged
    groups = {(r["rule"], r["target_epsilon"], r["refinement"]) for r in marked if r["rule"] != "nonprivate"}
    multi = [g for g in groups if g != ("autos", 8.0, "none")]
    for group in multi:
        assert [r["choice"] for r in marked if (r["rule"], r["target_epsilon"], r["refinement"]) == group
                ].count(CHOSEN) == 1


def _fake_result(run, rule, eps, lr=None, val=0.3, dice=0.45):
    scores = {"none": {"dice": {"disk": 0.5, "ring": 0.4}, "dice_mean": dice, "num_cases": 2}}
    privacy = {"noise_multiplier": 2.6, "clip_norm": 1.0, "expected_batch_size": 32.0, "planned_steps": 400} if eps \
        else {"noise_multiplier": None}
    return {"run": run, "rule": rule, "target_epsilon": eps, "epsilon": eps, **privacy, "steps": 4,
            "initial_lr": 0.1 if rule == "nonprivate" else lr, "scores": scores, "validation_dice": {"none": val},
            "train_seconds": 6.0, "seconds": 9.0}


def _header(reproducible=False):
    return {"dataset": "Dataset977_ExpTest", "configuration": "2d", "seed": 3, "reproducible": reproducible,
            "budget": {"name": "minimal", "steps": 4, "batch_size": 4},
            "split": {"num_test": 2, "num_train": 10, "num_val": 3}, "command": "nnUNetv2_dp_experiment ..."}


def test_report_states_the_default_lr_and_the_validation_choice(tmp_path):
    """The default-rule lr is recomputed from the run's privacy fields; the headline compares it with the lr chosen
    on validation (here 0.05: better validation Dice, worse test Dice)."""
    write_report(str(tmp_path), _header(), [
        _fake_result("nonprivate", "nonprivate", None, dice=0.8), _fake_result("flat_eps8", "flat", 8.0, None, 0.3, 0.4),
        _fake_result("flat_eps8_lr0.05", "flat", 8.0, 0.05, 0.5, 0.2)])
    lr = default_lr(noise_multiplier=2.6, clip_norm=1.0, expected_batch_size=32.0, steps=400,
                    momentum=DPConfig().momentum)
    assert lr == pytest.approx((1 - 0.9) * 0.5 * 32 / (2.6 * 1.0 * 400 ** 0.5))  # (1-β)·τ·qN/(σC√T), uncapped
    with open(tmp_path / "results.csv") as f:
        table = {r["run"]: r for r in csv.DictReader(f)}
    assert table["flat_eps8"]["lr"] == "default (0.0308)" and float(table["flat_eps8"]["lr_value"]) == lr
    assert table["flat_eps8"]["choice"] == DEFAULT and table["flat_eps8_lr0.05"]["choice"] == CHOSEN
    assert table["flat_eps8_lr0.05"]["lr"] == "0.05" and table["nonprivate"]["lr"] == "0.1"
    md = (tmp_path / "results.md").read_text()
    assert "| 8 | flat | default (0.0308) | 0.4000 | 0.5000 | 0.05 | 0.2000 | 0.2500 |" in md
    assert CHOSEN in md


@pytest.mark.parametrize("reproducible", [False, True])
def test_results_tables_state_the_randomness(tmp_path, reproducible):
    write_report(str(tmp_path), _header(reproducible), [_fake_result("nonprivate", "nonprivate", None),
                                         _fake_result("flat_eps8", "flat", 8.0)])
    md = (tmp_path / "results.md").read_text().lower()
    with open(tmp_path / "results.csv") as f:
        table = {r["run"]: r["private_randomness"] for r in csv.DictReader(f)}
    assert table["nonprivate"] == "n/a"
    if reproducible:
        assert "private randomness: no (reproducible, not private: noise and sampling seeded)" in md
        assert table["flat_eps8"] == "no (reproducible, not private: noise and sampling seeded)"
    else:
        assert "private randomness: yes" in md and "reproducible, not private" not in md
        assert table["flat_eps8"] == "yes"


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiment")
    make_dataset(str(root / "raw"), dataset_id=DATASET_ID, name="ExpTest", num_train=16, num_test=0,
                 shape=(32, 32), seed=DATASET_ID)
    (root / "minimal.json").write_text(json.dumps(MINIMAL))
    out = root / "out"
    cmd = ["nnUNetv2_dp_experiment", "-d", str(DATASET_ID), "-c", "2d", "--rules", "nonprivate", "flat",
           "--epsilons", "8", "--lrs", str(SWEEP_LR), "--budget", str(root / "minimal.json"), "-o", str(out), "-device", "cpu", "-np", "1"]
    env = nnunet_env(root)
    first = run(cmd, env)
    return {"root": root, "out": out, "cmd": cmd, "env": env, "first": first}


def test_end_to_end_files_plots_and_dice(experiment):
    out = experiment["out"]
    assert "Results:" in experiment["first"].stdout
    for name in ("results.csv", "results.md", "split.json", "dice_vs_epsilon.png", "adaptive_gain_per_class.png",
                 "budget.json"):
        assert (out / name).is_file(), name
    stdout = experiment["first"].stdout
    assert stdout.index("Budget 'minimal'") < stdout.index("[1/3]")  # the resolved budget before the first run
    assert "ETA: flat_eps8 measured" in stdout and "min left)" in stdout  # DP runs first; progress lines: time left
    budget = json.loads((out / "budget.json").read_text())
    assert budget["batch_size"] == MINIMAL["batch_size"] and budget["steps"] == 2  # a file without caps: as written
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert {(r["run"], r["refinement"]) for r in table} == {
        (run_, ref) for run_ in RUNS for ref in ("none", "global", "adaptive")}
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
    threads = os.environ["OMP_NUM_THREADS"]  # nnUNetv2_train alone would take all cores; both trainers honour it
    for run_ in ("nonprivate", "flat_eps8"):
        folder = Path(json.loads((out / "runs" / run_ / "result.json").read_text())["model_folder"]) / "fold_0"
        log = next(folder.glob("training_log_*.txt")).read_text()
        assert f"CPU threads: {threads} (OMP_NUM_THREADS={threads};" in log, run_


def test_default_runs_hold_no_seed_and_tables_say_private(experiment):
    out = experiment["out"]
    for run_ in RUNS:
        assert "seed" not in json.loads((out / "runs" / run_ / "settings.json").read_text())
    privacy = json.loads((Path(json.loads((out / "runs" / "flat_eps8" / "result.json").read_text())["model_folder"])
                          / "fold_0" / "privacy.json").read_text())
    assert privacy.get("seed") is None and privacy.get("private_randomness", True) is True
    assert "private randomness: yes" in (out / "results.md").read_text().lower()
    with open(out / "results.csv") as f:
        assert {r["private_randomness"] for r in csv.DictReader(f) if r["rule"] == "flat"} == {"yes"}


def _opacus_epsilon(privacy: dict) -> float:
    """The reference: one opacus accountant stepped through the fold's ledger history, at its delta."""
    acc = RDPAccountant() if privacy["accountant"] == "rdp" else PRVAccountant()
    for sigma, q, n in privacy["ledger_history"]:
        for _ in range(n):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    return float(acc.get_epsilon(delta=privacy["delta"]))


def test_refined_rows_carry_the_private_selection_and_the_composed_epsilon(experiment):
    """By default every DP-Morph choice is private (ε_select = DEFAULT_EPSILON_SELECT, fresh OS entropy), and each
    refined row of results.csv, results.md and result.json carries it and epsilon_total = the training ε + ε_select:
    equal to nnUNetv2_dp_privacy's composition and to opacus run directly on the fold's history plus ε_select."""
    out = experiment["out"]
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    md = (out / "results.md").read_text()
    assert f"DP-Morph: private selection, ε_select = {DEFAULT_EPSILON_SELECT:g} per refined row" in md
    for run_ in RUNS:
        result = json.loads((out / "runs" / run_ / "result.json").read_text())
        assert result["dpmorph_selection"] == PRIVATE_DEFAULT.record()
        fold = Path(result["model_folder"]) / "fold_0"
        for mode in ("global", "adaptive"):
            choice = out / "runs" / run_ / "test" / f"dpmorph_{mode}"
            privacy = json.loads((choice / "postprocessing.json").read_text())["dp_morph"]["privacy"]
            assert (privacy["private_selection"], privacy["epsilon_select"], privacy["private_randomness"]) == (
                True, DEFAULT_EPSILON_SELECT, True)
            row = next(r for r in table if r["run"] == run_ and r["refinement"] == mode)
            assert (row["selection"], float(row["epsilon_select"])) == ("private", DEFAULT_EPSILON_SELECT)
            morph = result["selection"][mode]
            if run_ == "nonprivate":
                assert row["epsilon_total"] == "" and morph["epsilon_total"] is None and row["private_randomness"] \
                    == "n/a"
                continue
            fold_privacy = json.loads((fold / "privacy.json").read_text())
            expected = _opacus_epsilon(fold_privacy) + DEFAULT_EPSILON_SELECT
            composed = compose_release([load_fold(str(fold))], read_selection(str(choice)))["epsilon"]
            assert float(row["epsilon_total"]) == pytest.approx(expected, rel=1e-9) == composed
            assert morph["epsilon_total"] == composed and row["private_randomness"] == "yes"
            assert f"| {run_} | {mode} | {float(row['epsilon']):.4f} | private | {DEFAULT_EPSILON_SELECT:.4f} | " \
                   f"{composed:.4f} |" in md
    for row in (r for r in table if r["refinement"] == "none"):
        assert row["selection"] == "–" and row["epsilon_total"] == row["epsilon"]


def _logged_lr(result: dict) -> str:
    logs = sorted((Path(result["model_folder"]) / "fold_0").glob("training_log_*.txt"))
    return re.findall(r"DP optimizer: SGD lr=(\S+) \((default rule|initial_lr setting)", logs[-1].read_text())[-1]


def test_lrs_give_one_row_per_lr_and_one_choice_on_validation(experiment):
    """--lrs 0.05: per refinement, flat at ε = 8 has the default-rule row (its lr as the trainer logged it) and the
    0.05 row; exactly one is chosen, the one with the better validation Dice; results.md has the headline."""
    out = experiment["out"]
    settings = {r: json.loads((out / "runs" / r / "settings.json").read_text()) for r in RUNS}
    assert "initial_lr" not in settings["flat_eps8"] and settings[RUNS[2]]["initial_lr"] == SWEEP_LR
    results = {r: json.loads((out / "runs" / r / "result.json").read_text()) for r in RUNS}
    with open(out / "results.csv") as f:
        table = [r for r in csv.DictReader(f) if r["rule"] == "flat"]
    default = next(r for r in table if r["run"] == "flat_eps8")
    assert _logged_lr(results["flat_eps8"]) == (f"{float(default['lr_value']):.4g}", "default rule")
    assert _logged_lr(results[RUNS[2]]) == (f"{SWEEP_LR:.4g}", "initial_lr setting")
    for refine in ("none", "global", "adaptive"):
        group = [r for r in table if r["refinement"] == refine]
        assert sorted(r["lr"] for r in group) == sorted([default["lr"], f"{SWEEP_LR:g}"])
        assert default["lr"].startswith("default (")
        assert [r["choice"] for r in group].count(CHOSEN) == 1
        chosen = next(r for r in group if r["choice"] == CHOSEN)
        val = {r["run"]: results[r["run"]]["validation_dice"][refine] for r in group}
        assert val[chosen["run"]] == max(val.values()) and float(chosen["validation_dice"]) == val[chosen["run"]]
        assert all(r["choice"] == DEFAULT for r in group if r["run"] == "flat_eps8" and r is not chosen)
        assert all(math.isfinite(v) for v in val.values())
    md = (out / "results.md").read_text()
    assert "## Headline: DP defaults vs the setting chosen on validation" in md and CHOSEN in md


def test_resume_refuses_to_switch_the_randomness_mode(experiment, tmp_path, monkeypatch):
    """A folder's runs keep their mode: --reproducible on private runs, or private on seeded runs (an older
    experiment seeded every run), stops naming --reproducible before any training, and the tables stay as they were.
    So does a DP run trained with a fixed lr 0.1 (the harness before the default lr rule) under the default rule."""
    src, out = experiment["out"], tmp_path / "out"
    for name in ("split.json", "results.csv", "results.md"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / name, out / name)
    for run_ in RUNS:
        shutil.copytree(src / "runs" / run_, out / "runs" / run_,
                        ignore=shutil.ignore_patterns("nnUNet_results", "test"))
    for key, value in experiment["env"].items():
        if key.startswith("nnUNet"):
            monkeypatch.setenv(key, value)
    cmd = experiment["cmd"][1:]
    cmd = cmd[:cmd.index("-o") + 1] + [str(out)] + cmd[cmd.index("-o") + 2:]
    before = (out / "results.csv").read_bytes()
    with pytest.raises(SystemExit, match=r"flat_eps8.*drop --reproducible"):
        experiment_cli.main([*cmd, "--reproducible"])
    settings = out / "runs" / "flat_eps8" / "settings.json"
    settings.write_text(json.dumps({**json.loads(settings.read_text()), "seed": 0}))
    with pytest.raises(SystemExit, match=r"flat_eps8.*add --reproducible and the same --seed"):
        experiment_cli.main(cmd)
    old = {k: v for k, v in json.loads(settings.read_text()).items() if k != "seed"}
    settings.write_text(json.dumps({**old, "initial_lr": 0.1}))  # a run of the harness that fixed lr 0.1 for DP
    with pytest.raises(SystemExit, match=r"flat_eps8.*trained with initial_lr 0\.1.*default learning-rate rule"):
        experiment_cli.main(cmd)
    assert (out / "results.csv").read_bytes() == before


def test_second_invocation_skips_finished_runs(experiment):
    out = experiment["out"]
    ckpts = [Path(json.loads((out / "runs" / r / "result.json").read_text())["model_folder"]) / "fold_0" /
             "checkpoint_final.pth" for r in RUNS]
    before = [c.stat().st_mtime_ns for c in ckpts]
    again = run(experiment["cmd"], experiment["env"])
    assert again.stdout.count("finished earlier, skipped") == len(RUNS)
    assert "nnUNetv2_train" not in again.stdout
    assert [c.stat().st_mtime_ns for c in ckpts] == before
    assert (out / "results.md").is_file()


def test_nonprivate_selection_chooses_again_and_labels_every_refined_row(experiment, tmp_path):
    """On a copy of the folder, --dpmorph-selection nonprivate: the finished run is not reported under its earlier
    private choice but chooses again (no training, no new test predictions), and its refined rows read 'selection
    not private' with no epsilon_total."""
    out = tmp_path / "out"
    shutil.copytree(experiment["out"], out, symlinks=True)
    cmd = experiment["cmd"]
    cmd = [*cmd[:cmd.index("--rules")], "--rules", "flat", "--epsilons", "8", "--refine", "none", "global",
           *cmd[cmd.index("--budget"):cmd.index("-o") + 1], str(out), *cmd[cmd.index("-o") + 2:],
           "--dpmorph-selection", "nonprivate"]
    ckpt = next((out / "runs" / "flat_eps8").glob("nnUNet_results/*/*/fold_0/checkpoint_final.pth"))
    before = ckpt.stat().st_mtime_ns
    stdout = run(cmd, experiment["env"]).stdout
    assert (f"flat_eps8: its DP-Morph choice (private (ε_select = 1)) is not this invocation's ({NOT_PRIVATE}): "
            "choosing again") in stdout and "finished earlier, skipped" not in stdout
    assert ckpt.stat().st_mtime_ns == before and "nnUNetv2_train" not in stdout
    choice = json.loads((out / "runs" / "flat_eps8" / "test" / "dpmorph_global" / "postprocessing.json").read_text())
    assert choice["dp_morph"]["privacy"]["private_selection"] is False
    with open(out / "results.csv") as f:
        rows = {r["refinement"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"none", "global"}
    assert [rows["global"][k] for k in ("selection", "epsilon_select", "epsilon_total", "private_randomness")] == [
        NOT_PRIVATE, "", "", f"no ({NOT_PRIVATE})"]
    assert f"**DP-Morph: {NOT_PRIVATE}**" in (out / "results.md").read_text()


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
        choose_and_apply(str(model / "fold_0" / "validation"), str(gt), str(model),  # argmax: deterministic
                         str(out / "runs" / "flat_eps8" / "test" / "none"), str(target), "adaptive", 1,
                         epsilon_select=None)
        with open(target.parent / "dpmorph_adaptive" / "postprocessing.pkl", "rb") as f:
            choices.append(pickle.dumps(pickle.load(f)))
    assert choices[0] == choices[1]


def _in_process_env(experiment, monkeypatch):
    for key, value in experiment["env"].items():
        if key.startswith("nnUNet"):
            monkeypatch.setenv(key, value)


def test_dry_run_resolves_tiny_on_a_small_fold(experiment, tmp_path, monkeypatch, capsys):
    """16 cases: 3 test, 3 validation, N = 10 training cases. tiny's batch 32 is capped to floor(N / 4) = 2 (q = 0.2),
    printed and saved with sigma and lr per run; --dry-run stops before preprocessing and training."""
    _in_process_env(experiment, monkeypatch)
    out = tmp_path / "dry"
    experiment_cli.main(["-d", str(DATASET_ID), "--rules", "nonprivate", "flat", "--epsilons", "8", "--budget", "tiny",
                         "--dry-run", "-o", str(out)])
    budget = json.loads((out / "budget.json").read_text())
    assert (budget["num_training_cases"], budget["batch_size"], budget["sampling_rate"]) == (10, 2, 0.2)
    assert budget["batch_limits"]["max_sampling_rate"] == 2 and budget["steps"] == 400
    flat = next(r for r in budget["runs"] if r["run"] == "flat_eps8")
    assert flat["sampling_rate"] == 0.2 and flat["noise_multiplier"] > 0 and flat["lr_source"] == "default rule"
    printed = capsys.readouterr().out
    assert "batch 2 (expected batch under DP" in printed and "flat_eps8" in printed and "--dry-run" in printed
    assert os.listdir(out) == ["budget.json"]


def test_batch_larger_than_the_fold_stops_before_any_training(experiment, tmp_path, monkeypatch):
    """A budget file's batch 32 on N = 10 training cases stops before any training, naming the option, the
    value, the limit and the fix, for every DP run at once (the trainer's own check)."""
    _in_process_env(experiment, monkeypatch)
    big = tmp_path / "big.json"
    big.write_text(json.dumps({**MINIMAL, "batch_size": 32}))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        experiment_cli.main(["-d", str(DATASET_ID), "--rules", "nonprivate", "flat", "psac", "--epsilons", "8",
                             "--budget", str(big), "-o", str(out)])
    message = str(info.value)
    for part in (f"--budget {big}: batch_size = 32 is not allowed", "at most N = 10 training cases",
                 "flat_eps8, psac_eps8", "Set batch_size <= 10", "nothing was trained"):
        assert part in message, part
    assert os.listdir(out) == []


def test_public_dataset_parts_are_disjoint_from_every_private_and_test_case():
    """--public-dataset: the disjoint-identifier check refuses an overlap; a derived dataset (same identifiers) needs
    --public-fraction, which draws the public patients by identifier; an unrelated one is public whole."""
    from nnunet_dp.experiment.data import disjoint_counts, split_public_dataset
    from nnunet_dp.experiment.errors import ExperimentError

    cases = [f"case_{i:03d}" for i in range(20)]
    split = split_cases(cases, test_fraction=0.2, seed=0)
    with pytest.raises(ExperimentError, match="give --public-fraction F too"):
        split_public_dataset(split, cases, public_fraction=None, seed=0, public_name="P", dataset="D")
    parts = split_public_dataset(split, cases, public_fraction=0.3, seed=0, public_name="P", dataset="D")
    assert len(parts["public"]) == 5 and parts["test"] == split["test"]
    line = disjoint_counts(parts)
    assert "public cases: 5, in none of the" in line and "4 test cases" in line
    other = split_public_dataset(split, ["site2_a", "site2_b"], public_fraction=None, seed=0, public_name="P",
                                 dataset="D")
    assert other["public"] == ["site2_a", "site2_b"]
    with pytest.raises(ExperimentError, match="none of the private training"):
        disjoint_counts({**parts, "public": parts["public"] + parts["train"][:1]})
    with pytest.raises(ExperimentError, match="missing"):
        split_public_dataset(split, cases[:3], public_fraction=0.3, seed=0, public_name="P", dataset="D")


def test_dry_run_with_a_public_dataset_of_other_labels(experiment, tmp_path, monkeypatch, capsys):
    """The label-shift scenario's plan: a binary dataset of the same cases as public data, drawn by identifier
    (--public-fraction), printed with the disjointness counts; without --public-fraction it is refused."""
    _in_process_env(experiment, monkeypatch)
    make_dataset(str(experiment["root"] / "raw"), dataset_id=DATASET_ID + 1, name="ExpTestWhole", num_train=16,
                 num_test=0, shape=(32, 32), seed=DATASET_ID, binary=True)
    base = ["-d", str(DATASET_ID), "--rules", "flat", "--epsilons", "8", "--budget", "tiny", "--public-dataset",
            str(DATASET_ID + 1), "--trainable", "heads", "lora", "--lora-ranks", "2", "--projection-dims", "4"]
    with pytest.raises(SystemExit) as refused:
        experiment_cli.main([*base, "--dry-run", "-o", str(tmp_path / "no")])
    assert "give --public-fraction F too" in str(refused.value)
    out = tmp_path / "dry"
    experiment_cli.main([*base, "--public-fraction", "0.3", "--dry-run", "-o", str(out)])
    budget = json.loads((out / "budget.json").read_text())
    start = budget["start"]
    assert start["from"] == "public dataset" and start["labels_match"] is False and start["num_public_cases"] == 4
    assert {r["run"] for r in budget["runs"]} == {"flat_eps8_heads", "flat_eps8_lora2", "flat_eps8_proj4"}
    printed = capsys.readouterr().out
    assert "public cases: 4, in none of the" in printed and "other labels" in printed


def test_train_cases_subsample_is_nested_and_leaves_validation_and_test_alone():
    from nnunet_dp.experiment.plan import subsample_training

    split = split_cases([f"c{i:03d}" for i in range(100)], test_fraction=0.1, val_fraction=0.1, seed=3)
    assert len(split["test"]) == 10 and len(split["val"]) == 9
    small, large = subsample_training(split, 10, 3), subsample_training(split, 40, 3)
    assert set(small["train"]) < set(large["train"]) < set(split["train"]) and len(large["train"]) == 40
    assert small["val"] == split["val"] and small["test"] == split["test"]
    assert subsample_training(split, None, 3) == split
    with pytest.raises(ExperimentError, match="--train-cases"):
        subsample_training(split, 1000, 3)


def test_new_levers_become_settings_names_and_labels_checked_by_the_trainers_config():
    from nnunet_dp.experiment.levers import lever_grid

    grid = lever_grid(["all", "heads", "lora"], lora_ranks=[2, 8], projection_dims=[16], morph=["none", "close"])
    names = [lev.suffix for lev in grid]
    assert names == ["", "_morphclose", "_heads", "_heads_morphclose", "_lora2", "_lora2_morphclose", "_lora8",
                     "_lora8_morphclose", "_proj16"]
    for lev in grid:
        DPConfig.from_mapping(lev.settings())  # every combination is one the trainers accept
    assert grid[4].settings() == {"trainable": "lora", "lora_rank": 2}
    assert grid[-1].settings() == {"projection": "public", "projection_dim": 16}
    with pytest.raises(ExperimentError, match="--morph-in-training"):
        lever_grid(["all"], morph=["dilate"])
    with pytest.raises(ExperimentError, match="--lora-ranks"):
        lever_grid(["lora"], lora_ranks=[0])
