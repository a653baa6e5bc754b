"""Files meant for release carry no unnoised statistic of the private cases (docs/invariants.md, invariant 7), and a folder that
was ever seeded stays "not private" (invariant 8), through nnU-Net's own commands."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from e2e import nnunet_env, prepare, run

from nnunet_dp.nnunet import checkpoints
from nnunet_dp.release import compose_release
from nnunet_dp.release_folders import load_fold

DS = 993
TINY = {"num_epochs": 2, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1, "expected_batch_size": 3,
        "target_epsilon": 8.0, "save_every": 1}
TIMESTAMPS = (1.0e9, 3.0e9)  # seconds since 1970: 2001 .. 2065


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("release_files")
    prepare(root, dataset_id=DS, shape=(32, 32), configuration="2d")
    return root


def fold(root, trainer):
    return root / "res" / f"Dataset{DS}_Test{DS}" / f"{trainer}__nnUNetPlans__2d" / "fold_0"


def train(root, trainer, cfg, *args, check=True, **env):
    return run(["nnUNetv2_train", str(DS), "2d", "0", "-tr", trainer, "-device", "cpu", *args],
               nnunet_env(root, cfg, **env), check=check)


def logged_values(log: str) -> set[float]:
    """The training log's unnoised numbers (train_loss, val_loss, pseudo Dice), rounded as nnU-Net prints them."""
    values = set()
    for key in ("train_loss", "val_loss"):
        values |= {float(v) for v in re.findall(rf"{key} (-?[\d.]+(?:e-?\d+)?)", log)}
    for group in re.findall(r"Pseudo dice \[([^\]]*)\]", log):
        values |= {float(v) for v in re.findall(r"-?[\d.]+", group.replace("np.float32", ""))}
    return {v for v in values if v not in (0.0, 1.0)}


def float_leaves(checkpoint: dict) -> list[tuple[str, float]]:
    """Every float outside the weight tensors: python floats and one-element tensors/arrays."""
    out = []
    for path, value in checkpoints.walk(checkpoint):
        if isinstance(value, float):
            out.append((path, value))
        elif isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
            out.append((path, float(value)))
    return out


def test_release_checkpoints_hold_no_logger_value_and_still_load(root):
    trainer = "nnUNetTrainerDP"
    train(root, trainer, TINY)
    folder = fold(root, trainer)
    log = next(folder.glob("training_log_*.txt")).read_text()
    logged = logged_values(log)
    assert logged, "the log should print the unnoised losses this test looks for"
    for name in checkpoints.RELEASABLE_CHECKPOINTS:
        ckpt = torch.load(folder / name, map_location="cpu", weights_only=False)
        assert checkpoints.unreleasable(ckpt) == [], name
        assert ckpt["_best_ema"] is None and ckpt[checkpoints.RELEASE_MARK] is True
        for path, value in float_leaves(ckpt):
            assert not TIMESTAMPS[0] < value < TIMESTAMPS[1], f"{name}: {path} = {value} looks like a timestamp"
            assert round(value, 4) not in logged, f"{name}: {path} = {value} is a logged loss or Dice"
    privacy = json.loads((folder / "privacy.json").read_text())
    assert "dropped_cases" not in privacy
    assert any("checkpoint_latest.pth" in a and "never release" in a for a in privacy["assumptions"])
    # nnU-Net still uses them: prediction from checkpoint_best, --c of a finished run from checkpoint_final
    out = root / "pred_best"
    run(["nnUNetv2_predict", "-i", str(root / "raw" / f"Dataset{DS}_Test{DS}" / "imagesTs"), "-o", str(out), "-d",
         str(DS), "-c", "2d", "-f", "0", "-tr", trainer, "-chk", "checkpoint_best.pth", "-device", "cpu", "-npp", "1",
         "-nps", "1"], nnunet_env(root))
    assert len(list(out.glob("*.nii.gz"))) == 2
    train(root, trainer, TINY, "--c")
    assert json.loads((folder / "privacy.json").read_text())["steps"] == privacy["steps"]


def test_resume_from_a_release_checkpoint_continues_training(root):
    """checkpoint_latest lost: nnU-Net's --c takes checkpoint_best, whose logger is empty; training goes on."""
    trainer = "nnUNetTrainerDP_TestCrash"
    cfg = dict(TINY, num_epochs=3)
    crashed = train(root, trainer, cfg, check=False, NNUNET_DP_TEST_CRASH_AT="2")
    assert crashed.returncode != 0
    folder = fold(root, trainer)
    latest = torch.load(folder / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    assert latest["logging"]["train_losses"] and "dp_dropped" in latest  # the private checkpoint keeps them
    (folder / "checkpoint_latest.pth").unlink()
    train(root, trainer, cfg, "--c")
    rep = json.loads((folder / "privacy.json").read_text())
    # the crashed run's journaled steps count: the resumed run may meet the budget before its last planned step
    assert rep["status"] in ("finished", "stopped: privacy budget spent") and rep["epsilon"] <= 8.0
    assert "resumed from a release checkpoint" in "".join(p.read_text() for p in folder.glob("training_log_*.txt"))
    assert checkpoints.unreleasable(torch.load(folder / "checkpoint_final.pth", map_location="cpu",
                                               weights_only=False)) == []


def test_a_seeded_folder_stays_not_private(root):
    """Seeded run, crash, --c without the seed: refused; privacy.json and the release say not private."""
    trainer = "nnUNetTrainerDP_TestCrash"
    folder = fold(root, trainer)
    shutil.rmtree(folder, ignore_errors=True)
    seeded = dict(TINY, num_epochs=3, seed=11)
    assert train(root, trainer, seeded, check=False, NNUNET_DP_TEST_CRASH_AT="1").returncode != 0
    unseeded = {k: v for k, v in seeded.items() if k != "seed"}
    refused = train(root, trainer, unseeded, "--c", check=False)
    assert refused.returncode != 0 and "seed" in refused.stderr and "new output folder" in refused.stderr
    env = nnunet_env(root)
    env.pop("nnUNet_dp_config", None)  # dp_config.json of the folder (no seed in it): refused too
    assert run(["nnUNetv2_train", str(DS), "2d", "0", "-tr", trainer, "-device", "cpu", "--c"], env,
               check=False).returncode != 0
    rep = json.loads((folder / "privacy.json").read_text())
    assert rep["private_randomness"] is False
    release = compose_release([load_fold(str(folder))])
    assert release["covered"] is False and release["epsilon"] is None
    train(root, trainer, seeded, "--c")  # with its seed it resumes, and stays what it is
    assert json.loads((folder / "privacy.json").read_text())["private_randomness"] is False
