"""nnUNetv2_dp_experiment, the plan: budgets, learning rates, the run grid (rule × ε × lr × levers × repeats), the
held-out test split and the private copy of the preprocessed dataset that carries the experiment's own
splits_final.json and the budget's plans.

Pure functions except `mirror_preprocessed`, `write_budget_plans` and `link_test_cases` (file system).
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from nnunet_dp.experiment.errors import ExperimentError
from nnunet_dp.experiment.levers import DEFAULT_LEVERS, Levers

Budget = Literal["tiny", "small", "full"]
Rule = Literal["nonprivate", "flat", "autos", "nsgd", "psac"]
Refinement = Literal["none", "global", "adaptive"]
RULES: tuple[Rule, ...] = ("nonprivate", "flat", "autos", "nsgd", "psac")
REFINEMENTS: tuple[Refinement, ...] = ("none", "global", "adaptive")
TRAINERS: dict[Rule, str] = {"nonprivate": "nnUNetTrainerNonPrivateBudget", "flat": "nnUNetTrainerDP",
                             "autos": "nnUNetTrainerDP_AutoS", "nsgd": "nnUNetTrainerDP_NSGD",
                             "psac": "nnUNetTrainerDP_PSAC"}
# Learning rates (never tuned on the test cases):
# - DP rules: no `initial_lr` in their settings, so the DP trainers' own default rule decides (nnunet_dp.optim.default_lr:
#   from σ, C, qN and the planned steps, with momentum 0.9; docs/optimizer.md). With C = 1 every rule bounds a case's
#   contribution by the same C and adds the same noise σC, so one rule for the lr keeps the comparison about the
#   scaling rule. `--lrs LR ...` adds one run per lr for each (rule, ε) beside the default-rule run (initial_lr = LR,
#   momentum still the default); the report marks the lr with the best *validation* Dice, which is not private.
# - nonprivate: nnU-Net's own optimizer and its 0.01 for the GPU budgets. For `tiny`, 0.01 never left background in
#   400 steps (validation pseudo-Dice 0 at every epoch, Dataset902 fold 0 of the experiment split), while 0.1 did
#   within 75 steps: `tiny` uses 0.1 for the baseline.
NONPRIVATE_LR = 0.01


@dataclass(frozen=True)
class BudgetSpec:
    """The same budget for every run: epochs x iterations steps, batch (expected batch under DP).

    The optional fields adapt it to the dataset (nnunet_dp.experiment.budget; None: no adaptation):
    voxels_per_step caps the batch at voxels_per_step // patch voxels; max_patch_voxels shrinks a larger planned patch;
    max_sampling_rate caps the batch at floor(max_sampling_rate * N training cases)."""

    num_epochs: int
    num_iterations_per_epoch: int
    num_val_iterations_per_epoch: int
    batch_size: int
    save_every: int
    features_per_stage: tuple[int, ...] | None  # None: the plans' network; else a smaller one (CPU)
    nonprivate_lr: float = NONPRIVATE_LR
    voxels_per_step: int | None = None
    max_patch_voxels: int | None = None
    max_sampling_rate: float | None = None


# Expected batch at most a quarter of the training cases (q <= 0.25). At a fixed number of steps the noise per
# coordinate of the averaged update, sigma*C/(qN), hardly falls beyond q = 0.25 while the compute per step grows with q:
# RDP, delta 1e-5, 400 steps, N = 26: 0.510 at q = 0.25 against 0.491 at q = 1 (eps 8), 3.149 against 3.125 (eps 1);
# at q = 0.05 it is 0.741 (eps 8). Poisson subsampling also keeps its amplification only for q well below 1.
MAX_SAMPLING_RATE = 0.25
# tiny: the work per step of the published Dataset902 2d runs (batch 32 of its 56x40 patch), and a 2d patch of at most
# 64x64, so a step costs about the same on any 2d dataset (2 CPU cores: minutes per run).
TINY_VOXELS_PER_STEP = 32 * 56 * 40
TINY_MAX_PATCH_VOXELS = 64 * 64
# small, full (one GPU, the plans' network and patch): 64 patches of 256x256 per step. nnU-Net's own 2d step on 256x256
# at batch 49 peaked at 5.0 GB and the DP step at 6.0 GB (docs/performance.md, H100), so ~8 GB at 64 and ~12 GB for a
# Poisson batch 1.5x its mean. Not the plans' batch: nnU-Net caps that at 5% of the dataset's voxels (5 on 100 cases).
GPU_VOXELS_PER_STEP = 64 * 256 * 256

BUDGETS: dict[Budget, BudgetSpec] = {
    # 2 CPU cores: the full default grid (9 trainings) on Dataset902 2d in < 90 min, predictions included.
    "tiny": BudgetSpec(16, 25, 2, 32, 4, (8, 16, 32, 64), nonprivate_lr=0.1, voxels_per_step=TINY_VOXELS_PER_STEP,
                       max_patch_voxels=TINY_MAX_PATCH_VOXELS, max_sampling_rate=MAX_SAMPLING_RATE),
    # one GPU: ~10-20 min per run (5000 DP steps of 64 x 256x256 at ~0.15 s on an H100)
    "small": BudgetSpec(50, 100, 10, 64, 10, None, voxels_per_step=GPU_VOXELS_PER_STEP,
                        max_sampling_rate=MAX_SAMPLING_RATE),
    # one GPU: nnU-Net's 250 iterations per epoch, 100 epochs
    "full": BudgetSpec(100, 250, 50, 128, 10, None, voxels_per_step=GPU_VOXELS_PER_STEP,
                       max_sampling_rate=MAX_SAMPLING_RATE),
}


@dataclass(frozen=True)
class RunSpec:
    """One training: a rule at a target ε (None for the non-private reference) with a learning rate (None: the DP
    trainers' default rule, or the budget's lr for the reference), the fine-tuning levers (DP runs; the reference
    only `trainable`, through --reference-trainable) and, under --seeds K > 1, its repeat k in 1..K."""

    rule: Rule
    epsilon: float | None
    lr: float | None = None
    levers: Levers = DEFAULT_LEVERS
    repeat: int | None = None

    @property
    def cell(self) -> str:
        """The name shared by the repeats: rule, ε, lr, non-default levers ('flat_eps8_lr0.05_norm_bias_k4')."""
        base = self.rule if self.epsilon is None else f"{self.rule}_eps{self.epsilon:g}"
        return (base if self.lr is None else f"{base}_lr{self.lr:g}") + self.levers.suffix

    @property
    def name(self) -> str:
        """The run folder's name: the cell, and '_s1'..'_sK' only when --seeds K > 1."""
        return self.cell if self.repeat is None else f"{self.cell}_s{self.repeat}"

    @property
    def trainer(self) -> str:
        return TRAINERS[self.rule]


