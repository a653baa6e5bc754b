"""nnUNetv2_dp_experiment on any dataset: budgets resolved from the fold and the plans' patch, the grid checked with the
trainer's own code before any training, the ETA, and failed runs that say why (unit tests: no training here; the
command-level checks on a planned dataset are in test_experiment.py)."""
from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_dp.experiment import grid as experiment_grid
from nnunet_dp.experiment.budget import (
    Fold,
    GridError,
    budget_summary,
    cap_patch,
    format_budget,
    plan_runs,
    read_planned,
    resolve_for_dataset,
)
from nnunet_dp.experiment.plan import (
    BUDGETS,
    MAX_SAMPLING_RATE,
    BudgetSpec,
    ExperimentError,
    resolve_budget,
    run_grid,
)
from nnunet_dp.experiment.progress import BUSY_WARN_CORES, Progress, busy_cores, busy_warning, last_error
from nnunet_dp.experiment.report import write_report
from nnunet_dp.experiment.run import CommandError, Context, run_command
from nnunet_dp.synthetic import _case, make_dataset

PLANS = Path(__file__).resolve().parents[2] / "benchmarks" / "plans"
HIPPOCAMPUS = read_planned(str(PLANS / "Dataset902_Hippocampus_nnUNetPlans.json"), "2d")  # patch 56x40, batch 366
LARGE = read_planned(str(PLANS / "large_2d_256.json"), "2d_256")  # nnU-Net's 2d plan for 256x256: batch 49
PUBLISHED_FOLD = Fold(166, 42, 52)  # Dataset902 2d, split seed 0 (docs/results.md)


def test_tiny_keeps_the_published_hippocampus_budget():
    """docs/results.md was made with 16 x 25 steps of batch 32 on 8-16-32-64 at the planned 56x40 patch: resolving
    `tiny` on that dataset and fold must give exactly that."""
    b = resolve_for_dataset("tiny", BUDGETS["tiny"], HIPPOCAMPUS, PUBLISHED_FOLD)
    assert (b.spec.batch_size, b.steps, b.patch_size, b.features_per_stage) == (32, 400, (56, 40), (8, 16, 32, 64))
    assert (b.spec.num_epochs, b.spec.num_iterations_per_epoch, b.spec.nonprivate_lr) == (16, 25, 0.1)
    assert b.batch_limits == {"batch_size": 32, "voxels_per_step": 32, "max_sampling_rate": 41}


@pytest.mark.parametrize(("fold", "batch"), [(Fold(77, 19, 24), 17), (Fold(26, 6, 8), 6), (Fold(3, 1, 1), 1)])
def test_tiny_on_256_images_caps_the_patch_and_the_batch(fold, batch):
    """256x256: the patch shrinks to 64x64 (a multiple of the narrowed network's stride 8), the batch to the voxel
    target (17) and to q <= 0.25 of small folds; never below 1."""
    b = resolve_for_dataset("tiny", BUDGETS["tiny"], LARGE, fold)
    assert b.patch_size == (64, 64) and b.planned_patch_size == (256, 256) and b.features_per_stage == (8, 16, 32, 64)
    assert b.spec.batch_size == batch and b.steps == 400
    assert b.spec.batch_size <= max(1, MAX_SAMPLING_RATE * fold.num_train)
    assert b.spec.batch_size * b.patch_voxels <= BUDGETS["tiny"].voxels_per_step


def test_gpu_budgets_keep_the_plans_patch_and_cap_the_voxels_per_step():
    small = resolve_for_dataset("small", BUDGETS["small"], LARGE, Fold(400, 100, 125))
    assert small.patch_size == (256, 256) and small.spec.batch_size == 64 and small.steps == 5000
    assert small.features_per_stage == LARGE.features_per_stage
    full = resolve_for_dataset("full", BUDGETS["full"], LARGE, Fold(1000, 250, 300))
    assert full.spec.batch_size == 64 and full.steps == 25000  # 128 patches of 256x256 would not fit the GPU target
    assert resolve_for_dataset("full", BUDGETS["full"], HIPPOCAMPUS, Fold(1000, 250, 300)).spec.batch_size == 128
    assert resolve_for_dataset("full", BUDGETS["full"], HIPPOCAMPUS, PUBLISHED_FOLD).spec.batch_size == 41


