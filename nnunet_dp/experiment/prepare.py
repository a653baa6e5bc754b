"""nnUNetv2_dp_experiment, before the runs: every check that can stop the grid (all problems at once, before any
preprocessing or training), the resolved budget (printed, OUT/budget.json), then the data every run reads.

Without --public-fraction the runs train on a mirror of the user's preprocessed dataset (its own splits_final.json and
the budget's plans). With it, on the private derived dataset with the public plans (data.py), each fine-tuning from
the public model (pretrain.py). With --pretrained FILE, on the mirror, each fine-tuning from FILE.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from dataclasses import dataclass
from os.path import join
from typing import Any

from nnunet_dp.experiment.budget import (
    Fold,
    GridError,
    PlannedConfig,
    ResolvedBudget,
    RunPlan,
    budget_summary,
    format_budget,
    plan_runs,
    read_planned,
    resolve_for_dataset,
)
from nnunet_dp.experiment.data import (
    PUBLIC_PLANS,
    PublicData,
    derived_datasets,
    disjoint_counts,
    ensure_plans,
    ensure_preprocessed,
    plan_public,
    prepare_public,
    public_mode,
    raw_cases,
    split_public,
    split_public_dataset,
)
from nnunet_dp.experiment.errors import ExperimentError
from nnunet_dp.experiment.plan import (
    BudgetSpec,
    RunSpec,
    dp_settings,
    link_test_cases,
    mirror_preprocessed,
    split_cases,
    subsample_training,
    write_budget_plans,
)
from nnunet_dp.experiment.pretrain import PublicPretraining, pretrained_problems
from nnunet_dp.experiment.run import Context, record_or_check, settings_problem
from nnunet_dp.tools.morph_selection import DEFAULT as DEFAULT_SELECTION
from nnunet_dp.tools.morph_selection import MorphSelection

IN_DISTRIBUTION = ("public part: an in-distribution split of the same dataset ({share} of the non-test cases), so the "
                   "pretraining is as close to the private data as public data can be")


@dataclass(frozen=True)
class Experiment:
    """The grid as checked: dataset, split (with the public part under --public-fraction), the plans' configuration,
    the resolved budget, every run's plan, where the runs start and the derived datasets (or None)."""

    dataset: str
    raw: str
    file_ending: str
    split: dict[str, list[str]]
    split_record: dict[str, Any]
    planned: PlannedConfig
    budget: ResolvedBudget
    runs: list[RunPlan]
    summary: dict[str, Any]
    data: PublicData | None = None


def _mismatch(out: str) -> ExperimentError:
    return ExperimentError("-o", out, "a folder made with the same dataset, --seed, --test-fraction, --public-fraction "
                           "and --pretrained file", "Use a new output folder.")


def _parts(args: argparse.Namespace, cases: list[str], problems: list[str]) -> dict[str, list[str]] | None:
    """The test / (public) / val / train parts; None (with the problem noted) when they cannot be made."""
    try:
        split = split_cases(cases, test_fraction=args.test_fraction, seed=args.seed,
                            val_fraction=args.val_fraction)
    except ExperimentError as error:
        problems.append(f"{error} A test, a validation and a training case at least: use a dataset with more cases.")
        return None
    if not public_mode(args):
        return subsample_training(split, args.train_cases, args.seed)
    try:
        if args.public_dataset is not None:
            name, raw = args.public_raw
            parts = split_public_dataset(split, raw_cases(raw), public_fraction=args.public_fraction, seed=args.seed,
                                         public_name=name, dataset=args.d)
        else:
            parts = split_public(split, public_fraction=args.public_fraction, seed=args.seed,
                                 val_fraction=args.val_fraction)
        parts = subsample_training(parts, args.train_cases, args.seed)
        print(disjoint_counts(parts), flush=True)
        return parts
    except ExperimentError as error:
        problems.append(str(error))
        return None


def _record(args: argparse.Namespace, parts: dict[str, list[str]]) -> dict[str, Any]:
    """split.json: what every run of the folder shares (keys of the new options only when they are used)."""
    record = {"seed": args.seed, "test_fraction": args.test_fraction, "val_fraction_of_rest": args.val_fraction}
    if args.train_cases is not None:
        record["train_cases"] = args.train_cases
    if args.public_fraction is not None:
        record["public_fraction"] = args.public_fraction
    if args.public_dataset is not None:
        record["public_dataset"] = args.public_raw[0]
    if args.pretrained is not None:
        from nnunet_dp.nnunet.finetune import sha256_of

        path = os.path.abspath(args.pretrained)
        record["pretrained"] = {"path": path, "sha256": sha256_of(path) if os.path.isfile(path) else None}
    return {**record, **parts}


