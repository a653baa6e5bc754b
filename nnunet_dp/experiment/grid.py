"""nnUNetv2_dp_experiment, the runs: every run of the checked grid in turn, with progress, ETA and failures that say why.

With --public-fraction the public pretraining goes first (every run fine-tunes from it; it is timed and shown in the
progress, but the ETA is measured on the first DP run after it; skipped when its checkpoint_final exists; if it fails,
the grid stops), and the public model alone is scored (public_alone.py; a failure is reported, the runs go on). Then
the DP runs (their steps are the slow ones, so the first ETA measures one of them; under --seeds K the first repeat of every run before the second), the
non-private reference last; no run depends on another, so a failed run is reported and the others go on. Results come
back in grid order.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from os.path import isfile, join
from typing import TYPE_CHECKING, Any

from nnunet_dp.experiment import public_alone
from nnunet_dp.experiment.budget import RunPlan
from nnunet_dp.experiment.dpmorph import stale_choice
from nnunet_dp.experiment.plan import BudgetSpec
from nnunet_dp.experiment.progress import (
    Progress,
    busy_cores,
    busy_warning,
    minutes,
    pool_start_seconds,
    pools_per_run,
)
from nnunet_dp.experiment.run import RESULT_JSON, CommandError, Context, check_settings, execute, spec_fields

if TYPE_CHECKING:
    from nnunet_dp.experiment.pretrain import PublicPretraining


def execution_order(runs: Sequence[RunPlan]) -> list[RunPlan]:
    """DP runs in grid order, repeat 1 of each before repeat 2 (--seeds), then the non-private reference."""
    def repeat(r: RunPlan) -> int:
        return r.spec.repeat or 1

    return (sorted((r for r in runs if r.spec.epsilon is not None), key=repeat) +
            sorted((r for r in runs if r.spec.epsilon is None), key=repeat))


def failure_reason(error: Exception) -> str:
    """What a failed run prints and the report keeps: a command's last exception, or the exception itself."""
    if isinstance(error, CommandError):
        return error.reason
    return f"{type(error).__name__}: {error}".strip()


def failed_result(run: RunPlan, reason: str, seconds: float, log: str) -> dict[str, Any]:
    """The result of a run that failed: no scores, its reason and log; the report marks it."""
    return {"run": run.spec.name, "rule": run.spec.rule, "target_epsilon": run.spec.epsilon,
            "trainer": run.spec.trainer, **spec_fields(run.spec), "status": "failed", "error": reason, "log": log, "epsilon": None,
            "noise_multiplier": None, "steps": None, "initial_lr": run.settings.get("initial_lr"), "scores": {},
            "train_seconds": 0.0, "seconds": seconds}


def finished_result(ctx: Context, run_dir: str) -> tuple[dict[str, Any] | None, str | None]:
    """(result.json of a finished run or None, why its DP-Morph choice must be made again or None): a run whose choice
    was made with another selection (--dpmorph-selection, --epsilon-select) is not reported under this one."""
    done = join(run_dir, RESULT_JSON)
    if not isfile(done):
        return None, None
    with open(done) as f:
        result = json.load(f)
    return result, stale_choice(result, ctx.selection)


def _pretrain(pretraining: PublicPretraining, progress: Progress) -> None:
    """The public pretraining (skipped when done); a failure stops the grid: every run would start from it."""
    if pretraining.done():
        print(f"[0] {pretraining.name}: finished earlier, skipped ({pretraining.checkpoint})", flush=True)
        return
    print(f"[0] {pretraining.name}: ordinary nnU-Net training on the public part ({progress.status()}; log: "
          f"{join(pretraining.folder, 'log.txt')})", flush=True)
    progress.start_run(pretraining.name, measure=False)
    t0 = time.time()
    try:
        seconds = pretraining.run(watch=progress.on_log)
    except Exception as error:
        progress.end_run(pretraining.name, time.time() - t0, failed=True)
        raise RuntimeError(f"{pretraining.name} failed, so no run can start from it: {failure_reason(error)} (log: "
                           f"{join(pretraining.folder, 'log.txt')}). Run the same command again to retry.") from error
    progress.end_run(pretraining.name, seconds)
    print(f"[0] {pretraining.name}: done in {minutes(seconds)} ({pretraining.checkpoint}; {progress.status()})",
          flush=True)


