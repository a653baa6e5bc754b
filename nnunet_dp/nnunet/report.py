"""privacy.json and dp_config.json: what a DP run spent and what its epsilon does not cover."""
from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from typing import Any

from nnunet_dp.journal import JOURNAL_FILE, ever_seeded
from nnunet_dp.run import DPRun

PRIVACY_JSON = "privacy.json"
CONFIG_JSON = "dp_config.json"

# Data-dependent things a standard nnU-Net DP run releases that epsilon does not cover (docs/invariants.md, invariant 7).
ASSUMPTIONS: tuple[str, ...] = (
    ("Plans and preprocessing: the dataset fingerprint (intensity percentiles, mean and std of foreground voxels "
     "used for CT normalisation; image shapes and spacings that set target spacing and patch size) is computed "
     "from all training cases without noise. Treat plans.json and dataset_fingerprint.json as private, or plan on "
     "public data (nnUNetv2_move_plans_between_datasets, which privacy.json cannot tell from this dataset's own "
     "plans) or without data (nnUNetv2_dp_plan, recognised under 'plans')."),
    ("The number of training cases N (num_training_cases, and q = expected_batch_size / N) is published in this "
     "file and is assumed public; DP protects which cases took part, not how many."),
    ("Case membership: splits_final.json, debug.json and the training log name the training cases. Do not release "
     "them with the model."),
    ("Epsilon covers the training cases of this fold only. The fold's validation cases are not protected: "
     "checkpoint_best.pth is chosen by the (non-private) pseudo Dice on them, and validation metrics "
     "(validation/summary.json, the log's pseudo Dice) are computed from them. checkpoint_final.pth involves no "
     "selection."),
    ("Cross-validation and fold ensembles: under nnU-Net's 5-fold cross-validation every case trains 4 of the 5 "
     "fold models and is a validation case of the fifth. A release of several folds (nnUNetv2_predict -f 0 1 2 3 4) "
     "composes their epsilons for each case (the 4 trainings that contain it), and the fifth fold's validation-"
     "based choices (checkpoint_best, pseudo Dice) use that case without noise. This file's epsilon is for this "
     "fold's model alone."),
    ("Model selection across trainings: nnUNetv2_find_best_configuration, DP-Morph's postprocessing search and any "
     "choice between runs made on the cross-validation predictions look at the validation cases without noise "
     "(unless DP-Morph's private selection, -epsilon_select, is used and its epsilon added)."),
    ("Cascades: a 3d_cascade_fullres model is trained on the predictions of a 3d_lowres model of the same cases; "
     "the cascade's release composes the epsilons of both stages."),
    ("Private files (never release them): checkpoint_latest.pth (nnU-Net's logger: per-epoch training and "
     "validation losses, pseudo Dice, timestamps; the count of dropped cases), training_log_*.txt, progress.png, "
     "debug.json, dataset_fingerprint.json, splits_final.json, dp_journal.txt, the validation folder and the "
     "alignment outputs. They hold unnoised statistics of the private cases. checkpoint_final.pth and "
     "checkpoint_best.pth carry no logger values, no timings and no counts; nnUNetv2_dp_export packs only the "
     "releasable files."),
    ("Dropped cases and the divergence stop: a sampled case whose gradient or loss is not finite contributes zero "
     "(its step still adds its noise). How many were dropped is an unnoised count: it is written only to the "
     "training log and checkpoint_latest.pth, never to this file. When most sampled cases of an epoch are dropped, "
     "training stops early (status 'stopped: most sampled cases were not finite'); that stop, and so 'steps' and "
     "'status', then depend on the private cases and are not covered by epsilon."),
    ("Hyperparameters (learning rate, clip norm, epochs, rule constants) are assumed to be chosen without looking at "
     "the private training cases; tuning them on these cases is not accounted for."),
    ("Gradient-alignment output (alignment.csv in the fold folder when alignment_every > 0, and everything "
     "nnUNetv2_dp_alignment writes: alignment.csv, alignment_cases.csv with per-case rows keyed by case identifier, "
     "summary.json, plots) is computed from unnoised per-case gradients and is not covered by epsilon."),
)
# Replaces ASSUMPTIONS[0] when the plans were written by nnUNetv2_dp_plan and are unchanged (plans.plans_provenance).
USER_PLANS = ("Plans and preprocessing: the plans '{plans_name}' (configuration {configuration}) were written by "
              "nnUNetv2_dp_plan from user-given values only ({values}; command: {command}). Spacing, patch size, "
              "network topology and normalisation read nothing from the training cases (the planner reads only "
              "dataset.json's channels, labels and file ending); the trainer neither read nor copied "
              "dataset_fingerprint.json. Preprocessing resamples and normalises each case on its own. The values are "
              "assumed to be chosen without looking at the private cases.")