def check_lrs(lrs: Sequence[float], dp_rules: bool) -> list[float]:
    """--lrs: finite numbers > 0, distinct in run names (6 significant digits), for DP rules only. Deduplicated."""
    for lr in lrs:
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (np.isfinite(lr) and lr > 0):
            raise ExperimentError("--lrs", lr, "finite numbers > 0 (learning rates of extra DP runs beside the "
                                  "default rule)")
    unique = [float(lr) for lr in dict.fromkeys(lrs)]
    if len({f"{lr:g}" for lr in unique}) < len(unique):
        raise ExperimentError("--lrs", lrs, "values that differ in their first 6 significant digits (run names)")
    if unique and not dp_rules:
        raise ExperimentError("--lrs", lrs, "DP rules in --rules too (the non-private baseline keeps the budget's lr)")
    return unique


def run_grid(rules: list[str], epsilons: list[float], lrs: Sequence[float] = (),
             levers: Sequence[Levers] = (DEFAULT_LEVERS,), seeds: int = 1,
             reference_levers: Sequence[Levers] = (DEFAULT_LEVERS,)) -> list[RunSpec]:
    """The non-private reference first (if asked; once per `reference_levers`, levers.reference_grid), then each DP
    rule at each ε, in the given order: first with the default learning-rate rule, then once per lr of `lrs` (--lrs);
    within each, once per lever combination (levers.lever_grid). With seeds K > 1 every run is repeated K times
    (repeat k in 1..K, innermost)."""
    for rule in rules:
        if rule not in RULES:
            raise ExperimentError("--rules", rule, f"one of {list(RULES)}")
    for eps in epsilons:
        if not (np.isfinite(eps) and eps > 0):
            raise ExperimentError("--epsilons", eps, "finite numbers > 0")
    if not rules:
        raise ExperimentError("--rules", rules, "at least one rule")
    if any(r != "nonprivate" for r in rules) and not epsilons:
        raise ExperimentError("--epsilons", epsilons, "at least one ε for the DP rules")
    sweep = [None, *check_lrs(lrs, any(r != "nonprivate" for r in rules))]
    repeats = [None] if seeds == 1 else list(range(1, seeds + 1))
    specs = ([RunSpec("nonprivate", None, levers=lev, repeat=k) for lev in dict.fromkeys(reference_levers)
              for k in repeats] if "nonprivate" in rules else [])
    specs += [RunSpec(r, float(e), lr, lev, k)  # type: ignore[arg-type]
              for r in dict.fromkeys(rules) if r != "nonprivate" for e in dict.fromkeys(epsilons) for lr in sweep
              for lev in dict.fromkeys(levers) for k in repeats]
    return specs


