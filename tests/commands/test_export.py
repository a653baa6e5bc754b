"""nnUNetv2_dp_export end to end: a tiny DP fold exported, installed with nnU-Net's own installer, predicted with
nnUNetv2_predict; the zip holds only releasable files, no logger value, no seed, no fingerprint; refusals."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from e2e import nnunet_env, prepare, run

from nnunet_dp.accounting import epsilon_for
from nnunet_dp.nnunet import checkpoints

D = 981
TINY = {"num_epochs": 1, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1,
        "expected_batch_size": 3, "target_epsilon": 8.0}
TRAINER = "nnUNetTrainerDP"
MODEL = f"Dataset{D}_Test{D}/{TRAINER}__nnUNetPlans__2d"
SEED = 918273645
FOLD_FILES = ("checkpoint_final.pth", "privacy.json", "dp_config.json")
MODEL_FILES = ("plans.json", "dataset.json", "release_privacy.json", "MODEL_CARD.md")
NEVER = ("debug.json", "progress.png", "training_log", "dataset_fingerprint.json", "splits_final.json",
         "dp_journal.txt", "checkpoint_latest.pth", "validation/", "summary.json", "postprocessing_scores.json")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    prepare(root, dataset_id=D, shape=(32, 32), configuration="2d")
    train(root, 0, TINY)
    return root


def train(root: Path, fold: int, cfg: dict) -> None:
    run(["nnUNetv2_train", str(D), "2d", str(fold), "-tr", TRAINER, "-device", "cpu"], nnunet_env(root, cfg))


def export(root: Path, *args: str, check: bool = True, **env: str):
    return run(["nnUNetv2_dp_export", "-d", str(D), "-c", "2d", "-tr", TRAINER, *args], nnunet_env(root, **env),
               check=check)


def expected(folds=(0,), best=False, pp=None) -> set[str]:
    names = {f"{MODEL}/{n}" for n in MODEL_FILES}
    names |= {f"{MODEL}/fold_{f}/{n}" for f in folds for n in FOLD_FILES + (("checkpoint_best.pth",) if best else ())}
    return names | ({f"{MODEL}/{pp}/postprocessing.pkl", f"{MODEL}/{pp}/postprocessing.json"} if pp else set())


def leaves(obj, path=""):
    """Every non-tensor leaf of a checkpoint, written here independently of checkpoints.walk."""
    if isinstance(obj, torch.Tensor):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield f"{path}.{k}", k
            yield from leaves(v, f"{path}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from leaves(v, f"{path}[{i}]")
    else:
        yield path, obj


def private_leaves(ckpt: dict) -> list[str]:
    """Timestamps (floats in 1e9..3e9: 2001..2065 in seconds), logger values, seeds or generators."""
    bad = [p for p, v in leaves(ckpt) if isinstance(v, (float, np.floating)) and 1e9 <= v <= 3e9]
    bad += [p for p, v in leaves(ckpt) if isinstance(v, str) and any(w in v.lower() for w in ("seed", "rng_state"))]
    bad += [p for p, v in leaves(ckpt) if isinstance(v, torch.Generator) or (isinstance(v, int) and v == SEED)]
    bad += [f"logging.{k}" for k, v in (ckpt.get("logging") or {}).items() if v]
    return bad + (["_best_ema"] if ckpt.get("_best_ema") is not None else [])


def check_zip(path: Path, names: set[str]) -> dict[str, bytes]:
    """Exactly `names`, nothing private among them; every checkpoint clean (by nnunet_dp and independently)."""
    with zipfile.ZipFile(path) as zf:
        content = {n: zf.read(n) for n in zf.namelist()}
    assert set(content) == names
    assert not [n for n in content if any(w in n for w in NEVER)]
    for name, data in content.items():
        if name.endswith(".pth"):
            ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
            assert checkpoints.unreleasable(ckpt) == [] and private_leaves(ckpt) == [], name
            assert ckpt["logging"] and all(v == [] for v in ckpt["logging"].values())
        else:
            assert str(SEED) not in data.decode(errors="replace") and '"seed"' not in data.decode(errors="replace")
    return content


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_export_install_predict(root):
    out = root / "model.zip"
    proc = export(root, "-f", "0", "-o", str(out))
    content = check_zip(out, expected())
    print("\n".join(sorted(content)))
    fold = root / "res" / MODEL / "fold_0"
    assert content[f"{MODEL}/fold_0/checkpoint_final.pth"] == (fold / "checkpoint_final.pth").read_bytes()
    assert "dataset_fingerprint.json" in proc.stdout and "fold_0/debug.json" in proc.stdout
    own = json.loads((fold / "privacy.json").read_text())
    release = json.loads(content[f"{MODEL}/release_privacy.json"])
    reference = epsilon_for(noise_multiplier=own["noise_multiplier"], sampling_rate=own["sampling_rate"],
                            steps=own["steps"], delta=own["delta"])  # opacus, one fold: its own epsilon
    assert release["covered"] and release["epsilon"] == pytest.approx(reference, rel=1e-9)
    assert release["release"].startswith("Covered") and f"Release: epsilon = {reference:.4f}" in proc.stdout
    card = content[f"{MODEL}/MODEL_CARD.md"].decode()
    assert card.startswith(f"# Covered: epsilon = {reference:.4f}") and "one patient's image and label" in card
    assert f"| {own['num_training_cases']} | flat | 1 | {own['noise_multiplier']:.4f} |" in card
    assert own["assumptions"][0] in card and "DP-Morph postprocessing choice: not included" in card

    installed = root / "installed"
    installed.mkdir()
    env = nnunet_env(root, nnUNet_results=str(installed))
    run(["nnUNetv2_install_pretrained_model_from_zip", str(out)], env)
    pred = root / "pred"
    run(["nnUNetv2_predict", "-i", str(root / "raw" / f"Dataset{D}_Test{D}" / "imagesTs"), "-o", str(pred),
         "-d", str(D), "-c", "2d", "-f", "0", "-tr", TRAINER, "-device", "cpu", "-npp", "1", "-nps", "1"], env)
    assert len(list(pred.glob("*.nii.gz"))) == 2


def test_existing_zip_is_refused_without_overwrite(root):
    out = root / "exists.zip"
    out.write_bytes(b"keep me")
    proc = export(root, "-f", "0", "-o", str(out), check=False)
    assert proc.returncode != 0 and "--overwrite" in proc.stderr and out.read_bytes() == b"keep me"
    export(root, "-f", "0", "-o", str(out), "--overwrite")
    check_zip(out, expected())


def test_seeded_fold_is_refused_unless_allowed(root):
    train(root, 1, dict(TINY, seed=SEED))
    out = root / "seeded.zip"
    proc = export(root, "-f", "0", "1", "-o", str(out), check=False)
    assert proc.returncode != 0 and not out.exists()
    assert "NOT covered" in proc.stderr and "fold_1: private_randomness = False" in proc.stderr
    assert "--allow-not-covered" in proc.stderr
    proc = export(root, "-f", "0", "1", "-o", str(out), "--allow-not-covered")
    content = check_zip(out, expected(folds=(0, 1)))
    release = json.loads(content[f"{MODEL}/release_privacy.json"])
    assert release["epsilon"] is None and not release["covered"] and release["release"].startswith("NOT covered")
    assert next(iter(release)) == "release"
    assert content[f"{MODEL}/MODEL_CARD.md"].decode().startswith("# NOT covered") and "NOT covered" in proc.stdout


def test_old_checkpoint_with_logger_is_cleaned_in_the_zip_only(root):
    """A fold trained by an older version: checkpoint_final/best with nnU-Net's logger, _best_ema, dropped count."""
    results = root / "old_res"
    shutil.copytree(root / "res" / MODEL, results / MODEL, ignore=shutil.ignore_patterns("fold_1"))
    fold = results / MODEL / "fold_0"
    logger = {"mean_fg_dice": [0.41], "ema_fg_dice": [0.41], "dice_per_class_or_region": [[0.3, 0.52]],
              "train_losses": [0.93], "val_losses": [0.88], "lrs": [0.01], "epoch_start_timestamps": [1.7e9],
              "epoch_end_timestamps": [1.7e9 + 3.25]}
    before = {}
    for name in ("checkpoint_final.pth", "checkpoint_best.pth"):
        ckpt = torch.load(fold / name, map_location="cpu", weights_only=False)
        ckpt.update(logging=logger, _best_ema=0.41, dp_dropped=1)
        ckpt.pop(checkpoints.RELEASE_MARK, None)
        torch.save(ckpt, fold / name)
        assert private_leaves(ckpt), "the independent check must see the logger"
        before[name] = sha256(fold / name)
    out = root / "old.zip"
    proc = export(root, "-f", "0", "-o", str(out), "--with-best", nnUNet_results=str(results))
    content = check_zip(out, expected(best=True))
    assert proc.stdout.count("cleaned copy") == 2 and "logging.train_losses (1 values)" in proc.stdout
    for name, digest in before.items():
        assert sha256(fold / name) == digest, f"{name} of the user was modified"
        source = torch.load(fold / name, map_location="cpu", weights_only=False)
        packed = torch.load(io.BytesIO(content[f"{MODEL}/fold_0/{name}"]), map_location="cpu", weights_only=False)
        assert source["network_weights"].keys() == packed["network_weights"].keys()
        assert all(torch.equal(v, packed["network_weights"][k]) for k, v in source["network_weights"].items())
        assert packed["dp_state"] == source["dp_state"] and packed["trainer_name"] == TRAINER
    assert "checkpoint_best.pth is packed (--with-best)" in content[f"{MODEL}/MODEL_CARD.md"].decode()