def test_a_budget_file_without_adaptive_fields_is_used_as_written(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"num_epochs": 8, "num_iterations_per_epoch": 10, "num_val_iterations_per_epoch": 1,
                                "batch_size": 16, "save_every": 4, "features_per_stage": [8, 16, 32]}))
    name, spec = resolve_budget(str(path))
    b = resolve_for_dataset(name, spec, LARGE, Fold(10, 3, 3))
    assert (b.spec.batch_size, b.patch_size, b.features_per_stage) == (16, (256, 256), (8, 16, 32))
    path.write_text(json.dumps({**json.loads(path.read_text()), "max_sampling_rate": 1.5}))
    with pytest.raises(ExperimentError, match="max_sampling_rate = 1.5 is not allowed"):
        resolve_budget(str(path))


def test_cap_patch():
    assert cap_patch((256, 256), (8, 8), 4096) == (64, 64)
    assert cap_patch((56, 40), (8, 8), 4096) == (56, 40)
    assert cap_patch((512, 128), (8, 8), 4096) == (64, 64)
    assert cap_patch((16, 16), (16, 16), 100) == (16, 16)  # cannot shrink below the stride: left as it is


def test_batch_larger_than_the_fold_is_refused_before_training_with_the_fix():
    """A budget file's batch 32 on N = 10: one problem naming every DP run, the option, the value, what is allowed,
    the fix, and the DP trainer's own message (make_plan's check); the baseline passes."""
    spec = BudgetSpec(1, 2, 1, 32, 1, (8, 16, 32))
    b = resolve_for_dataset("mine", spec, LARGE, Fold(10, 3, 3))
    runs, problems = plan_runs(run_grid(["nonprivate", "flat", "psac"], [8]), b, None, "mine.json")
    assert [r.spec.name for r in runs] == ["nonprivate"] and len(problems) == 1
    text = str(GridError(problems))
    for part in ("--budget mine.json: batch_size = 32 is not allowed", "at most N = 10 training cases",
                 "flat_eps8, psac_eps8", "Set batch_size <= 10 in mine.json (2 keeps q <= 0.25",
                 "DP setting 'expected_batch_size' = 32", "nothing was trained"):
        assert part in text, part


def test_every_problem_is_reported_at_once():
    """Two unreachable epsilons (RDP cannot go below ~0.05 at delta 1e-5, whatever sigma): two problems, and the runs
    that can train keep their plans (sigma and the default lr the trainer will use)."""
    b = resolve_for_dataset("tiny", BUDGETS["tiny"], LARGE, Fold(26, 6, 8))
    runs, problems = plan_runs(run_grid(["flat"], [0.01, 0.02, 8]), b, None, "tiny")
    assert len(problems) == 2 and "--epsilons = 0.01" in problems[0] and "--epsilons = 0.02" in problems[1]
    assert all("Raise it, or plan fewer steps" in p for p in problems)
    (ok,) = runs
    assert ok.spec.name == "flat_eps8" and ok.plan.sampling_rate == pytest.approx(6 / 26) and ok.plan.noise_multiplier > 1
    summary = budget_summary(b, runs, "DatasetX", "2d")
    assert summary["runs"][0]["noise_multiplier"] == ok.plan.noise_multiplier and summary["batch_size"] == 6
    assert summary["runs"][0]["initial_lr"] == ok.lr and ok.lr_source == "default rule"
    text = format_budget(summary)
    assert "patch 64x64 (planned 256x256)" in text and "max_sampling_rate -> 6" in text and "flat_eps8" in text


def test_last_error_of_a_training_log():
    log = ("2026-01-01 10:00:00.000000: Epoch 0\nTraceback (most recent call last):\n  File \"a.py\", line 1, in <module>"
           "\n    x()\n    ^^^\nKeyError: 'first'\n\nDuring handling of the above exception, another exception occurred:"
           "\n\nTraceback (most recent call last):\n  File \"b.py\", line 3, in f\n    raise DPConfigError(...)\n"
           "nnunet_dp.errors.DPConfigError: DP setting 'expected_batch_size' = 32 is not allowed: q = 1.067\n\n"
           "Exception ignored in: <function _Finalizer>\n")
    assert last_error(log) == "nnunet_dp.errors.DPConfigError: DP setting 'expected_batch_size' = 32 is not allowed: q = 1.067"
    assert last_error("$ nnUNetv2_train ...\nsome output\nKilled\n") == "some output\nKilled"
    assert last_error("") == "(the log is empty)"