def _public_alone(ctx: Context, step: public_alone.PublicAlone) -> dict[str, Any]:
    """The public model alone, scored as a run (skipped when done); a failure is reported, the runs go on."""
    log = join(public_alone.run_dir(ctx), "log.txt")
    done, stale = finished_result(ctx, public_alone.run_dir(ctx))
    if done is not None and stale is None:
        print(f"[0] {public_alone.LABEL}: finished earlier, skipped "
              f"({join(public_alone.run_dir(ctx), RESULT_JSON)})", flush=True)
        return done
    print(f"[0] {public_alone.LABEL}: " + (stale or "no private training; its validation and test predictions, "
          "DP-Morph and scores") + f" (log: {log})", flush=True)
    t0 = time.time()
    try:
        result = public_alone.execute(ctx, step)
    except Exception as error:  # noqa: BLE001 - report it, as a failed run; the runs do not need it
        reason = failure_reason(error)
        indented = reason.replace("\n", "\n    ")
        print(f"[0] {public_alone.LABEL}: FAILED after {minutes(time.time() - t0)}:\n    {indented}\n    (log: {log}; "
              "the runs go on)", flush=True)
        return public_alone.failed_result(reason, time.time() - t0, log)
    mean = {k: round(v["dice_mean"], 4) for k, v in result["scores"].items()}
    print(f"[0] {public_alone.LABEL}: done in {minutes(result['seconds'])}; mean test Dice {mean}", flush=True)
    return result


def run_all(ctx: Context, runs: Sequence[RunPlan], budget: BudgetSpec, predicted_voxels: float,
            voxels_per_step: float, pretraining: PublicPretraining | None = None,
            public: public_alone.PublicAlone | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Every run (finished ones read back), the public pretraining (if any) first and the public model alone scored
    (`public`), then the DP runs. Returns the results (the public model alone first, then grid order) and the failed
    runs."""
    for run in runs:  # checked before; written now that the grid starts
        check_settings(join(ctx.out, "runs", run.spec.name), run.settings)
    order = execution_order(runs)
    state = {r.spec.name: finished_result(ctx, join(ctx.out, "runs", r.spec.name)) for r in order}
    todo = [name for name, (done, stale) in state.items() if done is None or stale is not None]
    if pretraining is not None and not pretraining.done():
        todo.insert(0, pretraining.name)
    pool_seconds = 0.0
    if todo and ctx.device == "cpu" and (busy := busy_warning(busy_cores(), os.cpu_count() or 1)):
        print(busy, flush=True)
    if todo:  # measured on an idle machine, before any run: the ETA counts the pools a run starts after training
        pool_seconds = pool_start_seconds(ctx.num_processes)
        print(f"ETA: a process pool of {ctx.num_processes} (spawned, importing nnU-Net) starts in {pool_seconds:.1f} s "
              f"here; a run starts {pools_per_run(ctx.refinements)} of them after training", flush=True)
    progress = Progress(todo, num_epochs=budget.num_epochs, iterations=budget.num_iterations_per_epoch,
                        val_iterations=budget.num_val_iterations_per_epoch, voxels_per_step=voxels_per_step,
                        predicted_voxels=predicted_voxels, pools=pools_per_run(ctx.refinements),
                        pool_seconds=pool_seconds, out=lambda line: print(line, flush=True))
    if pretraining is not None:
        _pretrain(pretraining, progress)
    first = [] if public is None else [_public_alone(ctx, public)]
    results: dict[str, dict[str, Any]] = {}
    failed: list[str] = [r["run"] for r in first if r.get("status") == "failed"]
    for i, run in enumerate(order, 1):
        name, run_dir, tag = run.spec.name, join(ctx.out, "runs", run.spec.name), f"[{i}/{len(order)}]"
        done, stale = state[name]
        if done is not None and stale is None:
            print(f"{tag} {name}: finished earlier, skipped ({join(run_dir, RESULT_JSON)})", flush=True)
            results[name] = done
            continue
        what = stale or f"{run.spec.trainer}, training + test predictions"
        print(f"{tag} {name}: {what} ({progress.status()}; log: {join(run_dir, 'log.txt')})", flush=True)
        progress.start_run(name, measure=stale is None)  # a new choice alone: not a run's time
        t0 = time.time()
        try:
            result = execute(ctx, run_dir, run.spec, run.settings, watch=progress.on_log)
        except Exception as error:  # noqa: BLE001 - any failure of one run: report it, go on with the others
            reason = failure_reason(error)
            progress.end_run(name, time.time() - t0, failed=True)
            results[name] = failed_result(run, reason, time.time() - t0, join(run_dir, "log.txt"))
            failed.append(name)
            indented = reason.replace("\n", "\n    ")
            print(f"{tag} {name}: FAILED after {minutes(time.time() - t0)}:\n    {indented}\n    (log: "
                  f"{join(run_dir, 'log.txt')}; the other runs go on; {progress.status()})", flush=True)
            continue
        progress.end_run(name, result["seconds"])
        results[name] = result
        mean = {k: round(v["dice_mean"], 4) for k, v in result["scores"].items()}
        print(f"{tag} {name}: done in {minutes(result['seconds'])}; mean test Dice {mean} ({progress.status()})",
              flush=True)
    if todo:
        print(progress.summary(), flush=True)
    return first + [results[r.spec.name] for r in runs], failed
