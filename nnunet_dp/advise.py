"""The budget advisor: how loud the DP noise is on the averaged update, before any training (issues 11 and 15).

After the division by the expected batch size qN, the update of one step is (sum of clipped case gradients + noise)
/ qN. The clipped signal has norm <= C (each case at most C, averaged); the noise is N(0, (sigma C / qN)^2) on each of
the d trained coordinates, so its norm is about sigma * C * sqrt(d) / (qN). Their ratio

    noise_ratio = sigma * sqrt(d) / (qN)        (C cancels)

says how many times the noise outweighs the largest possible signal in one step. Momentum and the learning-rate rule
(nnunet_dp.optim) average some of it away over steps, but the ratio is what the levers below change. A rough guide,
from the runs in docs/results.md and docs/optimizer.md (one seed each; a guide, not a guarantee):

- MSD Hippocampus 2d `tiny` (d ~ 2.3e5, qN = 32 of N = 166, 400 steps): eps 64 (sigma 0.72) gives a ratio of ~11 and
  every rule learned, even with the old optimizer (Dice 0.49-0.55 against 0.82 non-private); eps 8 (sigma 2.61) gives
  ~39: nothing learned with the old optimizer, and 0.39-0.46 with the DP default lr (~0.03, momentum 0.9); eps 1
  (sigma 15.8) gives ~237 and nothing learned (old optimizer; not rerun).
- Synthetic disks and rings (d ~ 1.2e5, same qN and steps, an easy task): ratio ~28 gave Dice 0.86, ~92 gave 0.43.

NOISE_RATIO_WARN = 20 sits between 11 (learns robustly) and 39 (learns only with a tuned optimizer, at about half
the non-private Dice): their geometric mean is 20.6. NOISE_RATIO_SEVERE = 100 sits between 39 (learns) and 237
(nothing learned on real data): their geometric mean is 96; the easy synthetic task still learned a little at 92.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Literal

from nnunet_dp.accounting import epsilon_for
from nnunet_dp.config import DPConfig
from nnunet_dp.errors import DPConfigError
from nnunet_dp.optim import default_lr, finetune_lr, noise_per_coordinate
from nnunet_dp.rules import RuleName
from nnunet_dp.run import DPPlan, calibrate

# above this noise-to-signal ratio, warn (see the module docstring for the evidence)
NOISE_RATIO_WARN = 20.0
# above this, training from scratch is not expected to learn at all
NOISE_RATIO_SEVERE = 100.0
Level = Literal["ok", "warn", "severe"]
# the levers a warning names (docs: README "Fine-tuning and the budget advisor"); none of them costs privacy
LEVERS = (
    "start from public pretrained weights (nnUNetv2_train ... -pretrained_weights FILE) and fine-tune;",
    ("fewer noised dimensions (the ratio falls with sqrt(d)): `trainable` \"norm_bias\", \"heads\", \"decoder\" or "
     "\"lora\" (with `lora_rank`), or `projection` \"public\" (noise in a k-dimensional public subspace, "
     "`projection_dim`); the prediction table of nnUNetv2_dp_advise shows each one's d;"),
    ("more training cases N at the same expected batch (q = qN/N falls, and sigma with it); a larger "
     "`expected_batch_size` divides the noise by qN, but at a fixed epsilon and step count sigma grows almost in "
     "proportion to q: a larger batch for fewer epochs is what helps (Hippocampus, eps 8: qN 32 x 400 steps -> "
     "ratio 39, qN 64 x 400 -> 38, qN 64 x 100 -> 20);"),
    "`augmentations_per_case` > 1 averages K patches per case: it lowers the gradient's variance, not the noise;",
    ("`ema_decay` averages the weights over ~1/(1 - decay) steps, and the noise with them (keep that span well "
     "below the number of steps)."),
)

# the first lever when fine-tuning: the DP run keeps what the public model knows (docs/results.md)
PUBLIC_LEVER = ("a better public model: train it longer or on more public cases (costs no privacy; the DP run keeps "
                "what it knows: on Hippocampus at eps 1 and 8 DP fine-tuning ended within 0.002 Dice of the public "
                "model alone; nnUNetv2_dp_experiment --public-epochs);")


def noise_ratio(*, noise_multiplier: float, expected_batch_size: float, num_trained_parameters: int) -> float:
    """sigma * sqrt(d) / (qN): the expected noise norm on the averaged update over the signal bound C."""
    return noise_multiplier * math.sqrt(num_trained_parameters) / expected_batch_size


def level_of(ratio: float) -> Level:
    """'ok' up to NOISE_RATIO_WARN, 'warn' above it, 'severe' above NOISE_RATIO_SEVERE."""
    return "severe" if ratio > NOISE_RATIO_SEVERE else "warn" if ratio > NOISE_RATIO_WARN else "ok"


def noise_summary(*, noise_multiplier: float, clip_norm: float, expected_batch_size: float,
                  num_trained_parameters: int) -> dict[str, Any]:
    """The noise of one step on the averaged update: per coordinate, its expected norm and its ratio to C."""
    if num_trained_parameters < 1 or expected_batch_size <= 0 or clip_norm <= 0 or noise_multiplier < 0:
        raise ValueError(f"noise_summary needs d >= 1, qN > 0, C > 0, sigma >= 0; got d={num_trained_parameters}, "
                         f"qN={expected_batch_size}, C={clip_norm}, sigma={noise_multiplier}")
    per_coordinate = noise_per_coordinate(noise_multiplier=noise_multiplier, clip_norm=clip_norm,
                                          expected_batch_size=expected_batch_size)
    ratio = noise_ratio(noise_multiplier=noise_multiplier, expected_batch_size=expected_batch_size,
                        num_trained_parameters=num_trained_parameters)
    return {"noise_multiplier": float(noise_multiplier), "clip_norm": float(clip_norm),
            "expected_batch_size": float(expected_batch_size), "num_trained_parameters": int(num_trained_parameters),
            "noise_per_coordinate": per_coordinate, "noise_norm": per_coordinate * math.sqrt(num_trained_parameters),
            "noise_ratio": ratio, "level": level_of(ratio), "warn_above": NOISE_RATIO_WARN,
            "severe_above": NOISE_RATIO_SEVERE}


def advice(summary: dict[str, Any], *, finetuning: bool = False) -> str | None:
    """A plain-words warning naming the levers when the noise ratio is above NOISE_RATIO_WARN, else None.
    `finetuning`: the run starts from public weights, so the from-scratch wording and the first lever do not apply;
    a better public model (PUBLIC_LEVER) comes first instead."""
    ratio, d, ebs = summary["noise_ratio"], summary["num_trained_parameters"], summary["expected_batch_size"]
    if ratio <= NOISE_RATIO_WARN:
        return None
    k = ratio / NOISE_RATIO_WARN
    head = (f"DP noise warning: the noise on each averaged update has norm ~{_num(summary['noise_norm'])}, "
            f"{_num(ratio)} x the largest possible signal C = {summary['clip_norm']:g} (sigma "
            f"{summary['noise_multiplier']:.3g}, d = {d:,} trained parameters, expected batch qN = {ebs:.3g}). ")
    if finetuning:
        head += ("You fine-tune from public weights: the thresholds were measured from scratch, and a good public "
                 "start keeps what it knows at any ratio, but learns from the private cases only what this noise "
                 "lets through")
    else:
        head += (f"Training from scratch is not expected to learn at this ratio (above {NOISE_RATIO_SEVERE:g})"
                 if ratio > NOISE_RATIO_SEVERE else f"Training from scratch may learn little or slowly (above "
                 f"{NOISE_RATIO_WARN:g})")
    head += \
        f"; the thresholds are a rough guide (nnunet_dp/advise.py). Bringing it to {NOISE_RATIO_WARN:g} takes " \
        f"a {_num(k)}-fold smaller ratio, e.g. {_num(k * k)} x fewer trained parameters (it falls with sqrt(d)); " \
        "more cases or fewer steps lower sigma at a fixed epsilon (compare the rows of nnUNetv2_dp_advise)."
    levers = (PUBLIC_LEVER, *LEVERS[1:]) if finetuning else LEVERS
    return head + "\nLevers:\n" + "\n".join(f"  - {lever}" for lever in levers)


def _num(x: float) -> str:
    """3 significant digits, without exponents for large numbers (61,577 rather than 6.16e+04)."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def training_advice(plan: DPPlan, num_trained_parameters: int,
                    finetuning: bool = False) -> tuple[dict[str, Any], str | None]:
    """For the trainer: privacy.json fields {"noise": {...}} and the warning to log (None below the threshold)."""
    summary = noise_summary(noise_multiplier=plan.noise_multiplier, clip_norm=plan.clip_norm,
                            expected_batch_size=plan.expected_batch_size, num_trained_parameters=num_trained_parameters)
    return {"noise": summary}, advice(summary, finetuning=finetuning)