def _start(args: argparse.Namespace, parts: dict[str, list[str]], record: dict[str, Any]) -> dict[str, Any]:
    if args.public_dataset is not None:
        return {"from": "public dataset", "public_dataset": args.public_raw[0], "public_fraction": args.public_fraction,
                "num_public_cases": len(parts["public"]), "public_epochs": args.public_epochs,
                "labels_match": _labels(args.public_raw[1]) == _labels(args.raw), "note": disjoint_counts(parts)}
    if args.public_fraction is not None:
        return {"from": "public part", "public_fraction": args.public_fraction, "num_public_cases":
                len(parts["public"]), "public_epochs": args.public_epochs,
                "note": IN_DISTRIBUTION.format(share=f"{args.public_fraction:g}")}
    if args.pretrained is not None:
        return {"from": "file", **record["pretrained"]}
    return {"from": "scratch"}


def _labels(raw: str) -> Any:
    with open(join(raw, "dataset.json")) as f:
        return json.load(f).get("labels")


def _public_settings(budget: ResolvedBudget, epochs: int | None = None) -> dict[str, Any]:
    """The public pretraining's budget JSON: the non-private reference's (same budget and network), with
    `num_epochs` = --public-epochs where given."""
    settings = dp_settings(RunSpec("nonprivate", None), budget.spec)
    return settings if epochs is None else {**settings, "num_epochs": int(epochs)}


def _pretrained_check(args: argparse.Namespace, raw: str, plans_file: str, budget: ResolvedBudget,
                      specs: list[RunSpec]) -> list[str]:
    """--pretrained FILE against the network the budget's plans build (the mirror's plans, made here in a temporary
    folder)."""
    with open(join(raw, "dataset.json")) as f:
        dataset_json = json.load(f)
    patch = budget.patch_size if budget.patch_size != budget.planned_patch_size else None
    with tempfile.TemporaryDirectory() as tmp:
        plans = join(tmp, "nnUNetPlans.json")
        write_budget_plans(plans_file, plans, args.c, budget.spec.features_per_stage, patch)
        network = "-".join(map(str, budget.features_per_stage))
        label = (f"{plans_file} as the budget '{budget.name}' trains them: patch {'x'.join(map(str, budget.patch_size))}"
                 f", network {network}")
        return pretrained_problems(os.path.abspath(args.pretrained), plans, dataset_json, args.c,
                                   nonprivate=any(s.epsilon is None for s in specs), plans_label=label)


def _plans(args: argparse.Namespace, out: str, env: dict[str, str], dataset: tuple[str, str],
           parts: dict[str, list[str]], file_ending: str) -> tuple[str, PublicData | None]:
    """The plans the budget resolves against (planned if missing): the dataset's, or under --public-fraction the
    public derived dataset's (made here, with the private one)."""
    name, raw = dataset
    log = join(out, "preprocess_log.txt")
    if not public_mode(args):
        return ensure_plans(name, args.c, env, log), None
    data = derived_datasets(out, name)
    public_raw = None if args.public_dataset is None else args.public_raw[1]
    return plan_public(data, name, raw, parts, file_ending, args.c, env, log, public_raw), data