# Added when a seed is set (docs/invariants.md, invariant 8).
SEEDED = ("Reproducible, not private: the noise and the Poisson sampling were seeded (setting 'seed'). Anyone who "
          "knows or guesses the seed can regenerate the noise and remove it from the released weights: epsilon does "
          "not hold. The seed is written to no file. Use seeds for testing only.")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "nnunetv2", "opacus", "numpy", "nnunet-dp"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def privacy_report(run: DPRun, *, status: str, private_randomness: bool,
                   extra: dict[str, Any] | None = None, extra_assumptions: list[str] | None = None,
                   plans: dict[str, Any] | None = None) -> dict[str, Any]:
    """Epsilon counts every step recorded in the fold folder's journal (crashed runs included), not only the
    steps of the model in checkpoint_final. `extra`: fields of the trainer's fine-tuning levers (trained
    parameters, pretrained weights, augmentations per case, EMA, noise advice), placed before `versions`.
    `plans`: nnunet_dp.nnunet.plans.plans_provenance; data-independent plans replace the plans assumption."""
    p = run.plan
    assumptions = list(ASSUMPTIONS)
    if plans is not None and plans.get("data_independent"):
        assumptions[0] = USER_PLANS.format(**{k: plans.get(k) for k in ("plans_name", "configuration", "command")},
                                           values=json.dumps(plans.get("values"), sort_keys=True))
    return {
        "epsilon": run.epsilon(),
        "delta": p.delta,
        "noise_multiplier": p.noise_multiplier,
        "sampling_rate": p.sampling_rate,
        "expected_batch_size": p.expected_batch_size,
        "steps": run.steps,
        "accountant": p.accountant,
        "rule": p.rule,
        "rule_constant": p.rule_constant,
        "clip_norm": p.clip_norm,
        "sensitivity": run.rule.sensitivity,
        "num_training_cases": p.num_training_cases,
        "target_epsilon": p.target_epsilon,
        "planned_steps": p.planned_steps,
        "max_steps_within_target": p.max_steps,
        "epsilon_after_planned_steps": run.projected_epsilon(),
        "status": status,
        "privacy_unit": "one training case (image and label); Poisson sampling of cases",
        "ledger_history": run.ledger.history,
        "journal": JOURNAL_FILE,
        "private_randomness": private_randomness,
        **(extra or {}),
        **({} if plans is None else {"plans": plans}),
        "versions": versions(),
        "assumptions": assumptions + list(extra_assumptions or []) + ([] if private_randomness else [SEEDED]),
    }


def write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
    os.replace(tmp, path)


def private_randomness(trainer: Any) -> bool:
    """False when this session or any earlier one in the fold folder was seeded (the journal records each session)."""
    return trainer.dp_config.private_randomness and not ever_seeded(os.path.join(trainer.output_folder, JOURNAL_FILE))


def write_privacy(trainer: Any) -> None:
    """Rewrite the fold folder's privacy.json (rank 0) from the trainer's run, settings and records."""
    from nnunet_dp.nnunet.finetune import report_extra
    from nnunet_dp.nnunet.plans import plans_provenance

    if trainer.local_rank != 0 or trainer.dp_run is None:
        return
    extra, assumptions = report_extra(trainer.dp_config, trainer.dp_selection, trainer.dp_pretrained)
    extra.update(trainer.dp_noise or {}, initial_lr=trainer.initial_lr, lr_rule=trainer.dp_lr_rule,
                 projection=trainer.dp_projection or {"projection": "none"})
    report = privacy_report(trainer.dp_run, status=trainer.dp_status, private_randomness=private_randomness(trainer),
                            extra=extra, extra_assumptions=assumptions,
                            plans=plans_provenance(trainer.plans_manager.plans, trainer.configuration_name))
    write_json_atomic(os.path.join(trainer.output_folder, PRIVACY_JSON), report)
