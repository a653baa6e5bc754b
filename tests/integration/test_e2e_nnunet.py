"""End to end through nnU-Net's own commands: nnUNetv2_train with every DP trainer, nnUNetv2_predict, resume."""
from __future__ import annotations

import itertools
import json
import os
import shutil

import numpy as np
import pytest
import torch
from e2e import nnunet_env, prepare, run

from nnunet_dp.accounting import epsilon_for

D2, D3 = 991, 992
TINY = {"num_epochs": 1, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1,
        "expected_batch_size": 3, "target_epsilon": 8.0}
KEYS = {"epsilon", "delta", "noise_multiplier", "sampling_rate", "expected_batch_size", "steps", "accountant", "rule",
        "clip_norm", "sensitivity", "num_training_cases", "assumptions"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("nnunet")
    prepare(root, dataset_id=D2, shape=(32, 32), configuration="2d")
    return root


def fold(root, trainer, ds=D2, config="2d"):
    return root / "res" / f"Dataset{ds}_Test{ds}" / f"{trainer}__nnUNetPlans__{config}" / "fold_0"


def train(root, trainer, cfg, *args, ds=D2, config="2d", check=True, **env):
    return run(["nnUNetv2_train", str(ds), config, "0", "-tr", trainer, "-device", "cpu", *args],
               nnunet_env(root, cfg, **env), check=check)


def check_privacy_json(folder, rule, steps, cfg=TINY):
    rep = json.loads((folder / "privacy.json").read_text())
    assert KEYS <= rep.keys()
    assert rep["rule"] == rule and rep["steps"] == steps and rep["num_training_cases"] == 9
    assert rep["sampling_rate"] == pytest.approx(cfg["expected_batch_size"] / 9)
    assert rep["epsilon"] == pytest.approx(epsilon_for(noise_multiplier=rep["noise_multiplier"],
                                                       sampling_rate=rep["sampling_rate"], steps=steps,
                                                       delta=rep["delta"]), rel=1e-9)
    assert rep["epsilon"] <= cfg["target_epsilon"]
    assert rep["sensitivity"] == rep["clip_norm"] and len(rep["assumptions"]) >= 5
    # the noise advice in closed form: sigma * sqrt(d) / (qN), d the trained parameters (every one: trainable all)
    noise, d = rep["noise"], rep["num_trained_parameters"]
    assert rep["trainable"] == "all" and d == rep["num_parameters"] == noise["num_trained_parameters"]
    assert noise["noise_ratio"] == pytest.approx(rep["noise_multiplier"] * d ** 0.5 / rep["expected_batch_size"])
    return rep


@pytest.mark.parametrize("trainer,rule", [("nnUNetTrainerDP", "flat"), ("nnUNetTrainerDP_AutoS", "autos"),
                                          ("nnUNetTrainerDP_NSGD", "nsgd"), ("nnUNetTrainerDP_PSAC", "psac")])
def test_train_each_trainer(root, trainer, rule):
    train(root, trainer, TINY)
    folder = fold(root, trainer)
    check_privacy_json(folder, rule, steps=2)
    ckpt = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["dp_state"]["ledger"]["history"] and "noise_rng_state" not in ckpt["dp_state"]
    assert json.loads((folder / "dp_config.json").read_text())["expected_batch_size"] == 3
    log = next(folder.glob("training_log_*.txt")).read_text()
    assert "DP: epsilon spent =" in log
    threads = os.environ["OMP_NUM_THREADS"]  # conftest.py; nnUNetv2_train -device cpu itself sets all cores
    assert f"CPU threads: {threads} (OMP_NUM_THREADS={threads};" in log
    plans = json.loads((folder.parent / "plans.json").read_text())
    assert plans["configurations"]["2d"]["batch_dice"] is False
    assert (folder / "validation" / "summary.json").exists()


def test_predict_with_dp_trainer(root):
    trainer = "nnUNetTrainerDP_PSAC"
    if not (fold(root, trainer) / "checkpoint_final.pth").exists():
        train(root, trainer, TINY)
    out = root / "pred"
    run(["nnUNetv2_predict", "-i", str(root / "raw" / f"Dataset{D2}_Test{D2}" / "imagesTs"), "-o", str(out),
         "-d", str(D2), "-c", "2d", "-f", "0", "-tr", trainer, "-device", "cpu", "-npp", "1", "-nps", "1"],
        nnunet_env(root))
    assert len(list(out.glob("*.nii.gz"))) == 2


def test_interrupted_and_resumed_epsilon_equals_uninterrupted(root):
    cfg = dict(TINY, num_epochs=3, save_every=1, seed=5)
    trainer = "nnUNetTrainerDP_TestCrash"
    folder = fold(root, trainer)
    train(root, trainer, cfg)
    straight = json.loads((folder / "privacy.json").read_text())
    shutil.rmtree(folder.parent)

    crashed = train(root, trainer, cfg, check=False, NNUNET_DP_TEST_CRASH_AT="2")
    assert crashed.returncode != 0 and "simulated crash" in crashed.stderr
    latest = folder / "checkpoint_latest.pth"
    ckpt = torch.load(latest, map_location="cpu", weights_only=False)
    assert ckpt["dp_state"]["ledger"]["history"][0][2] == 4 and "noise_rng_state" not in ckpt["dp_state"]

    # a checkpoint without ledger is refused, never silently reset
    saved = folder / "latest.bak"
    shutil.copy(latest, saved)
    torch.save({k: v for k, v in ckpt.items() if k != "dp_state"}, latest)
    refused = train(root, trainer, cfg, "--c", check=False)
    assert refused.returncode != 0 and "no privacy ledger" in refused.stderr
    # other DP settings than the checkpoint's are refused too
    shutil.copy(saved, latest)
    mixed = train(root, trainer, dict(cfg, clip_norm=0.5), "--c", check=False)
    assert mixed.returncode != 0 and "clip_norm" in mixed.stderr

    shutil.copy(saved, latest)
    train(root, trainer, cfg, "--c")
    resumed = check_privacy_json(folder, "flat", steps=6, cfg=cfg)
    assert resumed["epsilon"] == straight["epsilon"] and resumed["steps"] == straight["steps"] == 6
    assert resumed["ledger_history"] == straight["ledger_history"]


def test_sigkill_at_random_points_then_resume(root):
    """6 SIGKILLs (mid-step after the journal record, while a checkpoint is half written, after a checkpoint_best
    newer than checkpoint_latest), each followed by nnUNetv2_train --c: training finishes, every checkpoint loads,
    no lost-timeline checkpoint survives, noise is never replayed, and epsilon covers every journaled step."""
    import random

    from nnunet_dp.accounting import epsilon_of
    from nnunet_dp.journal import JOURNAL_FILE, read_history, total_steps
    trainer = "nnUNetTrainerDP_TestKill"
    cfg = dict(TINY, num_epochs=8, save_every=2, noise_multiplier=1.0, target_epsilon=None,
               num_val_iterations_per_epoch=0)
    folder = fold(root, trainer)
    shutil.rmtree(folder.parent, ignore_errors=True)
    noise_log = root / "noise_log.txt"
    noise_log.unlink(missing_ok=True)
    rng = random.Random(20261127)
    kills = [rng.choice([f"step:{rng.randint(1, 4)}", f"ckpt:{rng.randint(1, 2)}", f"best:{rng.randint(1, 2)}"])
             for _ in range(6)]
    kills[:3] = ["ckpt:1", "best:1", "step:3"]  # each kind at least once
    for i, kill in enumerate(kills):
        proc = train(root, trainer, cfg, *(["--c"] if i else []), check=False, NNUNET_DP_TEST_KILL=kill,
                     NNUNET_DP_TEST_NOISE_LOG=str(noise_log))
        assert proc.returncode == -9, (kill, proc.stderr[-2000:])
    train(root, trainer, cfg, "--c", NNUNET_DP_TEST_NOISE_LOG=str(noise_log))

    rep = json.loads((folder / "privacy.json").read_text())
    history = read_history(str(folder / JOURNAL_FILE))
    assert rep["status"] == "finished" and rep["steps"] == total_steps(history)
    assert rep["epsilon"] >= epsilon_of(history, delta=rep["delta"]) - 1e-12
    lines = [ln.split() for ln in noise_log.read_text().splitlines()]
    assert len(lines) - len(kills) <= total_steps(history) <= len(lines)
    vectors = [tuple(ln[2:]) for ln in lines]
    assert len(set(vectors)) == len(vectors), "a noise draw was replayed"
    pids = list(dict.fromkeys(ln[0] for ln in lines))
    for crashed, resumed in itertools.pairwise(pids):
        first = next(tuple(ln[2:]) for ln in lines if ln[0] == resumed)
        assert first not in {tuple(ln[2:]) for ln in lines if ln[0] == crashed}
    assert not list(folder.glob("*.tmp"))
    final_steps = None
    for name in ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth"):
        if (folder / name).exists():
            ckpt = torch.load(folder / name, map_location="cpu", weights_only=False)
            steps = total_steps(ckpt["dp_state"]["ledger"]["history"])  # every step of the folder up to its writing
            final_steps = steps if final_steps is None else final_steps
            assert steps <= final_steps, f"{name} is from a lost timeline"
    assert final_steps == total_steps(history)
    # the crashed steps are counted although the final model's own timeline has only the planned ones
    assert total_steps(history) > cfg["num_epochs"] * cfg["num_iterations_per_epoch"]


def test_seeded_run_publishes_no_seed_and_says_so(root):
    """Invariant 8: no seed or generator state in any released file; privacy.json marks the run as not private."""
    trainer, seed = "nnUNetTrainerDP", 918273645
    folder = fold(root, trainer)
    shutil.rmtree(folder.parent, ignore_errors=True)
    train(root, trainer, dict(TINY, seed=seed))
    rep = json.loads((folder / "privacy.json").read_text())
    assert rep["private_randomness"] is False and any("Reproducible, not private" in a for a in rep["assumptions"])
    for path in folder.parent.rglob("*"):
        if path.is_file() and path.suffix != ".pth":
            assert str(seed) not in path.read_text(errors="replace"), path
    for path in folder.glob("*.pth"):
        assert_no_seed(torch.load(path, map_location="cpu", weights_only=False), seed, path.name)


def assert_no_seed(obj, seed, where):
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert not any(w in str(k).lower() for w in ("seed", "rng", "generator")), f"{where}: key {k}"
            assert_no_seed(v, seed, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            assert_no_seed(v, seed, where)
    else:
        assert not isinstance(obj, torch.Generator) and str(seed) not in str(obj), where


def test_val_needs_no_environment_and_reads_the_folders_settings(root):
    trainer = "nnUNetTrainerDP_AutoS"
    if not (fold(root, trainer) / "checkpoint_final.pth").exists():
        train(root, trainer, TINY)
    env = nnunet_env(root)
    env.pop("nnUNet_dp_config", None)
    proc = run(["nnUNetv2_train", str(D2), "2d", "0", "-tr", trainer, "-device", "cpu", "--val"], env)
    assert proc.returncode == 0
    assert "dp_config.json (nnUNet_dp_config not set)" in next(fold(root, trainer).glob("training_log_*.txt")
                                                              ).read_text() + proc.stdout


def test_training_stops_before_overspending(root):
    """Resuming with more epochs than the budget allows stops at the last step within epsilon."""
    cfg = dict(TINY, num_epochs=2, noise_multiplier=1.0, target_epsilon=None)
    trainer = "nnUNetTrainerDP_TestCrash"
    shutil.rmtree(fold(root, trainer).parent, ignore_errors=True)
    # sigma=1, q=1/3: epsilon after 2 steps ~ 1.9; a budget of 3.0 allows a few steps more, not 20
    capped = dict(cfg, num_epochs=10, target_epsilon=3.0)
    train(root, trainer, capped)
    rep = json.loads((fold(root, trainer) / "privacy.json").read_text())
    assert rep["epsilon"] <= 3.0 and rep["status"].startswith("stopped")
    assert epsilon_for(noise_multiplier=1.0, sampling_rate=rep["sampling_rate"], steps=rep["steps"] + 1,
                       delta=rep["delta"]) > 3.0


def test_poisson_loader_in_nnunet_pipeline(root, monkeypatch):
    """Batches drawn by the DP trainer's loader: sizes vary around qN (0 included), no case twice, shapes right."""
    import os

    for k, v in nnunet_env(root).items():
        if k.startswith("nnUNet"):
            monkeypatch.setenv(k, v)
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from nnunet_dp.nnunet.loader import nnUNetPoissonDataLoader

    pre = root / "pre" / f"Dataset{D2}_Test{D2}" / "nnUNetPlans_2d"
    ds_cls = infer_dataset_class(str(pre))
    ds = ds_cls(str(pre), None)
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(str(pre.parent / "nnUNetPlans.json"))
    lm = pm.get_label_manager(json.loads((pre.parent / "dataset.json").read_text()))
    dl = nnUNetPoissonDataLoader(ds, (32, 32), (32, 32), lm, sampling_rate=0.25, oversample_foreground_percent=0.33,
                                 transforms=None, seed=1)
    sizes = []
    for _ in range(300):
        b = dl.generate_train_batch()
        keys = list(b["keys"])
        assert len(set(keys)) == len(keys)
        sizes.append(len(keys))
        if keys:
            assert tuple(b["data"].shape) == (len(keys), 1, 32, 32)
        else:
            assert b["data"] is None
    n = len(ds.identifiers)
    assert os.environ["nnUNet_n_proc_DA"] == "0"
    assert abs(np.mean(sizes) - 0.25 * n) < 5 * np.sqrt(n * 0.25 * 0.75 / 300)
    assert 0 in sizes


def test_3d_fullres_with_multiprocess_augmenter(tmp_path):
    prepare(tmp_path, dataset_id=D3, shape=(16, 32, 32), configuration="3d_fullres", num_train=8, num_test=1)
    cfg = dict(TINY, expected_batch_size=2)
    train(tmp_path, "nnUNetTrainerDP_PSAC", cfg, ds=D3, config="3d_fullres", nnUNet_n_proc_DA="2")
    rep = json.loads((fold(tmp_path, "nnUNetTrainerDP_PSAC", D3, "3d_fullres") / "privacy.json").read_text())
    assert rep["steps"] == 2 and rep["rule"] == "psac" and rep["num_training_cases"] == 6