def advise_row(cfg: DPConfig, *, rule: RuleName, num_training_cases: int, plans_batch_size: int,
               num_trained_parameters: int, expected_batch_size: float, epochs: int,
               weight_rms: float | None = None) -> dict[str, Any]:
    """One setting, calibrated as training would calibrate it; an infeasible one says why instead. `weight_rms`: the
    RMS of the trained weights that came from the public file (a fine-tuning start): lr then follows the trainer's fine-tuning rule
    (nnunet_dp.optim.finetune_lr), else the from-scratch rule (default_lr)."""
    row: dict[str, Any] = {"rule": rule, "target_epsilon": cfg.target_epsilon,
                           "expected_batch_size": float(expected_batch_size), "epochs": int(epochs),
                           "steps": int(epochs) * cfg.num_iterations_per_epoch,
                           "sampling_rate": expected_batch_size / num_training_cases if num_training_cases >= 1 else None}
    try:
        trial = dataclasses.replace(cfg, expected_batch_size=expected_batch_size, sampling_rate=None,
                                    num_epochs=epochs)
        q, sigma, steps = calibrate(trial, num_training_cases=num_training_cases,
                                        plans_batch_size=plans_batch_size)
    except DPConfigError as e:
        return {**row, "feasible": False, "reason": f"{e.key} = {e.value!r}: needs {e.allowed}"}
    ebs = q * num_training_cases
    summary = noise_summary(noise_multiplier=sigma, clip_norm=cfg.clip_norm, expected_batch_size=ebs,
                            num_trained_parameters=num_trained_parameters)
    if weight_rms is None:
        lr = default_lr(noise_multiplier=sigma, clip_norm=cfg.clip_norm, expected_batch_size=ebs, steps=steps,
                        momentum=cfg.momentum)
    else:
        lr = finetune_lr(noise_multiplier=sigma, clip_norm=cfg.clip_norm, expected_batch_size=ebs, steps=steps,
                         weight_rms=weight_rms, momentum=cfg.momentum)
    eps = epsilon_for(noise_multiplier=sigma, sampling_rate=q, steps=steps, delta=cfg.delta, accountant=cfg.accountant)
    return {**row, "feasible": True, "reason": None, "sampling_rate": q, "noise_multiplier": sigma, "epsilon": eps,
            "delta": cfg.delta, "noise_per_coordinate": summary["noise_per_coordinate"],
            "noise_norm": summary["noise_norm"], "noise_ratio": summary["noise_ratio"], "level": summary["level"],
            "lr": lr, "lr_rule": "from-scratch rule" if weight_rms is None else "fine-tuning rule",
            "effective_step": lr / (1.0 - cfg.momentum), "momentum": cfg.momentum}


def advise_table(cfg: DPConfig, *, rule: RuleName, num_training_cases: int, plans_batch_size: int,
                 num_trained_parameters: int, batch_sizes: Sequence[float],
                 epoch_counts: Sequence[int], weight_rms: float | None = None) -> list[dict[str, Any]]:
    """One row per (expected batch size, epochs), in that order: q, sigma, steps, epsilon, noise ratio, lr."""
    return [advise_row(cfg, rule=rule, num_training_cases=num_training_cases, plans_batch_size=plans_batch_size,
                       num_trained_parameters=num_trained_parameters, expected_batch_size=b, epochs=e,
                       weight_rms=weight_rms)
            for b in batch_sizes for e in epoch_counts]
