"""privacy.json and dp_config.json: what a DP run spent and what its epsilon does not cover."""
from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from typing import Any

from nnunet_dp.config import DPConfig
from nnunet_dp.run import DPRun

PRIVACY_JSON = "privacy.json"
CONFIG_JSON = "dp_config.json"

# Data-dependent things a standard nnU-Net DP run releases that epsilon does not cover (DESIGN.md invariant 7).
ASSUMPTIONS: tuple[str, ...] = (
    ("Plans and preprocessing: the dataset fingerprint (intensity percentiles, mean and std of foreground voxels "
    "used for CT normalisation; image shapes and spacings that set target spacing and patch size) is computed "
    "from all training cases without noise. Treat plans.json and dataset_fingerprint.json as private, or plan on "
    "public data."),
    ("Case membership: splits_final.json, debug.json and the training log name the training cases. Do not release "
    "them with the model."),
    ("checkpoint_best.pth is chosen by the (non-private) pseudo Dice on the validation cases; validation cases are "
    "not protected by epsilon. checkpoint_final.pth involves no selection."),
    ("The training-loss curve (training log, progress.png) is computed from the sampled training cases without "
    "noise. Do not release it."),
    ("Validation metrics (validation/summary.json) are computed on the validation cases, which epsilon does not "
    "cover (they are not used for training)."),
    ("checkpoint_latest.pth holds the noise generator's state so that a resumed run is reproducible: with it the "
    "noise could be regenerated. Keep it private; checkpoint_final.pth and checkpoint_best.pth do not contain it."),
    ("Hyperparameters (learning rate, clip norm, epochs, rule constants) are assumed to be chosen without looking at "
    "the private training cases; tuning them on these cases is not accounted for."),
    ("Gradient-alignment output (alignment.csv in the fold folder when alignment_every > 0, and everything "
     "nnUNetv2_dp_alignment writes: alignment.csv, alignment_cases.csv with per-case rows keyed by case identifier, "
     "summary.json, plots) is computed from unnoised per-case gradients and is not covered by epsilon."),
)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "nnunetv2", "opacus", "numpy", "nnunet-dp"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def privacy_report(run: DPRun, cfg: DPConfig, *, status: str, seed: int | None) -> dict[str, Any]:
    p = run.plan
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
        "seed": seed,
        "versions": versions(),
        "assumptions": list(ASSUMPTIONS),
    }


def write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
    os.replace(tmp, path)