def _announce(out: str, summary: dict[str, Any], args: argparse.Namespace, runs: list[RunPlan]) -> None:
    """budget.json and the printed budget (and a note when frozen parameters would keep random weights)."""
    with open(join(out, "budget.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(format_budget(summary) + f"\n  (saved: {join(out, 'budget.json')})", flush=True)
    frozen = sorted({r.spec.levers.trainable for r in runs} - {"all"})
    if frozen and not public_mode(args) and args.pretrained is None:
        print(f"  NOTE: --trainable {' '.join(frozen)} without --public-fraction or --pretrained: the frozen "
              "parameters keep their random initialisation (the DP trainer's log says so too).", flush=True)


def plan_experiment(args: argparse.Namespace, out: str, env: dict[str, str], specs: list[RunSpec], budget_name: str,
                    budget: BudgetSpec, dataset: tuple[str, str]) -> Experiment:
    """Everything that can stop the grid, checked before preprocessing and training, all problems at once: the split
    (and public part), the configuration, every run's DP settings through the trainer's own checks on fold 0's N
    (the private part's), earlier run folders, --pretrained. Plans the dataset (fingerprint and plans only; under
    --public-fraction the public dataset) if it has no plans. Prints and writes OUT/budget.json."""
    name, raw = dataset
    args.raw = raw
    with open(join(raw, "dataset.json")) as f:
        file_ending = json.load(f)["file_ending"]
    cases = [f[:-len(file_ending)] for f in os.listdir(join(raw, "labelsTr")) if f.endswith(file_ending)]
    problems: list[str] = []
    parts = _parts(args, cases, problems)
    record = _record(args, parts) if parts else {}
    if parts and os.path.isfile(join(out, "split.json")):
        with open(join(out, "split.json")) as f:
            if json.load(f) != record:
                problems.append(str(_mismatch(out)))
    if budget.features_per_stage is not None and args.c != "2d":
        problems.append(str(ExperimentError("-c", args.c, f"2d with --budget {args.budget} (its network is a narrowed "
                                            "2d one)", "Use --budget small or full for other configurations.")))
    if parts is None:
        raise GridError(problems)
    try:
        plans_file, data = _plans(args, out, env, dataset, parts, file_ending)
        planned = read_planned(plans_file, args.c)
    except ExperimentError as error:
        raise GridError([*problems, str(error)]) from error
    resolved = resolve_for_dataset(budget_name, budget, planned,
                                   Fold(len(parts["train"]), len(parts["val"]), len(parts["test"])))
    runs, run_problems = plan_runs(specs, resolved, args.seed if args.reproducible else None, args.budget)
    problems += run_problems
    problems += [str(p) for r in runs if (p := settings_problem(join(out, "runs", r.spec.name), r.settings))]
    if data is not None and (p := settings_problem(join(out, "public"), _public_settings(resolved,
                                                                                         args.public_epochs))):
        problems.append(str(p) + " (The public model of this folder: --public-epochs and the budget set its "
                        "num_epochs; another value needs another -o, or delete OUT/public to retrain it.)")
    if args.pretrained is not None:
        problems += _pretrained_check(args, raw, plans_file, resolved, specs)
    if problems:
        raise GridError(problems)
    summary = budget_summary(resolved, runs, name, args.c, _start(args, parts, record), args.seeds)
    _announce(out, summary, args, runs)
    return Experiment(name, raw, file_ending, parts, record, planned, resolved, runs, summary, data)


def prepare(args: argparse.Namespace, out: str, env: dict[str, str], exp: Experiment, device: str,
            selection: MorphSelection = DEFAULT_SELECTION) -> tuple[Context, dict[str, Any], PublicPretraining | None]:
    """Preprocessing (if missing), the split record, the runs' preprocessed folder (the mirror, or the private derived
    dataset), the test links and the public pretraining step (or None). `selection`: how DP-Morph is chosen."""
    budget = exp.budget
    patch = budget.patch_size if budget.patch_size != budget.planned_patch_size else None
    log = join(out, "preprocess_log.txt")
    if exp.data is None:
        source = ensure_preprocessed(exp.dataset, args.c, env, log)
    else:
        prepare_public(exp.data, exp.split, args.c, env, log, budget.spec.features_per_stage, patch)
    record_or_check(join(out, "split.json"), exp.split_record, _mismatch(out))
    if exp.data is None:
        dataset, preprocessed, plans, run_env = exp.dataset, join(out, "nnUNet_preprocessed"), "nnUNetPlans", env
        mirror_preprocessed(source, join(preprocessed, exp.dataset), exp.split, budget.spec.features_per_stage,
                            args.c, patch)
        pretraining, start = None, None if args.pretrained is None else os.path.abspath(args.pretrained)
    else:
        dataset, preprocessed, plans = exp.data.private, exp.data.preprocessed, PUBLIC_PLANS
        run_env = exp.data.env(env)
        pretraining = PublicPretraining(exp.data, args.c, device, _public_settings(budget, args.public_epochs), env)
        start = pretraining.checkpoint
    link_test_cases(exp.raw, exp.split["test"], exp.file_ending, join(out, "test_data", "imagesTs"),
                    join(out, "test_data", "labelsTs"))
    ctx = Context(dataset, args.c, out, preprocessed, join(out, "test_data", "imagesTs"),
                  join(out, "test_data", "labelsTs"), device, args.np, run_env, tuple(dict.fromkeys(args.refine)),
                  plans, start, selection)
    header = {"dataset": exp.dataset, "configuration": args.c, "budget": exp.summary, "seed": args.seed,
              "reproducible": args.reproducible, "lrs": list(args.lrs), "seeds": args.seeds,
              "start": exp.summary["start"], "dpmorph_selection": selection.record(),
              "split": {"num_test": len(exp.split["test"]), "num_train": len(exp.split["train"]),
                        "num_val": len(exp.split["val"])}, "device": device}
    return ctx, header, pretraining