def test_run_command_says_why_and_streams_the_output(tmp_path):
    seen = []
    code = "import time; print('Epoch 0', flush=True); time.sleep(0.3); raise ValueError('the reason')"
    with pytest.raises(CommandError) as info:
        run_command([sys.executable, "-c", code], dict(os.environ), str(tmp_path / "log.txt"), watch=seen.append, poll_seconds=0.1)
    assert info.value.reason == "ValueError: the reason" and "the reason" in str(info.value)
    assert "Epoch 0" in "".join(seen) and "ValueError: the reason" in "".join(seen)
    with pytest.raises(CommandError, match=r"killed by signal 9 \(SIGKILL; .*out of memory\)"):
        run_command([sys.executable, "-c", "import os; print('step 3', flush=True); os.kill(os.getpid(), 9)"],
                    dict(os.environ), str(tmp_path / "log.txt"), poll_seconds=0.1)


def test_progress_eta_from_the_first_epochs():
    lines, now = [], [0.0]
    p = Progress(["flat_eps1", "flat_eps8", "nonprivate"], num_epochs=10, iterations=20, val_iterations=2,
                 voxels_per_step=1000, predicted_voxels=4000, pools=3, pool_seconds=5.0, clock=lambda: now[0],
                 out=lines.append)
    assert p.status() == "0.0 min elapsed"  # nothing measured yet
    p.start_run("flat_eps1")
    now[0] = 30.0
    p.on_log("2026-01-01 10:00:00.000000: Epoch 0\n2026-01-01 10:00:09.000000: Epoch time: 9.0 s\n2026-01")
    p.on_log("-01 10:00:12.000000: Epoch 1\n2026-01-01 10:00:13.000000: Epoch time: 7.0 s\n")
    assert not lines  # one complete epoch after the warm-up one is needed
    p.on_log("2026-01-01 10:00:23.000000: Epoch 2\n")
    # epoch 1's wall time (Epoch 1 -> Epoch 2 line: 11 s, not nnU-Net's 7.0 s) x 10 epochs + the 30 s start, then
    # another start (30 s) + 3 pools x 5 s + 0.75 x 4000 voxels x 11 s / (20 x 1000 voxels) = 1.65 s
    assert p.first_estimate == pytest.approx(30 + 110 + 30 + 15 + 1.65)
    assert len(lines) == 1 and "0.550 s per step" in lines[0] and "3 process pools of 5.0 s" in lines[0]
    assert "the whole grid ~ 9.3 min" in lines[0]
    now[0] = 60.0
    assert p.remaining() == pytest.approx(186.65 - 60 + 2 * 186.65) and "~8.3 min left" in p.status()
    now[0] = 150.0
    p.end_run("flat_eps1", 150.0)
    assert "ETA revised after flat_eps1 (2.5 min)" in lines[-1] and p.remaining() == pytest.approx(300.0)
    p.start_run("flat_eps8")
    p.end_run("flat_eps8", 10.0, failed=True)  # a failed run's time is not an estimate of a run
    assert p.remaining() == pytest.approx(150.0)
    assert p.summary() == "Runs took 2.5 min; the first ETA announced 9.3 min (-73 %)."


def test_progress_without_timestamps_and_with_a_public_pretraining():
    """Logs without timestamps fall back to nnU-Net's Epoch time; the public pretraining (non-private, no test work)
    is timed but gives neither the first estimate nor the mean per run."""
    lines, now = [], [0.0]
    p = Progress(["public", "flat_eps8"], num_epochs=4, iterations=10, val_iterations=1, voxels_per_step=100,
                 predicted_voxels=0, clock=lambda: now[0], out=lines.append)
    p.start_run("public", measure=False)
    p.on_log("2026-01-01 10:00:00.000000: Epoch 0\n2026-01-01 10:00:01.000000: Epoch 1\n"
             "2026-01-01 10:00:02.000000: Epoch 2\n")
    assert not lines and p.remaining() is None
    now[0] = 40.0
    p.end_run("public", 40.0)
    assert not p.finished and p.pending == ["flat_eps8"]
    p.start_run("flat_eps8")
    now[0] = 50.0
    p.on_log("Epoch 0\nEpoch time: 8.0 s\nEpoch 1\nEpoch time: 6.0 s\n")
    # start 10 s + 4 x 6 s (epoch 1's Epoch time), then another start of 10 s (no pools, no voxels)
    assert p.first_estimate == pytest.approx(44.0) and "nnU-Net's Epoch time" in lines[0]
    assert p.announced == pytest.approx(40.0 + 44.0)