def test_dp_morph_choice_must_be_private(root):
    fold, gt = root / "res" / MODEL / "fold_0", root / "pre" / f"Dataset{D}_Test{D}" / "gt_segmentations"
    determine = ["nnUNetv2_dp_determine_postprocessing", "-i", str(fold / "validation"), "-ref", str(gt), "-np", "1"]
    run([*determine, "-o", str(root / "pp_open")], nnunet_env(root))
    run([*determine, "-o", str(root / "pp_private"), "-epsilon_select", "1"], nnunet_env(root))
    out = root / "pp.zip"
    proc = export(root, "-f", "0", "-o", str(out), "--postprocessing", str(root / "pp_open"), check=False)
    assert proc.returncode != 0 and "without -epsilon_select" in proc.stderr and not out.exists()
    export(root, "-f", "0", "-o", str(out), "--postprocessing", str(root / "pp_open"), "--allow-not-covered")
    content = check_zip(out, expected(pp="crossval_results_folds_0"))
    summary = json.loads(content[f"{MODEL}/crossval_results_folds_0/postprocessing.json"])
    scores = {"dice_before", "dice_after", "candidate_dice", "choice_utility"}  # the Dice of the validation cases
    assert scores <= set(json.loads((root / "pp_open" / "postprocessing.json").read_text())["dp_morph"])
    assert not scores & set(summary["dp_morph"]) and summary["dp_morph"]["choice"]
    assert "included, NOT private" in content[f"{MODEL}/MODEL_CARD.md"].decode()

    export(root, "-f", "0", "-o", str(out), "--postprocessing", str(root / "pp_private"), "--overwrite")
    content = check_zip(out, expected(pp="crossval_results_folds_0"))
    release = json.loads(content[f"{MODEL}/release_privacy.json"])
    assert release["covered"] and release["epsilon"] == pytest.approx(release["epsilon_training"] + 1.0, rel=1e-12)
    assert content[f"{MODEL}/crossval_results_folds_0/postprocessing.pkl"] == \
        (root / "pp_private" / "postprocessing.pkl").read_bytes()
    assert "included, private, epsilon_select = 1" in content[f"{MODEL}/MODEL_CARD.md"].decode()
