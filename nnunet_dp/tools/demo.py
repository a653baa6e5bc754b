"""nnUNetv2_dp_demo: synthetic dataset -> plan/preprocess -> DP training -> predict -> DP-Morph -> Dice and epsilon.

Everything runs through nnU-Net's own commands, exactly as a user would type them; the commands are printed. The
DP-Morph choice is private (-epsilon_select, default morph_selection.DEFAULT_EPSILON_SELECT), and the numbers with
DP-Morph carry the training epsilon, the selection's and their composition (as nnUNetv2_dp_privacy composes them).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from os.path import join

import numpy as np
import SimpleITK as sitk

from nnunet_dp.locations import trainer_folder, trainer_hint
from nnunet_dp.synthetic import make_dataset
from nnunet_dp.tools.morph_selection import NOT_PRIVATE, selection_privacy

DATASET_ID, NAME = 990, "DPDemo"


DATASET = f"Dataset{DATASET_ID}_{NAME}"


# A budget that finishes in about 10 minutes on 2 CPU cores: Poisson batches of ~32 of the 320 training cases. The
# learning rate and momentum are the DP trainers' defaults (nnunet_dp/optim.py).
DEMO_SETTINGS = {"target_epsilon": 8.0, "delta": 1e-5, "clip_norm": 1.0, "expected_batch_size": 32,
                 "num_epochs": 6, "num_iterations_per_epoch": 20, "num_val_iterations_per_epoch": 2,
                 "save_every": 2}


QUICK_SETTINGS = {**DEMO_SETTINGS, "num_epochs": 1, "num_iterations_per_epoch": 2, "expected_batch_size": 8}


# The demo shrinks nnU-Net's 2D network for CPU (features per stage): DP noise grows with the parameter count.
DEMO_FEATURES = [8, 16, 32, 64]


def _env(work: str, dp_config: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(nnUNet_raw=join(work, "nnUNet_raw"), nnUNet_preprocessed=join(work, "nnUNet_preprocessed"),
               nnUNet_results=join(work, "nnUNet_results"), nnUNet_dp_config=dp_config, nnUNet_compile="f",
               PYTHONUNBUFFERED="1",  # progress lines arrive as they are written
               nnUNet_extTrainer=os.pathsep.join(p for p in [trainer_folder(), env.get("nnUNet_extTrainer")] if p))
    env.setdefault("nnUNet_n_proc_DA", "1")
    env.setdefault("nnUNet_def_n_proc", "2")  # nnU-Net spawns 8 export processes by default
    return env


def console_script(name: str) -> str:
    """The console script installed beside this Python (works without an activated venv), else from PATH."""
    beside = join(os.path.dirname(sys.executable), name)
    return beside if os.path.isfile(beside) else (shutil.which(name) or name)


def planning_env(env: dict[str, str]) -> dict[str, str]:
    """`env` with nnUNet_n_proc_DA >= 1: nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA), which
    fails for 0."""
    return {**env, "nnUNet_n_proc_DA": str(max(1, int(env.get("nnUNet_n_proc_DA") or 1)))}


# training-log lines echoed to the terminal as progress (everything goes to demo_log.txt)
PROGRESS = ("Epoch ", "Pseudo dice", "DP:", "train_loss")


def _run(cmd: list[str], env: dict[str, str], log: str) -> None:
    print(f"\n$ {' '.join(cmd)}", flush=True)
    with open(log, "a") as f, subprocess.Popen([console_script(cmd[0]), *cmd[1:]], env=env, stdout=subprocess.PIPE,
                                               stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        for line in proc.stdout:
            f.write(line)
            text = line.split(": ", 1)[-1].strip()  # nnU-Net prefixes a timestamp
            if text.startswith(PROGRESS) and not text.startswith("Epoch time"):
                print(f"  {text}", flush=True)
    if proc.returncode != 0:
        with open(log) as f:
            tail = f.read()[-3000:]
        sys.exit(f"Command failed ({proc.returncode}): {' '.join(cmd)}\n--- last lines of {log} ---\n{tail}"
                 + trainer_hint(tail))


def shrink_network(plans_file: str, features: list[int]) -> None:
    """Cap the 2D network to len(features) stages with these widths (a smaller model for a CPU demo)."""
    with open(plans_file) as f:
        plans = json.load(f)
    arch = plans["configurations"]["2d"]["architecture"]["arch_kwargs"]
    n = min(len(features), arch["n_stages"])
    arch.update(n_stages=n, features_per_stage=features[:n], kernel_sizes=arch["kernel_sizes"][:n],
                strides=arch["strides"][:n], n_conv_per_stage=arch["n_conv_per_stage"][:n],
                n_conv_per_stage_decoder=arch["n_conv_per_stage_decoder"][:n - 1])
    plans["configurations"]["2d"]["pool_op_kernel_sizes"] = arch["strides"]
    plans["configurations"]["2d"]["conv_kernel_sizes"] = arch["kernel_sizes"]
    with open(plans_file, "w") as f:
        json.dump(plans, f, indent=2)


def dice_per_class(pred_folder: str, ref_folder: str, labels: list[int]) -> dict[int, float]:
    """Mean Dice per class over the cases (a case where both are empty counts as 1)."""
    scores: dict[int, list[float]] = {c: [] for c in labels}
    for name in sorted(os.listdir(ref_folder)):
        ref = sitk.GetArrayFromImage(sitk.ReadImage(join(ref_folder, name)))
        pred = sitk.GetArrayFromImage(sitk.ReadImage(join(pred_folder, name)))
        for c in labels:
            a, b = pred == c, ref == c
            denom = a.sum() + b.sum()
            scores[c].append(1.0 if denom == 0 else 2.0 * np.logical_and(a, b).sum() / denom)
    return {c: float(np.mean(v)) for c, v in scores.items()}


def run_demo(work: str, trainer: str, settings: dict, *, quick: bool, epsilon_select: float | None) -> dict:
    t0 = time.time()
    cfg = join(work, "dp_config.json")
    with open(cfg, "w") as f:
        json.dump(settings, f, indent=2)
    env, log = _env(work, cfg), join(work, "demo_log.txt")
    raw = join(work, "nnUNet_raw", DATASET)
    if not os.path.isdir(raw):
        n_train = 40 if quick else 400
        print(f"Making synthetic dataset {DATASET} ({n_train} training + 20 test cases of 32x32) in {raw}")
        make_dataset(env["nnUNet_raw"], dataset_id=DATASET_ID, name=NAME, num_train=n_train, num_test=20,
                     shape=(32, 32))
    plan_env = planning_env(env)
    _run(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "2d", "-np", "2"], plan_env, log)
    shrink_network(join(env["nnUNet_preprocessed"], DATASET, "nnUNetPlans.json"), DEMO_FEATURES)
    print(f"DP settings ({cfg}): {json.dumps(settings)}")
    _run(["nnUNetv2_train", str(DATASET_ID), "2d", "0", "-tr", trainer, "-device", "cpu"], env, log)
    model = join(env["nnUNet_results"], DATASET, f"{trainer}__nnUNetPlans__2d")
    pred, pred_pp = join(work, "test_predictions"), join(work, "test_predictions_dpmorph")
    _run(["nnUNetv2_predict", "-i", join(raw, "imagesTs"), "-o", pred, "-d", str(DATASET_ID), "-c", "2d", "-f",
          "0", "-tr", trainer, "-device", "cpu", "-npp", "1", "-nps", "1"], env, log)
    val = join(model, "fold_0", "validation")
    private = [] if epsilon_select is None else ["-epsilon_select", f"{epsilon_select!r}"]
    _run(["nnUNetv2_dp_determine_postprocessing", "-i", val, "-ref", join(raw, "labelsTr"), "-np", "2", *private],
         env, log)
    _run(["nnUNetv2_apply_postprocessing", "-i", pred, "-o", pred_pp, "-pp_pkl_file",
          join(val, "postprocessing.pkl"), "-plans_json", join(model, "plans.json"), "-dataset_json",
          join(model, "dataset.json"), "-np", "1"], env, log)
    return report(work, raw, pred, pred_pp, join(model, "fold_0"), val, time.time() - t0)


def report(work: str, raw: str, pred: str, pred_pp: str, fold: str, val: str, seconds: float) -> dict:
    with open(join(fold, "privacy.json")) as f:
        privacy = json.load(f)
    with open(join(val, "postprocessing.json")) as f:
        choice = json.load(f)
    morph = selection_privacy(val, fold, "dp")
    ref = join(raw, "labelsTs")
    before, after = dice_per_class(pred, ref, [1, 2]), dice_per_class(pred_pp, ref, [1, 2])
    result = {"epsilon": privacy["epsilon"], "delta": privacy["delta"], "steps": privacy["steps"],
              "noise_multiplier": privacy["noise_multiplier"], "dice_test": before, "dice_test_dpmorph": after,
              "dpmorph_selection": morph["selection"], "epsilon_training": morph["epsilon_training"],
              "epsilon_select": morph["epsilon_select"], "epsilon_total": morph["epsilon_total"],
              "not_covered": morph["not_covered"], "seconds": seconds}
    with open(join(work, "demo_result.json"), "w") as f:
        json.dump({**result, "dpmorph": choice}, f, indent=2)
    print("\n==== nnunet-dp demo ====")
    print(f"privacy of the training: epsilon = {privacy['epsilon']:.3f} at delta = {privacy['delta']} "
          f"({privacy['accountant']}), sigma = {privacy['noise_multiplier']:.3f}, {privacy['steps']} steps, rule "
          f"{privacy['rule']}")
    for c, name in ((1, "disk"), (2, "ring")):
        print(f"test Dice {name:5s}: {before[c]:.4f}  -> with DP-Morph {after[c]:.4f}")
    print(f"mean test Dice: {np.mean(list(before.values())):.4f} -> {np.mean(list(after.values())):.4f}")
    print(morph_lines(morph))
    print(f"privacy report: {join(fold, 'privacy.json')}\nDP-Morph choice: {join(val, 'postprocessing.json')}")
    print(f"total time {seconds / 60:.1f} min; everything is in {work}")
    return result


def morph_lines(morph: dict) -> str:
    """What the numbers with DP-Morph cost: training epsilon, selection epsilon, total (or why none covers them)."""
    if morph["epsilon_total"] is not None:
        return (f"privacy with DP-Morph: epsilon = {morph['epsilon_training']:.3f} (training) + "
                f"{morph['epsilon_select']:g} (selection) = {morph['epsilon_total']:.3f} (total, at delta = "
                f"{morph['delta']:g}; composed as nnUNetv2_dp_privacy does)")
    return (f"privacy with DP-Morph: {NOT_PRIVATE}: epsilon = {morph['epsilon_training']:.3f} (training) covers the "
            "numbers without DP-Morph only; " + "; ".join(morph["not_covered"]))