def test_inference_voxels_counts_nnunet_sliding_windows_and_mirroring():
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    from nnunet_dp.experiment.budget import PlannedConfig, inference_voxels

    for shape, patch, slices in [((192, 192), (64, 64), 1.0), ((256, 200), (64, 48), 1.0), ((50, 35), (56, 40), 36.0),
                                 ((40, 56, 40), (40, 56, 40), 1.0), ((90, 130, 100), (48, 64, 64), 1.0)]:
        planned = PlannedConfig(patch, 2, ((1,) * len(patch),), (8,), shape, slices)
        # nnU-Net pads images smaller than the patch to the patch, then tiles with step 0.5
        steps = compute_steps_for_sliding_window(tuple(max(s, p) for s, p in zip(shape, patch)), patch, 0.5)
        windows = int(np.prod([len(s) for s in steps]))
        assert inference_voxels(planned, patch, 7) == 7 * slices * windows * np.prod(patch) * 2 ** len(patch)


def _result(run, rule, eps, dice=0.5):
    return {"run": run, "rule": rule, "target_epsilon": eps, "epsilon": eps, "noise_multiplier": 2.0 if eps else None,
            "clip_norm": 1.0, "expected_batch_size": 6.0, "planned_steps": 4, "steps": 4, "initial_lr": None if eps
            else 0.1, "scores": {"none": {"dice": {"disk": dice, "ring": dice}, "dice_mean": dice, "num_cases": 2}},
            "validation_dice": {"none": dice}, "train_seconds": 6.0, "seconds": 9.0}


def test_a_failed_run_says_why_the_others_go_on_and_the_report_marks_it(tmp_path, monkeypatch, capsys):
    """The DP runs go first; flat_eps1 fails inside nnUNetv2_train: its last exception is printed (not an empty
    line), flat_eps8 and the baseline still run, and results.md/csv mark the failed cells with the reason."""
    specs = run_grid(["nonprivate", "flat"], [1, 8])
    b = resolve_for_dataset("tiny", BUDGETS["tiny"], LARGE, Fold(26, 6, 8))
    runs = [experiment_grid.RunPlan(s, {"num_epochs": 1, "rule": s.name}, None, 0.1, "budget") for s in specs]
    order = []

    def fake_execute(ctx, run_dir, spec, settings, watch=None):
        order.append(spec.name)
        if spec.name == "flat_eps1":
            raise CommandError(["nnUNetv2_train"], 1, f"{run_dir}/log.txt",
                               "nnunet_dp.errors.DPDivergedError: most sampled cases were not finite")
        return _result(spec.name, spec.rule, spec.epsilon)

    monkeypatch.setattr(experiment_grid, "execute", fake_execute)
    ctx = Context("Dataset977_X", "2d", str(tmp_path), "", "", "", "cpu", 1, {}, ("none",))
    monkeypatch.setattr(experiment_grid, "pool_start_seconds", lambda num_processes: 4.0)
    results, failed = experiment_grid.run_all(ctx, runs, b.spec, 1e6, 24576)
    out = capsys.readouterr().out
    assert order == ["flat_eps1", "flat_eps8", "nonprivate"] and failed == ["flat_eps1"]
    assert "flat_eps1: FAILED after" in out and "DPDivergedError: most sampled cases were not finite" in out
    assert "the other runs go on" in out and "[3/3] nonprivate: done" in out
    assert [r["run"] for r in results] == ["nonprivate", "flat_eps1", "flat_eps8"]  # grid order
    header = {"dataset": "Dataset977_X", "configuration": "2d", "seed": 0, "reproducible": False,
              "budget": budget_summary(b, [], "Dataset977_X", "2d"), "command": "nnUNetv2_dp_experiment ...",
              "split": {"num_test": 8, "num_train": 26, "num_val": 6}}
    write_report(str(tmp_path), header, results)
    md = (tmp_path / "results.md").read_text()
    assert "## Failed runs (1)" in md and "DPDivergedError: most sampled cases were not finite" in md
    assert "| flat_eps1 | – |" in md and "FAILED" in md.split("| flat_eps1 | – |")[1].split("\n")[0]
    assert "patch 64x64 (planned 256x256)" in md
    with open(tmp_path / "results.csv") as f:
        table = {r["run"]: r for r in csv.DictReader(f)}
    assert table["flat_eps1"]["status"].startswith("FAILED: nnunet_dp.errors.DPDivergedError")
    assert table["flat_eps8"]["status"] == "ok" and float(table["flat_eps8"]["ratio_to_nonprivate"]) == 1.0


