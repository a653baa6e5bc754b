"""Starts and resumes of a DP training in one fold folder: settings, the step journal, lost timelines, divergence.

Every start and resume continues the folder's write-ahead journal (nnunet_dp.journal), so that epsilon counts every
step that ever ran there, crashed runs included. Checkpoints written by a run after the checkpoint that a resume
starts from belong to a lost timeline (their steps are in the journal, their weights in no ledger of the resumed
run) and are removed, so that only one timeline's models stay in the folder.
"""
from __future__ import annotations

import glob
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from nnunetv2.utilities.collate_outputs import collate_outputs
from torch import distributed as dist

from nnunet_dp.config import ENV_VAR, DPConfig
from nnunet_dp.errors import DPCheckpointError, DPConfigError, DPDataError, DPDivergedError
from nnunet_dp.journal import JOURNAL_FILE, StepJournal, session_modes, total_steps
from nnunet_dp.nnunet.report import write_privacy

CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_best.pth", "checkpoint_latest.pth")
# stop when more than this fraction of an epoch's sampled cases (and at least MIN_DROPPED of them) were dropped
MAX_DROPPED_FRACTION = 0.5
MIN_DROPPED = 3


def load_dp_config(output_folder: str, defaults: Mapping[str, Any]) -> tuple[DPConfig, str]:
    """The settings: the JSON named by nnUNet_dp_config; without it, the fold folder's dp_config.json (what the
    run being resumed or validated used: `--c` and `--val` need no environment); else the defaults."""
    saved = os.path.join(output_folder, "dp_config.json")
    if os.environ.get(ENV_VAR) or not os.path.isfile(saved):
        return DPConfig.from_env(**defaults), os.environ.get(ENV_VAR) or "defaults (nnUNet_dp_config not set)"
    with open(saved) as f:
        values = {k: v for k, v in json.load(f).items() if k not in ("trainer", "rule")}
    return DPConfig.from_mapping(values, source=saved, **defaults), f"{saved} ({ENV_VAR} not set)"


def read_checkpoint(path: str) -> dict:
    """torch.load with an error that names the file (a truncated checkpoint otherwise says only 'zip archive')."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise DPCheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0]}): "
                                "it is truncated or damaged. Delete it to resume from another checkpoint of this "
                                "folder (checkpoint_latest.pth or checkpoint_best.pth), or start without --c.") from e
    if not isinstance(checkpoint, dict):
        raise DPCheckpointError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not an nnU-Net checkpoint")
    return checkpoint


def check_labels(target: Any, label_manager: Any, keys: Any, error: Exception) -> None:
    """After a failed step: raise a DPDataError naming the cases whose labels are outside dataset.json's classes."""
    seg = target[0] if isinstance(target, (list, tuple)) else target
    if seg is None or label_manager.has_regions:
        return
    allowed = set(label_manager.all_labels) | ({label_manager.ignore_label} - {None})
    bad = {}
    for i in range(seg.shape[0]):
        values = {int(v) for v in torch.unique(seg[i]).tolist()} - allowed
        if values:
            bad[str(keys[i]) if keys is not None else f"#{i}"] = sorted(values)
    if bad:
        raise DPDataError(f"label values outside dataset.json's labels {sorted(allowed)} in cases {bad}: fix the "
                          "labels (or dataset.json) and preprocess again") from error


def check_dropped(dropped: int, sampled: int, epoch: int) -> None:
    if dropped >= MIN_DROPPED and dropped > MAX_DROPPED_FRACTION * sampled:
        raise DPDivergedError(
            f"DP: {dropped} of the {sampled} cases sampled in epoch {epoch} had a non-finite gradient or loss and "
            "contributed nothing. Either the images contain NaN/inf voxels (check the raw data and the "
            "preprocessed files) or the training diverged (lower initial_lr or clip_norm). Steps already taken are "
            "counted in privacy.json; training stops here.")


def remove_lost_timeline(folder: str, resumed_steps: int, log: Any) -> None:
    """Delete checkpoints written after step `resumed_steps` (by a crashed run, or by an earlier run in this folder
    when training starts afresh) and half-written *.tmp files."""
    for path in sorted(glob.glob(os.path.join(folder, "checkpoint_*.pth.tmp"))):
        os.remove(path)
    for name in CHECKPOINTS:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            steps = total_steps(read_checkpoint(path)["dp_state"]["ledger"]["history"])
        except (DPCheckpointError, KeyError, TypeError):  # unreadable, truncated or not a DP checkpoint
            steps = None
        if steps is None or steps > resumed_steps:
            os.remove(path)
            log(f"DP: removed {name} ({'unreadable' if steps is None else f'{steps} steps'}): written after step "
                f"{resumed_steps}, where this run continues, so it belongs to a lost timeline. Its steps stay "
                "counted in epsilon (journal).")


