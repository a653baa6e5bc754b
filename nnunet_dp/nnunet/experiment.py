"""nnUNetv2_dp_experiment: the rules × ε × refinement comparison on one dataset, with a held-out test split.

    nnUNetv2_dp_experiment -d 902 -c 2d --budget tiny -o exp902

holds out a seeded test split of the raw training cases, trains the non-private baseline and each (rule, ε) under
the same budget on the rest (fold 0 of the experiment's own splits_final.json), chooses DP-Morph on the validation
predictions only, applies it to the test predictions and scores all on test. Writes OUT/results.csv, results.md and
PNG plots. Finished runs (OUT/runs/<name>/result.json) are skipped; an interrupted training resumes with --c.
--seed seeds the split only: the DP runs draw their noise and sampling from fresh OS entropy, unless --reproducible
seeds them too (repeatable, not private; the results tables say so). DP runs use the DP trainers' default learning
rate (nnunet_dp.optim.default_lr); --lrs LR ... trains each (rule, ε) once more per LR, and the report marks the lr
with the best validation Dice (a choice on private cases: not private).

Before anything is preprocessed or trained the whole grid is checked (experiment_budget): the split, the configuration,
every run's DP settings through the trainers' own DPConfig and make_plan on fold 0's N training cases, earlier run
folders; all problems are reported at once, each with its fix. The named budgets adapt to the dataset (batch at most
N/4 and a voxel target per step, tiny's patch at most 64x64) and the resolved budget (batch, steps, q, sigma and lr per
run, patch, network) is printed and saved as OUT/budget.json (--dry-run stops there). The DP runs train first; after
the first epochs an ETA for the grid is printed, and every progress line carries the time left. A failed run prints its
last error, is marked FAILED in results.md/csv, and the other runs go on.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from os.path import isdir, isfile, join
from typing import Any

from nnunet_dp.errors import DPError
from nnunet_dp.nnunet.experiment_budget import (
    Fold,
    GridError,
    PlannedConfig,
    ResolvedBudget,
    RunPlan,
    budget_summary,
    format_budget,
    inference_voxels,
    plan_runs,
    read_planned,
    resolve_for_dataset,
)
from nnunet_dp.nnunet.experiment_grid import run_all
from nnunet_dp.nnunet.experiment_plan import (
    BUDGETS,
    REFINEMENTS,
    RULES,
    BudgetSpec,
    ExperimentError,
    link_test_cases,
    mirror_preprocessed,
    resolve_budget,
    run_grid,
    split_cases,
)
from nnunet_dp.nnunet.experiment_report import write_report
from nnunet_dp.nnunet.experiment_run import Context, record_or_check, settings_problem


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nnUNetv2_dp_experiment", description=__doc__.split("\n\n")[0])
    p.add_argument("-d", required=True, help="dataset id or name (nnUNet_raw must hold it)")
    p.add_argument("-c", default="2d", help="nnU-Net configuration. Default: 2d")
    p.add_argument("--rules", nargs="+", default=list(RULES), help=f"runs, from {list(RULES)}. Default: all")
    p.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 8.0], help="target ε of the DP runs. "
                                                                                "Default: 1 8")
    p.add_argument("--lrs", nargs="+", type=float, default=[], metavar="LR",
                   help="learning-rate sweep: each (rule, ε) DP run is trained once with the DP default rule "
                        "(nnunet_dp.optim.default_lr) and once per LR (initial_lr = LR, momentum the default 0.9); "
                        "the report marks the lr with the best validation Dice (not private: tuning on the private "
                        "cases leaks). The non-private baseline keeps the budget's lr. Default: none (the rule only)")
    p.add_argument("--refine", nargs="+", default=list(REFINEMENTS),
                   help=f"DP-Morph modes scored on test, from {list(REFINEMENTS)} ('none' is always scored)")
    p.add_argument("--budget", default="tiny", help=f"one of {list(BUDGETS)} (tiny: 2 CPU cores; small, full: a GPU) "
                   "or a JSON file with the budget's fields. Default: tiny")
    p.add_argument("--test-fraction", type=float, default=0.2, help="held-out share of the cases. Default: 0.2")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out test split only; the DP runs' noise and "
                   "Poisson sampling draw fresh OS entropy (no seed in any file) unless --reproducible. Default: 0")
    p.add_argument("--reproducible", action="store_true",
                   help="seed the DP runs' noise and sampling with --seed too: repeatable, NOT private (the noise can "
                        "be regenerated and subtracted from the weights); results.md/csv then say 'private "
                        "randomness: no'")
    p.add_argument("-o", default=None, help="output folder. Default: ./dp_experiment_<dataset>_<c>_<budget>")
    p.add_argument("-device", default=None, help="cpu or cuda. Default: cuda if available")
    p.add_argument("-np", type=int, default=2, help="processes for DP-Morph and evaluation. Default: 2")
    p.add_argument("--dry-run", action="store_true",
                   help="check the whole grid against the dataset (plans it if it has no plans, fingerprint and plans "
                        "only), print and save the resolved budget (OUT/budget.json), then stop before preprocessing "
                        "and training")
    return p


def _check(args: argparse.Namespace) -> None:
    for r in args.refine:
        if r not in REFINEMENTS:
            raise ExperimentError("--refine", r, f"one of {list(REFINEMENTS)}")
    if args.device not in (None, "cpu", "cuda"):
        raise ExperimentError("-device", args.device, "cpu or cuda")
    if args.np < 1:
        raise ExperimentError("-np", args.np, "an integer >= 1")
    if not 0 < args.test_fraction < 1:
        raise ExperimentError("--test-fraction", args.test_fraction, "a number strictly between 0 and 1")
    for var in ("nnUNet_raw", "nnUNet_preprocessed"):
        if not os.environ.get(var):
            raise ExperimentError(f"environment variable {var}", os.environ.get(var), "a folder",
                                  "Set nnUNet_raw and nnUNet_preprocessed as for nnU-Net.")


def _dataset(name_or_id: str) -> tuple[str, str]:
    from nnunetv2.paths import nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        name = maybe_convert_to_dataset_name(name_or_id if not name_or_id.isdigit() else int(name_or_id))
    except RuntimeError as error:
        raise ExperimentError("-d", name_or_id, "a dataset in nnUNet_raw", str(error).splitlines()[0]) from error
    raw = join(nnUNet_raw, name)
    if not isfile(join(raw, "dataset.json")) or not isdir(join(raw, "labelsTr")):
        raise ExperimentError("-d", name_or_id, f"a raw dataset with dataset.json and labelsTr in {raw}")
    return name, raw


def _dataset_id(name: str) -> str:
    return name[len("Dataset"):len("Dataset") + 3]


def _nnunet(cmd: list[str], env: dict[str, str], log: str, what: str) -> None:
    from nnunet_dp.nnunet.demo import planning_env
    from nnunet_dp.nnunet.experiment_run import run_command

    print(f"{what}: {' '.join(cmd)} (log: {log})", flush=True)
    run_command(cmd, planning_env(env), log)


def ensure_plans(name: str, configuration: str, env: dict[str, str], log: str) -> str:
    """The dataset's nnUNetPlans.json; fingerprint and plans with nnU-Net's command (no preprocessing) if missing."""
    plans_file = join(env["nnUNet_preprocessed"], name, "nnUNetPlans.json")
    if not isfile(plans_file):
        _nnunet(["nnUNetv2_plan_and_preprocess", "-d", _dataset_id(name), "-c", configuration, "--no_pp", "-npfp",
                 "2"], env, log, "Planning")
    return plans_file


def ensure_preprocessed(name: str, configuration: str, env: dict[str, str], log: str) -> str:
    """The dataset's preprocessed folder; preprocesses CONFIG with nnU-Net's command if its data are missing (plans
    first if they are missing too)."""
    folder = join(env["nnUNet_preprocessed"], name)
    with open(ensure_plans(name, configuration, env, log)) as f:
        configs = json.load(f)["configurations"]
    if configuration not in configs:
        raise ExperimentError("-c", configuration, f"a configuration of {join(folder, 'nnUNetPlans.json')}: "
                              f"{sorted(configs)}")
    data_id = configs[configuration].get("data_identifier", f"nnUNetPlans_{configuration}")
    if not (isdir(join(folder, data_id)) and os.listdir(join(folder, data_id))):
        _nnunet(["nnUNetv2_preprocess", "-d", _dataset_id(name), "-c", configuration, "-np", "2"], env, log,
                "Preprocessing")
    return folder


def _environment() -> dict[str, str]:
    from nnunet_dp.nnunet.cli import trainer_folder

    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ)
    env["nnUNet_extTrainer"] = os.pathsep.join(
        p for p in [trainer_folder(), join(here, "experiment_trainers"), env.get("nnUNet_extTrainer")] if p)
    env.setdefault("nnUNet_compile", "f")
    env.setdefault("PYTHONUNBUFFERED", "1")  # the training log arrives as it is written (the ETA reads it)
    return env


@dataclass(frozen=True)
class Experiment:
    """The grid as checked: dataset, split, the plans' configuration, the resolved budget and every run's plan."""

    dataset: str
    raw: str
    file_ending: str
    split: dict[str, list[str]]
    split_record: dict[str, Any]
    planned: PlannedConfig
    budget: ResolvedBudget
    runs: list[RunPlan]
    summary: dict[str, Any]


def plan_experiment(args: argparse.Namespace, out: str, env: dict[str, str], specs: list, budget_name: str,
                    budget: BudgetSpec) -> Experiment:
    """Everything that can stop the grid, checked before preprocessing and training, all problems at once: the split,
    the configuration, every run's DP settings through the trainer's own checks on fold 0's N, earlier run folders.
    Plans the dataset (fingerprint and plans only) if it has no plans. Prints and writes OUT/budget.json."""
    name, raw = _dataset(str(args.d))
    with open(join(raw, "dataset.json")) as f:
        file_ending = json.load(f)["file_ending"]
    cases = [f[:-len(file_ending)] for f in os.listdir(join(raw, "labelsTr")) if f.endswith(file_ending)]
    problems, split = [], None
    try:
        split = split_cases(cases, test_fraction=args.test_fraction, seed=args.seed)
    except ExperimentError as error:
        problems.append(f"{error} A test, a validation and a training case at least: use a dataset with more cases.")
    record = {"seed": args.seed, "test_fraction": args.test_fraction, "val_fraction_of_rest": 0.2, **(split or {})}
    if split and isfile(join(out, "split.json")):
        with open(join(out, "split.json")) as f:
            if json.load(f) != record:
                problems.append(str(ExperimentError("-o", out, "a folder made with the same dataset, --seed and "
                                                    "--test-fraction", "Use a new output folder.")))
    if budget.features_per_stage is not None and args.c != "2d":
        problems.append(str(ExperimentError("-c", args.c, f"2d with --budget {args.budget} (its network is a narrowed "
                                            "2d one)", "Use --budget small or full for other configurations.")))
    if split is None:
        raise GridError(problems)
    try:
        planned = read_planned(ensure_plans(name, args.c, env, join(out, "preprocess_log.txt")), args.c)
    except ExperimentError as error:
        raise GridError([*problems, str(error)]) from error
    fold = Fold(len(split["train"]), len(split["val"]), len(split["test"]))
    resolved = resolve_for_dataset(budget_name, budget, planned, fold)
    runs, run_problems = plan_runs(specs, resolved, args.seed if args.reproducible else None, args.budget)
    problems += run_problems
    problems += [str(p) for r in runs if (p := settings_problem(join(out, "runs", r.spec.name), r.settings))]
    if problems:
        raise GridError(problems)
    summary = budget_summary(resolved, runs, name, args.c)
    with open(join(out, "budget.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(format_budget(summary) + f"\n  (saved: {join(out, 'budget.json')})", flush=True)
    return Experiment(name, raw, file_ending, split, record, planned, resolved, runs, summary)


def prepare(args: argparse.Namespace, out: str, env: dict[str, str], exp: Experiment) -> tuple[Context, dict]:
    """Preprocessing (if missing), the split record, the mirrored preprocessed folder and the test links."""
    source = ensure_preprocessed(exp.dataset, args.c, env, join(out, "preprocess_log.txt"))
    record_or_check(join(out, "split.json"), exp.split_record,
                    ExperimentError("-o", out, "a folder made with the same dataset, --seed and --test-fraction",
                                    "Use a new output folder."))
    preprocessed = join(out, "nnUNet_preprocessed")
    budget = exp.budget
    patch = budget.patch_size if budget.patch_size != budget.planned_patch_size else None
    mirror_preprocessed(source, join(preprocessed, exp.dataset), exp.split, budget.spec.features_per_stage, args.c,
                        patch)
    link_test_cases(exp.raw, exp.split["test"], exp.file_ending, join(out, "test_data", "imagesTs"),
                    join(out, "test_data", "labelsTs"))
    device = args.device or _default_device()
    ctx = Context(exp.dataset, args.c, out, preprocessed, join(out, "test_data", "imagesTs"),
                  join(out, "test_data", "labelsTs"), device, args.np, env, tuple(dict.fromkeys(args.refine)))
    header = {"dataset": exp.dataset, "configuration": args.c, "budget": exp.summary, "seed": args.seed,
              "reproducible": args.reproducible, "lrs": list(args.lrs),
              "split": {"num_test": len(exp.split["test"]), "num_train": len(exp.split["train"]),
                        "num_val": len(exp.split["val"])}, "device": device}
    return ctx, header


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        _check(args)
        specs = run_grid(args.rules, args.epsilons, args.lrs)
        budget_name, budget = resolve_budget(args.budget)  # before preprocessing: a bad file fails at once
        out = os.path.abspath(args.o or f"dp_experiment_{args.d}_{args.c}_{budget_name}")
        if os.path.exists(out) and not isdir(out):
            raise ExperimentError("-o", out, "a folder (new or from an earlier invocation); it is a file")
        os.makedirs(out, exist_ok=True)
        env = _environment()
        exp = plan_experiment(args, out, env, specs, budget_name, budget)
        if args.dry_run:
            print("--dry-run: the grid passed every check; nothing was preprocessed or trained.")
            return
        ctx, header = prepare(args, out, env, exp)
        header["command"] = "nnUNetv2_dp_experiment " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        results, failed = run_all(ctx, exp.runs, exp.budget.spec, inference_voxels(
            exp.planned, exp.budget.patch_size, exp.budget.fold.num_val + exp.budget.fold.num_test),
            exp.summary["voxels_per_step"])
        path = write_report(out, header, results)
    except (DPError, RuntimeError, subprocess.SubprocessError) as error:
        sys.exit(f"ERROR: {error}")
    print(f"\nResults: {path}")
    if failed:
        sys.exit(f"ERROR: {len(failed)} of {len(results)} runs failed ({', '.join(failed)}); results.md and results.csv "
                 "mark them and give each reason. Run the same command again to retry them (finished runs are "
                 "skipped).")


if __name__ == "__main__":
    main()