def test_synthetic_rgb_png_dataset(tmp_path):
    """The generator writes nnU-Net's natural-image layout: one RGB PNG per case (case_XXX_0000.png), gray label
    PNGs with 0/1/2, channel_names R, G, B; nnU-Net's NaturalImage2DIO reads 3 channels."""
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO

    folder = Path(make_dataset(str(tmp_path), dataset_id=951, name="RGB", num_train=3, num_test=1, shape=(40, 48),
                               channels=3, file_ending=".png", seed=1))
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "R", "1": "G", "2": "B"} and meta["file_ending"] == ".png"
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == [f"case_00{i}_0000.png" for i in range(3)]
    image, _ = NaturalImage2DIO().read_images([str(folder / "imagesTr" / "case_000_0000.png")])
    seg, _ = NaturalImage2DIO().read_seg(str(folder / "labelsTr" / "case_000.png"))
    assert image.shape == (3, 1, 40, 48) and seg.shape == (1, 1, 40, 48)
    assert set(np.unique(seg)) == {0, 1, 2}
    for channel in image[:, 0]:  # every channel shows the disk against the background (its own contrast)
        assert abs(channel[seg[0, 0] == 1].mean() - channel[seg[0, 0] == 0].mean()) > 20
    with pytest.raises(ValueError, match="PNG cases are 2D"):
        make_dataset(str(tmp_path), dataset_id=952, channels=2, file_ending=".png")


def test_synthetic_defaults_unchanged(tmp_path):
    """Default arguments write what they always wrote: one NIfTI channel named 'synthetic', `_case`'s draws in order."""
    folder = Path(make_dataset(str(tmp_path), dataset_id=953, name="Default", num_train=2, num_test=0, shape=(32, 32),
                               seed=5))
    rng = np.random.default_rng(5)
    for i in range(2):
        image, _ = _case(rng, (32, 32))
        got = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "imagesTr" / f"case_00{i}_0000.nii.gz")))
        assert np.array_equal(got[0], image)
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "synthetic"} and meta["file_ending"] == ".nii.gz"


def test_busy_cores_sees_a_spinning_process_and_the_warning_names_the_cure():
    """/proc/stat over one second: a process spinning on one core shows up as >= 0.5 busy cores (other work on the
    machine can only add to it); the warning's threshold and words."""
    import subprocess
    import sys
    import time

    if not os.path.exists("/proc/stat"):
        assert busy_cores(0.01) is None
        return
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy = busy_cores(1.0)
    finally:
        spinner.kill()
        spinner.wait()
    assert busy is not None and BUSY_WARN_CORES <= busy <= (os.cpu_count() or 1) + 1e-9
    assert busy_warning(None, 2) is None and busy_warning(BUSY_WARN_CORES * 0.99, 2) is None
    text = busy_warning(1.4, 2)
    assert "1.4 of 2 CPU cores busy" in text and "OMP_NUM_THREADS" in text and "many-fold" in text


def test_a_trainer_nnunet_cannot_find_gets_the_env_hint(tmp_path):
    """nnU-Net's 'Could not find requested nnunet trainer' gets the fix: nnUNetv2_dp_env (the harness's commands)."""
    import sys

    from nnunet_dp.experiment.run import CommandError, run_command

    code = "import sys; print('Could not find requested nnunet trainer nnUNetTrainerDP in x'); sys.exit(1)"
    with pytest.raises(CommandError) as error:
        run_command([sys.executable, "-c", code], dict(os.environ), str(tmp_path / "log.txt"))
    assert 'eval "$(nnUNetv2_dp_env)"' in str(error.value)
