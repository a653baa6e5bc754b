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
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from os.path import isdir, isfile, join

from nnunet_dp.errors import DPError
from nnunet_dp.nnunet.experiment_plan import (
    BUDGETS,
    REFINEMENTS,
    RULES,
    BudgetSpec,
    ExperimentError,
    budget_record,
    dp_settings,
    link_test_cases,
    mirror_preprocessed,
    resolve_budget,
    run_grid,
    split_cases,
)
from nnunet_dp.nnunet.experiment_report import write_report
from nnunet_dp.nnunet.experiment_run import RESULT_JSON, Context, check_settings, execute, record_or_check


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


def ensure_preprocessed(name: str, configuration: str, env: dict[str, str], log: str) -> str:
    """The dataset's preprocessed folder; plans and/or preprocesses CONFIG with nnU-Net's commands if missing."""
    folder = join(env["nnUNet_preprocessed"], name)
    plans_file = join(folder, "nnUNetPlans.json")
    dataset_id = name[len("Dataset"):len("Dataset") + 3]
    if not isfile(plans_file):
        cmd = ["nnUNetv2_plan_and_preprocess", "-d", dataset_id, "-c", configuration, "-np", "2"]
    else:
        with open(plans_file) as f:
            configs = json.load(f)["configurations"]
        if configuration not in configs:
            raise ExperimentError("-c", configuration, f"a configuration of {plans_file}: {sorted(configs)}")
        data_id = configs[configuration].get("data_identifier", f"nnUNetPlans_{configuration}")
        if isdir(join(folder, data_id)) and os.listdir(join(folder, data_id)):
            return folder
        cmd = ["nnUNetv2_preprocess", "-d", dataset_id, "-c", configuration, "-np", "2"]
    print(f"Preprocessing: {' '.join(cmd)} (log: {log})", flush=True)
    from nnunet_dp.nnunet.demo import planning_env
    from nnunet_dp.nnunet.experiment_run import run_command

    run_command(cmd, planning_env(env), log)
    return folder


def _environment() -> dict[str, str]:
    from nnunet_dp.nnunet.cli import trainer_folder

    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ)
    env["nnUNet_extTrainer"] = os.pathsep.join(
        p for p in [trainer_folder(), join(here, "experiment_trainers"), env.get("nnUNet_extTrainer")] if p)
    env.setdefault("nnUNet_compile", "f")
    return env


def prepare(args: argparse.Namespace, out: str, env: dict[str, str], budget_name: str,
            budget: BudgetSpec) -> tuple[Context, dict]:
    """Dataset, preprocessing, split (reused if recorded), the mirrored preprocessed folder and the test links."""
    name, raw = _dataset(str(args.d))
    with open(join(raw, "dataset.json")) as f:
        file_ending = json.load(f)["file_ending"]
    cases = [f[:-len(file_ending)] for f in os.listdir(join(raw, "labelsTr")) if f.endswith(file_ending)]
    split = split_cases(cases, test_fraction=args.test_fraction, seed=args.seed)  # before minutes of preprocessing
    source = ensure_preprocessed(name, args.c, env, join(out, "preprocess_log.txt"))
    record = {"seed": args.seed, "test_fraction": args.test_fraction, "val_fraction_of_rest": 0.2, **split}
    record_or_check(join(out, "split.json"), record,
                    ExperimentError("-o", out, "a folder made with the same dataset, --seed and --test-fraction",
                                    "Use a new output folder."))
    preprocessed = join(out, "nnUNet_preprocessed")
    mirror_preprocessed(source, join(preprocessed, name), split, budget.features_per_stage, args.c)
    link_test_cases(raw, split["test"], file_ending, join(out, "test_data", "imagesTs"),
                    join(out, "test_data", "labelsTs"))
    device = args.device or _default_device()
    ctx = Context(name, args.c, out, preprocessed, join(out, "test_data", "imagesTs"),
                  join(out, "test_data", "labelsTs"), device, args.np, env, tuple(dict.fromkeys(args.refine)))
    header = {"dataset": name, "configuration": args.c, "budget": budget_record(budget_name, budget), "seed": args.seed,
              "reproducible": args.reproducible, "lrs": list(args.lrs),
              "split": {"num_test": len(split["test"]), "num_train": len(split["train"]), "num_val": len(split["val"])},
              "device": device}
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
        out = os.path.abspath(args.o or f"dp_experiment_{args.d}_{args.c}_{args.budget}")
        if os.path.exists(out) and not isdir(out):
            raise ExperimentError("-o", out, "a folder (new or from an earlier invocation); it is a file")
        os.makedirs(out, exist_ok=True)
        ctx, header = prepare(args, out, _environment(), budget_name, budget)
        header["command"] = "nnUNetv2_dp_experiment " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        results = run_all(ctx, specs, budget, args.seed if args.reproducible else None)
        path = write_report(out, header, results)
    except (DPError, RuntimeError, subprocess.SubprocessError) as error:
        sys.exit(f"ERROR: {error}")
    print(f"\nResults: {path}")


def run_all(ctx: Context, specs: list, budget: BudgetSpec, dp_seed: int | None) -> list[dict]:
    """Every run in order (finished ones read back). dp_seed: None = private randomness; an int only under
    --reproducible."""
    settings = {spec.name: dp_settings(spec, budget, dp_seed) for spec in specs}
    for spec in specs:  # all before the first training; finished runs too: they are reported under these options
        check_settings(join(ctx.out, "runs", spec.name), settings[spec.name])
    t0, results = time.time(), []
    for i, spec in enumerate(specs, 1):
        run_dir = join(ctx.out, "runs", spec.name)
        done = join(run_dir, RESULT_JSON)
        elapsed = f"{(time.time() - t0) / 60:.1f} min elapsed"
        if isfile(done):
            print(f"[{i}/{len(specs)}] {spec.name}: finished earlier, skipped ({done})", flush=True)
            with open(done) as f:
                results.append(json.load(f))
            continue
        print(f"[{i}/{len(specs)}] {spec.name}: {spec.trainer}, training + test predictions ({elapsed}; "
              f"log: {join(run_dir, 'log.txt')})", flush=True)
        result = execute(ctx, run_dir, spec, settings[spec.name])
        mean = {k: round(v["dice_mean"], 4) for k, v in result["scores"].items()}
        print(f"[{i}/{len(specs)}] {spec.name}: done in {result['seconds'] / 60:.1f} min; mean test Dice {mean}",
              flush=True)
        results.append(result)
    return results


if __name__ == "__main__":
    main()