def check_randomness_mode(folder: str, private_randomness: bool) -> None:
    """Refuse a session whose randomness mode (seeded or fresh OS entropy) differs from the folder's earlier
    sessions: a folder that was ever seeded stays "reproducible, not private" (docs/invariants.md, invariant 8), and a seeded
    session added to a private folder would turn it into one. Every rank checks (no rank waits for a failed one)."""
    earlier = {m for m in session_modes(os.path.join(folder, JOURNAL_FILE)) if m is not None}
    if not earlier or earlier == {private_randomness}:
        return
    if private_randomness:
        raise DPConfigError("seed", None, "the seed this folder's earlier sessions used", ENV_VAR, fix=(
            f"{folder} was trained with a seed (reproducible, not private; its journal {JOURNAL_FILE} says so) and "
            "this session has none. A resume cannot make it private: the released weights carry the seeded noise. "
            "To resume it as the reproducible run it is, set nnUNet_dp_config to the settings file with the same "
            "'seed'; for a private model, train in a new output folder (another fold, trainer or plans name) without "
            "a seed."))
    raise DPConfigError("seed", "<set>", "null (no seed), as in this folder's earlier sessions", ENV_VAR, fix=(
        f"{folder} was trained with fresh OS entropy (private) and this session sets a seed. Mixing them would make "
        "the folder not private. Remove 'seed' from the settings to resume, or use a new output folder for a "
        "reproducible run."))


def attach_journal(trainer: Any) -> None:
    """Continue the fold folder's journal (rank 0), or start one; under DDP every rank gets rank 0's history."""
    run, folder = trainer.dp_run, trainer.output_folder
    check_randomness_mode(folder, trainer.dp_config.private_randomness)
    resumed = trainer.dp_resumed_steps or 0
    journal, history = None, None
    if trainer.local_rank == 0:
        journal = StepJournal(folder)
        known, ledger = journal.history(), run.ledger.history
        if total_steps(ledger) > total_steps(known):  # a folder without journal (older version, copied checkpoint)
            s, q, _ = ledger[-1]
            journal.import_history([(s, q, total_steps(ledger) - total_steps(known))])
        history = journal.history()
        lost = total_steps(history) - resumed
        if lost and trainer.dp_resumed_steps is None:
            trainer.print_to_log_file(
                f"DP WARNING: this folder's journal ({JOURNAL_FILE}) records {lost} steps of earlier trainings here. "
                "They stay counted in epsilon for everything released from this folder. To start a separately "
                "accounted training, use a new output folder (delete this fold folder only if nothing from it was "
                "released).")
        elif lost:
            trainer.print_to_log_file(f"DP: {lost} steps ran after the checkpoint this run resumes from (a crash); "
                                      "they are counted in epsilon.")
        remove_lost_timeline(folder, resumed, trainer.print_to_log_file)
    if trainer.is_ddp:
        box = [history]
        dist.broadcast_object_list(box, src=0)
        history = box[0]
    run.attach_journal(journal, history)
    if not run.can_step():
        trainer.print_to_log_file(f"DP: the {run.steps} steps recorded for this folder already reach "
                                  f"target_epsilon={run.plan.target_epsilon}; no further step will run.")


def account_epoch(trainer: Any, train_outputs: list[dict]) -> None:
    """nnU-Net's epoch-end training statistics under DP (gathered over DDP ranks): the mean loss of the sampled
    finite cases for nnU-Net's logger, the dropped-case count (log and checkpoint_latest only: unnoised), and the stop
    when most sampled cases were not finite (privacy.json first counts the epoch's journaled steps)."""
    outputs = collate_outputs(train_outputs)
    stats = [np.atleast_1d(outputs[k]).astype(float) for k in ("loss", "batch_size", "dropped")]
    if trainer.is_ddp:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, stats)
        stats = [np.concatenate([g[i] for g in gathered]) for i in range(3)]
    losses, sampled, dropped = stats[0], int(stats[1].sum()), int(stats[2].sum())
    trainer.logger.log("train_losses", float(np.nanmean(losses)) if np.isfinite(losses).any() else float("nan"),
                       trainer.current_epoch)
    if trainer.dp_dropped is not None:
        trainer.dp_dropped += dropped
    if dropped:
        trainer.print_to_log_file(f"DP: {dropped} of {sampled} sampled cases dropped this epoch (non-finite gradient "
                                  "or loss; they contributed nothing, the steps still added their noise)")
    try:
        check_dropped(dropped, sampled, trainer.current_epoch)
    except DPDivergedError:
        trainer.dp_status = "stopped: most sampled cases were not finite"
        if os.path.isdir(trainer.output_folder):
            write_privacy(trainer)
        raise
