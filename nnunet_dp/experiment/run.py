"""nnUNetv2_dp_experiment, one run: train (or resume), predict the test cases, choose DP-Morph on the validation
predictions only (privately by default: dpmorph.py), apply it to the test predictions, score on test with nnU-Net's
evaluation, write result.json.

Every step runs nnU-Net's own commands or functions; each is skipped when its output exists, except DP-Morph and the
scoring, which are made again whenever execute runs (grid.py runs a finished run again only when its DP-Morph choice
was made with another selection).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from os.path import isdir, isfile, join
from typing import Any

from nnunet_dp.experiment.dpmorph import evaluate, refine_all, validation_dice
from nnunet_dp.experiment.plan import ExperimentError, RunSpec
from nnunet_dp.experiment.progress import last_error
from nnunet_dp.locations import trainer_hint
from nnunet_dp.tools.demo import console_script
from nnunet_dp.tools.morph_selection import DEFAULT as DEFAULT_SELECTION
from nnunet_dp.tools.morph_selection import MorphSelection

RESULT_JSON = "result.json"
SETTINGS_JSON = "settings.json"  # the nnUNet_dp_config (or baseline budget) file of a run: never a seed by default


@dataclass(frozen=True)
class Context:
    """What every run shares: dataset, configuration, folders, device, processes and the environment."""

    dataset: str  # DatasetXXX_Name
    configuration: str
    out: str
    preprocessed: str  # the experiment's nnUNet_preprocessed (mirror)
    test_images: str
    test_labels: str
    device: str
    num_processes: int
    env: dict[str, str]
    refinements: tuple[str, ...]
    plans: str = "nnUNetPlans"  # nnUNetv2_train/predict -p (the moved public plans under --public-fraction)
    pretrained: str | None = None  # -pretrained_weights of every run's fresh start (--public-fraction, --pretrained)
    selection: MorphSelection = DEFAULT_SELECTION  # how DP-Morph is chosen (--dpmorph-selection, --epsilon-select)

    @property
    def gt_segmentations(self) -> str:
        return join(self.preprocessed, self.dataset, "gt_segmentations")


class CommandError(RuntimeError):
    """An nnU-Net command failed: `reason` is the last exception of its output (progress.last_error)."""

    def __init__(self, cmd: list[str], returncode: int, log: str, reason: str) -> None:
        self.cmd, self.returncode, self.log, self.reason = cmd, returncode, log, reason
        super().__init__(f"{cmd[0]} failed (exit code {returncode}): {reason}\n(command: {' '.join(cmd)}; "
                         f"full output: {log})")

    def __reduce__(self) -> tuple:
        return type(self), (self.cmd, self.returncode, self.log, self.reason)


def _follow(proc: subprocess.Popen, log: str, offset: int, watch: Callable[[str], None] | None,
            poll_seconds: float) -> None:
    """Wait for `proc`, passing the text it appends to `log` (from `offset`) to `watch` every poll_seconds."""
    while True:
        try:
            proc.wait(timeout=poll_seconds)
            done = True
        except subprocess.TimeoutExpired:
            done = False
        if watch is not None:
            with open(log, "rb") as r:
                r.seek(offset)
                new = r.read()
            offset += len(new)
            if new:
                watch(new.decode("utf-8", errors="replace"))
        if done:
            return


def run_command(cmd: list[str], env: dict[str, str], log: str, watch: Callable[[str], None] | None = None,
                poll_seconds: float = 1.0) -> None:
    """Run an nnU-Net command, appending its output to `log` (and passing the new text to `watch` as it comes); on
    failure raise CommandError with the last exception of its output."""
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        start = f.tell()
        proc = subprocess.Popen([console_script(cmd[0]), *cmd[1:]], env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            _follow(proc, log, start, watch, poll_seconds)
        except BaseException:  # Ctrl-C or a failing watcher: never leave the command running (as subprocess.run)
            proc.kill()
            proc.wait()
            raise
    if proc.returncode != 0:
        with open(log, "rb") as r:
            r.seek(start)
            output = r.read().decode("utf-8", errors="replace")
        reason = last_error(output) + trainer_hint(output)
        if proc.returncode < 0:  # no traceback: the process was killed (the kernel's OOM killer sends SIGKILL)
            name = signal.Signals(-proc.returncode).name if -proc.returncode in signal.valid_signals() else "?"
            reason = (f"killed by signal {-proc.returncode} ({name}; SIGKILL often means out of memory). Its last "
                      f"output:\n{reason}")
        raise CommandError(cmd, proc.returncode, log, reason)


def model_folder(ctx: Context, run_dir: str, spec: RunSpec) -> str:
    return join(run_dir, "nnUNet_results", ctx.dataset, f"{spec.trainer}__{ctx.plans}__{ctx.configuration}")


def _plans_option(ctx: Context) -> list[str]:
    return [] if ctx.plans == "nnUNetPlans" else ["-p", ctx.plans]


def run_env(ctx: Context, run_dir: str, spec: RunSpec) -> dict[str, str]:
    env = {**ctx.env, "nnUNet_results": join(run_dir, "nnUNet_results"), "nnUNet_preprocessed": ctx.preprocessed}
    key = "nnUNet_dp_experiment_budget" if spec.epsilon is None else "nnUNet_dp_config"
    env[key] = join(run_dir, SETTINGS_JSON)
    return env


def train(ctx: Context, run_dir: str, spec: RunSpec, watch: Callable[[str], None] | None = None) -> float:
    """nnUNetv2_train fold 0 (with --c if a checkpoint exists, --val if only validation is missing; a fresh start
    fine-tunes from ctx.pretrained with -pretrained_weights, which nnU-Net allows only there). Seconds spent."""
    fold = join(model_folder(ctx, run_dir, spec), "fold_0")
    if isfile(join(fold, "validation", "summary.json")):
        return _add_train_seconds(run_dir, 0.0)
    cmd = ["nnUNetv2_train", ctx.dataset, ctx.configuration, "0", "-tr", spec.trainer, "-device", ctx.device,
           *_plans_option(ctx)]
    if isfile(join(fold, "checkpoint_final.pth")):
        cmd.append("--val")
    elif isfile(join(fold, "checkpoint_latest.pth")):
        cmd.append("--c")
    elif ctx.pretrained is not None:
        cmd += ["-pretrained_weights", ctx.pretrained]
    t0 = time.time()
    try:
        run_command(cmd, run_env(ctx, run_dir, spec), join(run_dir, "log.txt"), watch)
    finally:  # wall time summed over interrupted and resumed attempts
        _add_train_seconds(run_dir, time.time() - t0)
    return _add_train_seconds(run_dir, 0.0)


def _add_train_seconds(run_dir: str, seconds: float) -> float:
    path = join(run_dir, "train_seconds.txt")
    total = 0.0
    if isfile(path):
        with open(path) as f:
            total = float(f.read())
    with open(path, "w") as f:
        f.write(str(total + seconds))
    return total + seconds


def predicted(images: str, out: str) -> bool:
    """Whether `out` holds a prediction for every case of `images` (its .json files are not predictions)."""
    n_images = len({f.rsplit("_", 1)[0] for f in os.listdir(images)})
    return isdir(out) and len([f for f in os.listdir(out) if not f.endswith(".json")]) >= n_images


def predict_test(ctx: Context, run_dir: str, spec: RunSpec) -> str:
    """nnUNetv2_predict on the test images (nnU-Net's defaults: mirroring TTA, checkpoint_final)."""
    out = join(run_dir, "test", "none")
    if predicted(ctx.test_images, out):
        return out
    run_command(["nnUNetv2_predict", "-i", ctx.test_images, "-o", out, "-d", ctx.dataset, "-c", ctx.configuration,
                 "-f", "0", "-tr", spec.trainer, "-device", ctx.device, "-npp", "1", "-nps", "1", *_plans_option(ctx)],
                run_env(ctx, run_dir, spec), join(run_dir, "log.txt"))
    return out


def privacy_summary(fold: str) -> dict[str, Any]:
    path = join(fold, "privacy.json")
    if not isfile(path):
        return {"epsilon": None, "delta": None, "noise_multiplier": None, "steps": None, "status": "non-private"}
    with open(path) as f:
        rep = json.load(f)
    return {**{k: rep.get(k) for k in ("epsilon", "delta", "noise_multiplier", "steps", "sampling_rate",
                                       "expected_batch_size", "num_training_cases", "status", "clip_norm",
                                       "planned_steps", "num_trained_parameters", "pretrained_weights")},
            "noise_dimensions": (rep.get("noise") or {}).get("num_trained_parameters"),
            "lr_used": rep.get("initial_lr"), "lr_rule": rep.get("lr_rule")}


def spec_fields(spec: RunSpec) -> dict[str, Any]:
    """What result.json says about the run's place in the grid: its cell (the name shared by its repeats), repeat
    and levers."""
    return {"cell": spec.cell, "repeat": spec.repeat, "trainable": spec.levers.trainable,
            "augmentations_per_case": spec.levers.augmentations_per_case, "ema_decay": spec.levers.ema_decay,
            "levers": spec.levers.label}


def record_or_check(path: str, record: dict[str, Any], mismatch: ExperimentError) -> None:
    """Write `record` to `path`; if the file exists with another content (an earlier invocation), raise `mismatch`."""
    if isfile(path):
        with open(path) as f:
            if json.load(f) != record:
                raise mismatch
    with open(path, "w") as f:
        json.dump(record, f, indent=2)


def settings_problem(run_dir: str, settings: dict[str, Any]) -> ExperimentError | None:
    """None if run_dir has no settings.json or the same settings; else the error naming what differs (an earlier
    invocation used other options: its run, finished or not, must not be reported under this invocation's). Reads
    only."""
    path = join(run_dir, SETTINGS_JSON)
    if not isfile(path):
        return None
    with open(path) as f:
        old = json.load(f)
    if old == settings:
        return None
    fix = ("Another budget or --seed was used in this folder: use the same options to resume it, or another -o. (The "
           "named budgets adapt the batch to the dataset: an older nnUNetv2_dp_experiment may have used another.)")
    differs = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    fix += f" Differing settings: {', '.join(f'{k} {old.get(k)!r} -> {settings.get(k)!r}' for k in differs)}."
    seeded = "seed" in old
    if old.get("initial_lr") != settings.get("initial_lr"):
        fix = (f"This run was trained with initial_lr {old.get('initial_lr')!r}, this invocation asks for "
               f"{settings.get('initial_lr')!r} (None: the DP default learning-rate rule; nnUNetv2_dp_experiment "
               "before that rule fixed 0.1 for every DP run): use another -o (--lrs LR adds runs with a fixed lr).")
    if seeded != ("seed" in settings):
        fix = ("This run's DP noise and sampling were seeded (--reproducible, or an nnUNetv2_dp_experiment older "
               "than --reproducible): add --reproducible and the same --seed to resume or report it as "
               "reproducible, not private; or use another -o for private runs." if seeded else
               "This run drew fresh OS entropy (private randomness) and --reproducible cannot be added to it "
               "afterwards: drop --reproducible, or use another -o.")
    return ExperimentError("-o", run_dir, "a run folder made with the same settings", fix)


def check_settings(run_dir: str, settings: dict[str, Any]) -> None:
    """Record the run's settings in run_dir/settings.json, or stop if an earlier invocation used others."""
    problem = settings_problem(run_dir, settings)
    if problem is not None:
        raise problem
    os.makedirs(run_dir, exist_ok=True)
    with open(join(run_dir, SETTINGS_JSON), "w") as f:
        json.dump(settings, f, indent=2)


def execute(ctx: Context, run_dir: str, spec: RunSpec, settings: dict[str, Any],
            watch: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The whole run; returns and writes result.json (its presence marks the run finished). `watch` receives the
    training's output as it comes."""
    check_settings(run_dir, settings)
    t0 = time.time()
    train_seconds = train(ctx, run_dir, spec, watch)
    model = model_folder(ctx, run_dir, spec)
    fold = join(model, "fold_0")
    test_none = predict_test(ctx, run_dir, spec)
    scores = {"none": evaluate(test_none, ctx.test_labels, model, ctx.num_processes)}
    choices, refined, selection = refine_all(ctx, join(fold, "validation"), model, test_none, join(run_dir, "test"),
                                             fold, "nonprivate" if spec.epsilon is None else "dp")
    scores.update(refined)
    val_dice = validation_dice(join(fold, "validation"), join(run_dir, "test"), tuple(scores))
    result = {"run": spec.name, "rule": spec.rule, "target_epsilon": spec.epsilon, "trainer": spec.trainer,
              **spec_fields(spec), "plans": ctx.plans, "pretrained": ctx.pretrained,
              **privacy_summary(fold), "initial_lr": settings.get("initial_lr"), "scores": scores,
              "dpmorph_choice": choices, "dpmorph_selection": ctx.selection.record(), "selection": selection,
              "validation_dice_mean": val_dice["none"], "validation_dice": val_dice,
              "train_seconds": train_seconds, "seconds": time.time() - t0, "model_folder": model}
    with open(join(run_dir, RESULT_JSON), "w") as f:
        json.dump(result, f, indent=2)
    return result