def split_cases(cases: list[str], *, test_fraction: float, val_fraction: float = 0.2,
                seed: int = 0) -> dict[str, list[str]]:
    """Seeded, disjoint test / train / val split of case identifiers (independent of their input order)."""
    if not 0 < test_fraction < 1:
        raise ExperimentError("--test-fraction", test_fraction, "a number strictly between 0 and 1")
    ids = sorted(set(cases))
    if len(ids) < 4:
        raise ExperimentError("dataset", f"{len(ids)} cases", "at least 4 training cases (test, train, validation)")
    order = np.random.default_rng(seed).permutation(len(ids))
    n_test = min(max(1, round(test_fraction * len(ids))), len(ids) - 2)
    rest = order[n_test:]
    n_val = min(max(1, round(val_fraction * len(rest))), len(rest) - 1)
    pick = lambda idx: sorted(ids[i] for i in idx)
    return {"test": pick(order[:n_test]), "val": pick(rest[:n_val]), "train": pick(rest[n_val:])}


def subsample_training(parts: dict[str, list[str]], n: int | None, seed: int) -> dict[str, list[str]]:
    """--train-cases N: N of the training cases, seeded and nested (a fixed order of the training cases, its first N:
    the cases of a smaller N are among those of a larger one). Validation, test and public cases are unchanged."""
    if n is None:
        return parts
    train = sorted(parts["train"])
    if isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= len(train):
        raise ExperimentError("--train-cases", n, f"an integer in [2, {len(train)}] (fold 0 has {len(train)} training "
                              "cases)")
    order = np.random.default_rng([seed, 2]).permutation(len(train))
    return {**parts, "train": sorted(train[i] for i in order[:n])}


def dp_settings(spec: RunSpec, budget: BudgetSpec, seed: int | None = None) -> dict[str, Any]:
    """The nnUNet_dp_config JSON of a DP run, or the nnUNet_dp_experiment_budget JSON of the baseline.

    seed None (the default): no `seed` key, so the DP run draws its noise and Poisson sampling from fresh OS entropy.
    An integer only under --reproducible: the run can be repeated, and its noise regenerated, so it is not private
    (docs/invariants.md, invariant 8).
    Under --seeds K each repeat k gets seed + k - 1 (repeat 1, and a grid without --seeds, get `seed` itself).
    A DP run has `initial_lr` only when spec.lr is set (--lrs); without it the trainer's default rule decides
    (nnunet_dp.optim.default_lr). Momentum is never set here: the DP default (0.9) for every DP run. The levers'
    keys (trainable, augmentations_per_case, ema_decay) appear only with non-default values; the reference's budget
    JSON gets `trainable` the same way (--reference-trainable)."""
    common = {"num_epochs": budget.num_epochs, "num_iterations_per_epoch": budget.num_iterations_per_epoch,
              "num_val_iterations_per_epoch": budget.num_val_iterations_per_epoch, "save_every": budget.save_every}
    if spec.epsilon is None:
        return {**common, "initial_lr": budget.nonprivate_lr, "batch_size": budget.batch_size,
                **spec.levers.settings()}
    if spec.lr is not None:
        common["initial_lr"] = spec.lr
    seeded = {} if seed is None else {"seed": seed + (spec.repeat or 1) - 1}
    return {**common, "target_epsilon": spec.epsilon, "delta": 1e-5, "clip_norm": 1.0,
            "expected_batch_size": budget.batch_size, **spec.levers.settings(), **seeded}


def _link(src: str, dst: str) -> None:
    if os.path.lexists(dst):
        os.remove(dst)
    os.symlink(src, dst)


def mirror_preprocessed(source: str, target: str, split: dict[str, list[str]], features: tuple[int, ...] | None,
                        configuration: str, patch_size: Sequence[int] | None = None) -> None:
    """`target` = the preprocessed dataset folder `source` via symlinks, with its own splits_final.json (fold 0 =
    the experiment's train/val; the test cases are in neither) and its own nnUNetPlans.json (the network narrowed to
    `features`, the patch set to `patch_size` if given). Nothing in `source` is written."""
    os.makedirs(target, exist_ok=True)
    for name in os.listdir(source):
        if name not in ("splits_final.json", "nnUNetPlans.json"):
            _link(os.path.join(os.path.abspath(source), name), os.path.join(target, name))
    with open(os.path.join(target, "splits_final.json"), "w") as f:
        json.dump([{"train": split["train"], "val": split["val"]}], f, indent=1)
    write_budget_plans(os.path.join(source, "nnUNetPlans.json"), os.path.join(target, "nnUNetPlans.json"),
                       configuration, features, patch_size)


