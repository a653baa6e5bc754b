"""nnUNetv2_dp_experiment, the budget on this dataset: the named budget adapted to the fold and the plans' patch, and
every run's settings checked with the trainers' own code (DPConfig, make_plan) before anything is trained.

Adaptation (BudgetSpec's optional fields; a budget file without them is used as written):
- patch: a planned patch larger than max_patch_voxels (tiny: 64x64 = 4096) shrinks, its largest axis first, in steps of
  the network's total stride on that axis; small and full keep nnU-Net's patch and network.
- (expected) batch B = min(batch_size, voxels_per_step // patch voxels, floor(max_sampling_rate * N)), at least 1,
  where N is the number of training cases of fold 0 (tiny: 32 * 56 * 40 voxels, small and full: 64 * 256 * 256;
  max_sampling_rate 0.25 for all three: plan.py says why).
- steps: num_epochs x num_iterations_per_epoch, whatever the dataset.
So tiny keeps Dataset902 2d as published (patch 56x40, 32 x 2240 voxels per step: batch 32, N = 166 allows 41), gives a
256x256 dataset a 64x64 patch and batch 17, and a 26-case fold batch 6 (q = 0.23); small gives 256x256 patches
batch 64 (if N >= 256).
"""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nnunet_dp.config import DPConfig
from nnunet_dp.errors import DPConfigError, DPError
from nnunet_dp.experiment.plan import BudgetSpec, ExperimentError, RunSpec, dp_settings
from nnunet_dp.optim import default_lr
from nnunet_dp.run import DPPlan, make_plan


@dataclass(frozen=True)
class Fold:
    """Case counts of the experiment's split: fold 0's training cases (N), its validation cases and the test cases."""

    num_train: int
    num_val: int
    num_test: int


@dataclass(frozen=True)
class PlannedConfig:
    """What nnU-Net's plans say about one configuration."""

    patch_size: tuple[int, ...]
    batch_size: int
    strides: tuple[tuple[int, ...], ...]  # per stage, per axis
    features_per_stage: tuple[int, ...]
    median_shape: tuple[float, ...]  # median image size in the configuration's axes
    slices_per_case: float  # 2d configuration of 3D images: median number of slices; else 1


def _configuration(plans: dict[str, Any], name: str) -> dict[str, Any]:
    conf = plans["configurations"][name]
    parent = conf.get("inherits_from")
    return {**_configuration(plans, parent), **conf} if parent else conf


def read_planned(plans_file: str, configuration: str) -> PlannedConfig:
    """The configuration's patch, batch, strides and widths from nnUNetPlans.json (`-c` must be one of its keys)."""
    with open(plans_file) as f:
        plans = json.load(f)
    if configuration not in plans["configurations"]:
        raise ExperimentError("-c", configuration, f"a configuration of {plans_file}: {sorted(plans['configurations'])}")
    conf = _configuration(plans, configuration)
    arch = conf["architecture"]["arch_kwargs"]
    strides = tuple(tuple(int(s) for s in (st if isinstance(st, (list, tuple)) else [st] * len(conf["patch_size"])))
                    for st in arch["strides"])
    median = tuple(float(m) for m in conf.get("median_image_size_in_voxels", conf["patch_size"]))
    slices = 1.0
    full = plans["configurations"].get("3d_fullres")
    if len(median) == 2 and full and len(full.get("median_image_size_in_voxels", [])) == 3:
        slices = float(full["median_image_size_in_voxels"][0])
    return PlannedConfig(tuple(int(p) for p in conf["patch_size"]), int(conf["batch_size"]), strides,
                         tuple(int(f) for f in arch["features_per_stage"]), median, slices)


def cap_patch(patch: Sequence[int], divisors: Sequence[int], max_voxels: int) -> tuple[int, ...]:
    """Shrink the largest axis (the first of equals) by its divisor until the patch has at most max_voxels voxels or
    no axis can shrink (each stays a positive multiple of its divisor: the network's total stride)."""
    p = [int(x) for x in patch]
    while math.prod(p) > max_voxels:
        shrinkable = [i for i in range(len(p)) if p[i] - divisors[i] >= divisors[i]]
        if not shrinkable:
            break
        i = max(shrinkable, key=lambda k: (p[k], -k))
        p[i] -= divisors[i]
    return tuple(p)


@dataclass(frozen=True)
class ResolvedBudget:
    """A budget made concrete for one dataset: `spec.batch_size` is the (expected) batch every run uses."""

    name: str
    spec: BudgetSpec
    requested_batch: int
    batch_limits: dict[str, int]  # every limit that applied (its value), the budget's own batch_size included
    patch_size: tuple[int, ...]
    planned_patch_size: tuple[int, ...]
    features_per_stage: tuple[int, ...]
    fold: Fold

    @property
    def steps(self) -> int:
        return self.spec.num_epochs * self.spec.num_iterations_per_epoch

    @property
    def patch_voxels(self) -> int:
        return math.prod(self.patch_size)


