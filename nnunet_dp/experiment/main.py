"""The harness from the command's parsed options (nnunet_dp.commands.experiment has the options and their meaning):
the checks before any work, the grid, the run loop and the report."""

from __future__ import annotations

import argparse
import os
from os.path import isdir, join

from nnunet_dp.experiment.budget import inference_voxels
from nnunet_dp.experiment.data import public_mode, raw_dataset
from nnunet_dp.experiment.grid import run_all
from nnunet_dp.experiment.levers import check_seeds, lever_grid, reference_grid
from nnunet_dp.experiment.plan import REFINEMENTS, ExperimentError, resolve_budget, run_grid
from nnunet_dp.experiment.prepare import plan_experiment, prepare
from nnunet_dp.experiment.public_alone import PublicAlone
from nnunet_dp.experiment.report import write_report
from nnunet_dp.tools.morph_selection import morph_selection


def _check(args: argparse.Namespace) -> None:
    for r in args.refine:
        if r not in REFINEMENTS:
            raise ExperimentError("--refine", r, f"one of {list(REFINEMENTS)}")
    if args.device not in (None, "cpu", "cuda"):
        raise ExperimentError("-device", args.device, "cpu or cuda")
    if args.np < 1:
        raise ExperimentError("-np", args.np, "an integer >= 1")
    if not 0 < args.val_fraction < 1:
        raise ExperimentError("--val-fraction", args.val_fraction, "a number strictly between 0 and 1")
    if not 0 < args.test_fraction < 1:
        raise ExperimentError("--test-fraction", args.test_fraction, "a number strictly between 0 and 1")
    if args.public_fraction is not None and not 0 < args.public_fraction < 1:
        raise ExperimentError("--public-fraction", args.public_fraction, "a number strictly between 0 and 1 (the share "
                              "of the non-test cases drawn as public data)", "E.g. --public-fraction 0.3.")
    if args.public_epochs is not None and (not public_mode(args) or isinstance(args.public_epochs, bool)
                                           or args.public_epochs < 1):
        raise ExperimentError("--public-epochs", args.public_epochs, "an integer >= 1, together with --public-fraction "
                              "(it sets how long the public model trains)",
                              "E.g. --public-fraction 0.3 --public-epochs 32.")
    if args.projection_dims and not public_mode(args):
        raise ExperimentError("--projection-dims", args.projection_dims, "together with --public-fraction or "
                              "--public-dataset (the subspace comes from the public model and its cases)")
    if public_mode(args) and args.pretrained is not None:
        raise ExperimentError("--pretrained", args.pretrained, "no file together with --public-fraction (that option "
                              "trains the public model the runs start from)", "Give one of the two.")
    for var in ("nnUNet_raw", "nnUNet_preprocessed"):
        if not os.environ.get(var):
            raise ExperimentError(f"environment variable {var}", os.environ.get(var), "a folder",
                                  "Set nnUNet_raw and nnUNet_preprocessed as for nnU-Net.")


def _environment() -> dict[str, str]:
    from nnunet_dp.locations import trainer_folder

    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ)
    env["nnUNet_extTrainer"] = os.pathsep.join(
        p for p in [trainer_folder(), join(here, "trainers"), env.get("nnUNet_extTrainer")] if p)
    env.setdefault("nnUNet_compile", "f")
    env.setdefault("PYTHONUNBUFFERED", "1")  # the training log arrives as it is written (the ETA reads it)
    return env


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_experiment(args: argparse.Namespace, command: str) -> tuple[str, list, list[str]] | None:
    """The whole grid from the parsed options: (results.md path, results, failed run names), or None after --dry-run.
    Every check runs before any work (prepare.py, budget.py)."""
    _check(args)
    selection = morph_selection(args.dpmorph_selection, args.epsilon_select)
    levers = lever_grid(args.trainable, args.augmentations_per_case, args.ema_decay,
                        dp_rules=any(r != "nonprivate" for r in args.rules), lora_ranks=args.lora_ranks,
                        projection_dims=args.projection_dims, morph=args.morph_in_training)
    references = reference_grid(args.reference_trainable, reference="nonprivate" in args.rules,
                                lora_rank=args.lora_ranks[0] if args.lora_ranks else None)
    specs = run_grid(args.rules, args.epsilons, args.lrs, levers, check_seeds(args.seeds), references)
    budget_name, budget = resolve_budget(args.budget)  # before preprocessing: a bad file fails at once
    out = os.path.abspath(args.o or f"dp_experiment_{args.d}_{args.c}_{budget_name}")
    if os.path.exists(out) and not isdir(out):
        raise ExperimentError("-o", out, "a folder (new or from an earlier invocation); it is a file")
    dataset = raw_dataset("-d", str(args.d))
    args.public_raw = None if args.public_dataset is None else raw_dataset("--public-dataset", str(args.public_dataset))
    os.makedirs(out, exist_ok=True)
    env = _environment()
    exp = plan_experiment(args, out, env, specs, budget_name, budget, dataset)
    if args.dry_run:
        return None
    ctx, header, pretraining = prepare(args, out, env, exp, args.device or _default_device(), selection)
    header["command"] = command
    public = None if pretraining is None else PublicAlone(pretraining, tuple(exp.split["val"]), exp.file_ending)
    results, failed = run_all(ctx, exp.runs, exp.budget.spec, inference_voxels(
        exp.planned, exp.budget.patch_size, exp.budget.fold.num_val + exp.budget.fold.num_test),
        exp.summary["voxels_per_step"], pretraining, public)
    return write_report(out, header, results), results, failed