def write_budget_plans(source: str, target: str, configuration: str, features: Sequence[int] | None,
                       patch_size: Sequence[int] | None) -> None:
    """`target` = the plans file `source` as every run of the budget trains it: the patch set to `patch_size` and the
    2d network narrowed to `features` (demo.shrink_network), where given. `source` is only read; an unchanged
    `target` is not rewritten."""
    with open(source) as f:
        plans = json.load(f)
    if patch_size is not None:
        plans["configurations"][configuration]["patch_size"] = [int(p) for p in patch_size]
    if features is not None and configuration != "2d":
        raise ExperimentError("-c", configuration, "2d with --budget tiny (its CPU network is a smaller 2d one)",
                              "Use --budget small or full for other configurations.")
    tmp = target + ".tmp"
    with open(tmp, "w") as f:
        json.dump(plans, f, indent=2)
    if features is not None:
        from nnunet_dp.tools.demo import shrink_network

        shrink_network(tmp, list(features))
    if os.path.isfile(target) and _same_json(tmp, target):
        os.remove(tmp)  # unchanged: the file (and its modification time) stays
    else:
        os.replace(tmp, target)


def _same_json(a: str, b: str) -> bool:
    with open(a) as fa, open(b) as fb:
        try:
            return json.load(fa) == json.load(fb)
        except json.JSONDecodeError:
            return False


def link_test_cases(raw_dataset: str, test: list[str], file_ending: str, images: str, labels: str) -> None:
    """Symlink the test cases' images (all channels) and labels from imagesTr/labelsTr into two folders."""
    os.makedirs(images, exist_ok=True)
    os.makedirs(labels, exist_ok=True)
    files = os.listdir(os.path.join(raw_dataset, "imagesTr"))
    for case in test:
        channels = [f for f in files if f.startswith(case + "_") and f.endswith(file_ending)
                    and f[len(case) + 1:-len(file_ending)].isdigit()]
        label = os.path.join(raw_dataset, "labelsTr", case + file_ending)
        if not channels or not os.path.isfile(label):
            raise ExperimentError("-d", raw_dataset, f"imagesTr/{case}_XXXX{file_ending} and labelsTr/{case}"
                                  f"{file_ending} for every case", "Only nnU-Net's standard raw layout is supported.")
        for f in channels:
            _link(os.path.join(raw_dataset, "imagesTr", f), os.path.join(images, f))
        _link(label, os.path.join(labels, case + file_ending))


def resolve_budget(value: str) -> tuple[str, BudgetSpec]:
    """A named budget, or a JSON file with BudgetSpec's fields (e.g. a minimal one for smoke tests)."""
    if value in BUDGETS:
        return value, BUDGETS[value]  # type: ignore[index]
    if not value.endswith(".json"):
        raise ExperimentError("--budget", value, f"one of {list(BUDGETS)} or a .json file with the keys "
                              f"{list(BudgetSpec.__dataclass_fields__)}")
    try:
        with open(value) as f:
            fields = json.load(f)
        features = fields.get("features_per_stage")
        spec = BudgetSpec(**{**fields, "features_per_stage": tuple(features) if features else None})
    except (OSError, TypeError, ValueError, AttributeError) as error:
        raise ExperimentError("--budget", value, "a readable JSON file with the keys "
                              f"{list(BudgetSpec.__dataclass_fields__)}", str(error)) from error
    check_budget(spec, value)
    return os.path.splitext(os.path.basename(value))[0], spec


def check_budget(spec: BudgetSpec, source: str) -> None:
    """Every field of a budget file, before any preprocessing or training: integers where nnU-Net counts."""
    def bad(key: str, allowed: str) -> ExperimentError:
        return ExperimentError(f"--budget {source}: {key}", getattr(spec, key), allowed)

    def integer(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    for key in ("num_epochs", "num_iterations_per_epoch", "batch_size", "save_every"):
        if not integer(getattr(spec, key)) or getattr(spec, key) < 1:
            raise bad(key, "an integer >= 1")
    if not integer(spec.num_val_iterations_per_epoch) or spec.num_val_iterations_per_epoch < 0:
        raise bad("num_val_iterations_per_epoch", "an integer >= 0")
    lr = spec.nonprivate_lr
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (np.isfinite(lr) and lr > 0):
        raise bad("nonprivate_lr", "a finite number > 0")
    for key in ("voxels_per_step", "max_patch_voxels"):
        if getattr(spec, key) is not None and (not integer(getattr(spec, key)) or getattr(spec, key) < 1):
            raise bad(key, "null or an integer >= 1")
    rate = spec.max_sampling_rate
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1):
        raise bad("max_sampling_rate", "null or a number in (0, 1]")
    features = spec.features_per_stage
    # nnU-Net's deep-supervision weights drop the lowest output: with fewer than 3 stages they are 0/0, the loss NaN
    if features is not None and (len(features) < 3 or not all(integer(f) and f >= 1 for f in features)):
        raise bad("features_per_stage", "null or a list of at least 3 integers >= 1 (with fewer stages nnU-Net's "
                  "deep-supervision loss weights are 0/0 and every loss is NaN)")