def resolve_for_dataset(name: str, spec: BudgetSpec, planned: PlannedConfig, fold: Fold) -> ResolvedBudget:
    """The patch and the batch of `spec` on this dataset (rules in the module docstring). Pure."""
    stages = len(planned.strides) if spec.features_per_stage is None else min(len(spec.features_per_stage),
                                                                               len(planned.strides))
    divisors = [math.prod(s[axis] for s in planned.strides[:stages]) for axis in range(len(planned.patch_size))]
    patch = planned.patch_size if spec.max_patch_voxels is None else cap_patch(planned.patch_size, divisors,
                                                                                spec.max_patch_voxels)
    limits = {"batch_size": spec.batch_size}
    if spec.voxels_per_step is not None:
        limits["voxels_per_step"] = max(1, spec.voxels_per_step // math.prod(patch))
    if spec.max_sampling_rate is not None:
        limits["max_sampling_rate"] = max(1, math.floor(spec.max_sampling_rate * fold.num_train))
    features = spec.features_per_stage or planned.features_per_stage
    return ResolvedBudget(name, dataclasses.replace(spec, batch_size=min(limits.values())), spec.batch_size, limits,
                          tuple(patch), planned.patch_size, tuple(features[:stages]), fold)


class GridError(DPError):
    """Problems found before the first training: every one, each with its fix."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  {i}. {p}" for i, p in enumerate(problems, 1))
        super().__init__(f"the experiment was checked before any training and cannot run ({len(problems)} "
                         f"problem{'s' if len(problems) > 1 else ''}; nothing was trained):\n{lines}")


@dataclass(frozen=True)
class RunPlan:
    """One run as it will train: its settings file and, for DP runs, the trainer's plan and learning rate."""

    spec: RunSpec
    settings: dict[str, Any]
    plan: DPPlan | None
    lr: float
    lr_source: str


_SEED_FIX = "Under --reproducible repeat k of --seeds K uses --seed + k - 1: choose a smaller --seed."
_OPTIONS = {"seed": ("--seed", _SEED_FIX),
            "trainable": ("--trainable", "Use values the DP trainers accept."),
            "augmentations_per_case": ("--augmentations-per-case", "Use values the DP trainers accept."),
            "ema_decay": ("--ema-decay", "Use values the DP trainers accept.")}


def _problem(error: DPConfigError, runs: list[str], budget: ResolvedBudget, source: str) -> str:
    """One failed check as option, value, what is allowed, the fix, and the trainer's own message."""
    n, steps = budget.fold.num_train, budget.steps
    where = f"the runs {', '.join(runs)}" if len(runs) > 1 else f"the run {runs[0]}"
    if error.key in ("expected_batch_size", "sampling_rate"):
        problem = ExperimentError(f"--budget {source}: batch_size", error.value, f"at most N = {n} training cases "
                                  f"(fold 0) for {where}, so that q = batch / N <= 1",
                                  f"Set batch_size <= {n} in {source} ({max(1, n // 4)} keeps q <= 0.25 as the named "
                                  'budgets do), or add "max_sampling_rate": 0.25 to it to cap the batch to the fold, '
                                  "or use a named budget, or keep more training cases (a smaller --test-fraction or "
                                  "--public-fraction).")
    elif error.key == "target_epsilon":
        problem = ExperimentError("--epsilons", error.value, f"an epsilon the accountant reaches with sigma <= 1e6 in "
                                  f"{steps} steps at q = {budget.spec.batch_size / n:.4g} ({where})",
                                  f"Raise it, or plan fewer steps (num_epochs x num_iterations_per_epoch of {source}).")
    elif error.key == "delta":
        problem = ExperimentError("delta", error.value, f"delta < 1/N with N = {n} ({where})",
                                  "The experiment uses delta 1e-5: it needs fewer than 100000 training cases.")
    elif error.key in _OPTIONS:
        problem = ExperimentError(_OPTIONS[error.key][0], error.value, f"{error.allowed} ({where})",
                                  _OPTIONS[error.key][1])
    elif error.key == "num_training_cases":
        problem = ExperimentError("--test-fraction", n, "a split that leaves fold 0 at least one training case",
                                  "Add cases or lower --test-fraction.")
    else:
        problem = ExperimentError(f"DP setting {error.key}", error.value, f"a value the DP trainer accepts ({where})",
                                  f"Change the budget {source}.")
    return f"{problem} (The DP trainer would stop with: {error})"


def _make_plan(cfg: DPConfig, spec: RunSpec, budget: ResolvedBudget) -> DPPlan | DPConfigError:
    """The trainer's make_plan on fold 0's N (its error, if it refuses). opacus' note that a larger RDP order would
    tighten the bound (large sigma) is not shown: the bound holds, and the trainer logs it again."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        try:
            return make_plan(cfg, rule=spec.rule, num_training_cases=budget.fold.num_train,  # type: ignore[arg-type]
                             plans_batch_size=budget.spec.batch_size)
        except DPConfigError as error:
            return error


# settings that make_plan does not read (sigma, q and the step count do not depend on them)
_NOT_IN_PLAN = ("initial_lr", "seed", "trainable", "augmentations_per_case", "ema_decay")


def plan_runs(specs: Sequence[RunSpec], budget: ResolvedBudget, seed: int | None,
              source: str) -> tuple[list[RunPlan], list[str]]:
    """Every run's settings through the trainer's own checks (DPConfig, then make_plan with fold 0's N). Returns the
    plans of the runs that pass and one problem per distinct failure (naming all its runs) with its fix."""
    plans: list[RunPlan] = []
    failures: dict[str, tuple[DPConfigError, list[str]]] = {}
    cache: dict[str, DPPlan | DPConfigError] = {}
    for spec in specs:
        settings = dp_settings(spec, budget.spec, seed)
        if spec.epsilon is None:
            plans.append(RunPlan(spec, settings, None, float(settings["initial_lr"]), "budget"))
            continue
        key = json.dumps({k: v for k, v in settings.items() if k not in _NOT_IN_PLAN}, sort_keys=True)
        try:
            cfg = DPConfig.from_mapping(settings, source=f"the settings of run {spec.name}")
            if key not in cache:  # sigma depends on the settings, not on the rule or the lr
                cache[key] = _make_plan(cfg, spec, budget)
            plan = cache[key]
            if isinstance(plan, DPConfigError):
                raise plan
        except DPConfigError as error:
            failures.setdefault(str(error), (error, []))[1].append(spec.name)
            continue
        lr = default_lr(noise_multiplier=plan.noise_multiplier, clip_norm=plan.clip_norm,
                        expected_batch_size=plan.expected_batch_size, steps=plan.planned_steps, momentum=cfg.momentum)
        plans.append(RunPlan(spec, settings, plan, cfg.initial_lr if cfg.initial_lr is not None else lr,
                             "--lrs" if cfg.initial_lr is not None else "default rule"))
    return plans, [_problem(error, runs, budget, source) for error, runs in failures.values()]


def inference_voxels(planned: PlannedConfig, patch: Sequence[int], num_cases: int) -> float:
    """Voxels that nnU-Net's sliding window (step 0.5) feeds the network to predict `num_cases` median cases, with its
    default mirroring (every window 2^dims times: each subset of the patch axes flipped)."""
    windows = math.prod(1 if s <= p else math.ceil((s - p) / (0.5 * p)) + 1 for s, p in zip(planned.median_shape, patch))
    return num_cases * planned.slices_per_case * windows * math.prod(patch) * 2 ** len(patch)


def budget_summary(budget: ResolvedBudget, runs: Sequence[RunPlan], dataset: str, configuration: str,
                   start: dict[str, Any] | None = None, seeds: int = 1) -> dict[str, Any]:
    """budget.json: the resolved budget, where the runs start (`start`: from scratch, the public part or a file), the
    repeats (--seeds) and, per run, the privacy parameters, levers and learning rate it will train with."""
    return {"start": start or {"from": "scratch"}, "seeds": seeds, **_summary(budget, runs, dataset, configuration)}


def _summary(budget: ResolvedBudget, runs: Sequence[RunPlan], dataset: str, configuration: str) -> dict[str, Any]:
    spec = budget.spec
    return {
        "name": budget.name, "dataset": dataset, "configuration": configuration,
        "num_training_cases": budget.fold.num_train, "num_validation_cases": budget.fold.num_val,
        "num_test_cases": budget.fold.num_test, "batch_size": spec.batch_size, "requested_batch_size":
            budget.requested_batch, "batch_limits": budget.batch_limits,
        "sampling_rate": spec.batch_size / budget.fold.num_train, "num_epochs": spec.num_epochs,
        "num_iterations_per_epoch": spec.num_iterations_per_epoch, "steps": budget.steps,
        "num_val_iterations_per_epoch": spec.num_val_iterations_per_epoch, "patch_size": list(budget.patch_size),
        "planned_patch_size": list(budget.planned_patch_size), "voxels_per_step": spec.batch_size * budget.patch_voxels,
        "features_per_stage": list(budget.features_per_stage),
        "network": "narrowed by the budget" if spec.features_per_stage else "the plans' network",
        "spec": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(spec).items()},
        "runs": [{"run": r.spec.name, "rule": r.spec.rule, "target_epsilon": r.spec.epsilon,
                  "noise_multiplier": r.plan.noise_multiplier if r.plan else None,
                  "sampling_rate": r.plan.sampling_rate if r.plan else None,
                  "expected_batch_size": r.plan.expected_batch_size if r.plan else spec.batch_size,
                  "delta": r.plan.delta if r.plan else None, "steps": budget.steps, "initial_lr": r.lr,
                  "lr_source": r.lr_source, "cell": r.spec.cell, "repeat": r.spec.repeat,
                  "trainable": r.spec.levers.trainable, "augmentations_per_case": r.spec.levers.augmentations_per_case,
                  "ema_decay": r.spec.levers.ema_decay} for r in runs],
        "note": "The budget depends on N and the plans' patch, both computed from the data (privacy.json lists N "
                "and the plans among its assumptions).",
    }


def format_budget(summary: dict[str, Any]) -> str:
    """The resolved budget as printed before the first run."""
    patch = "x".join(map(str, summary["patch_size"]))
    planned = "x".join(map(str, summary["planned_patch_size"]))
    limits = ", ".join(f"{k} -> {v}" for k, v in summary["batch_limits"].items())
    width = max([24, *(len(r["run"]) for r in summary["runs"])])
    lines = [(f"Budget '{summary['name']}' on {summary['dataset']} {summary['configuration']}: N = "
              f"{summary['num_training_cases']} training cases (fold 0), {summary['num_validation_cases']} validation,"
              f" {summary['num_test_cases']} test"),
             f"  patch {patch}" + (f" (planned {planned})" if patch != planned else " (as planned)") +
             f", network {'-'.join(map(str, summary['features_per_stage']))} ({summary['network']})",
             (f"  batch {summary['batch_size']} (expected batch under DP; min of {limits}), q = "
              f"{summary['sampling_rate']:.4g}, {summary['num_epochs']} epochs x "
              f"{summary['num_iterations_per_epoch']} steps = {summary['steps']} steps, {summary['voxels_per_step']} "
              "voxels per step"),
             *start_lines(summary),
             f"  {'run':<{width}} {'eps':>6} {'sigma':>9} {'q':>8} {'lr':>9}"]
    finetuning = (summary.get("start") or {"from": "scratch"})["from"] != "scratch"
    for r in summary["runs"]:
        eps = "-" if r["target_epsilon"] is None else f"{r['target_epsilon']:g}"
        sigma = "-" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.4g}"
        q = "-" if r["sampling_rate"] is None else f"{r['sampling_rate']:.4g}"
        source = r["lr_source"]
        if finetuning and source == "default rule":  # the trainer lowers it from the public weights it loads
            source = "at most: the fine-tuning rule sets it from the public weights, nnunet_dp.optim.finetune_lr"
        lines.append(f"  {r['run']:<{width}} {eps:>6} {sigma:>9} {q:>8} {r['initial_lr']:>9.4g} ({source})")
    return "\n".join(lines)


def start_lines(summary: dict[str, Any]) -> list[str]:
    """Where the runs start and how often each is repeated (format_budget)."""
    start, seeds = summary.get("start") or {"from": "scratch"}, summary.get("seeds", 1)
    lines = []
    if start["from"] == "public part":
        length = ("same budget" if start.get("public_epochs") is None else
                  f"{start['public_epochs']} epochs of {summary['num_iterations_per_epoch']} steps (--public-epochs)")
        lines.append(f"  start: every run fine-tunes from a public model trained once (ordinary nnU-Net, {length} "
                     f"and network) on {start['num_public_cases']} public cases = --public-fraction "
                     f"{start['public_fraction']:g} of the non-test cases (an in-distribution split of the same "
                     "dataset); the public pretraining runs first; the ETA is measured on the first DP run after it")
    elif start["from"] == "public dataset":
        labels = "the same labels" if start.get("labels_match") else "other labels (the segmentation heads start random)"
        lines.append(f"  start: every run fine-tunes from a public model trained once (ordinary nnU-Net, same budget "
                     f"and network) on {start['public_dataset']}, {labels}; {start['note']}")
    elif start["from"] == "file":
        lines.append(f"  start: every run fine-tunes from {start['path']} (sha256 {start['sha256'][:12]}...)")
    if seeds > 1:
        lines.append(f"  --seeds {seeds}: every run repeated {seeds} times (run names end in _s1.._s{seeds})")
    return lines
