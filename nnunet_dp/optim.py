"""DP-aware optimizer defaults: the learning rate from the noise on the averaged update and the number of steps.

After the division by the expected batch size qN, each coordinate of the update carries Gaussian noise of std
n = sigma * C / (qN), and the clipped signal has norm <= C. SGD with momentum beta moves the weights by the
effective step lr / (1 - beta) times that update; over T steps the noise in each weight adds up like a random walk,
to about lr_eff * n * sqrt(T). The default keeps that accumulated noise at a fixed level tau:

    lr_eff = clip(tau * qN / (sigma * C * sqrt(T)), LR_EFF_MIN / C, LR_EFF_MAX / C),   lr = (1 - beta) * lr_eff

so that, as in Sander et al. 2023 ("TAN without a burn": at a fixed sigma / B the utility is a function of the total
noise), runs with the same noise per coordinate and the same number of steps get the same step. The 1/C keeps the
weight displacement independent of the clip norm. tau and the momentum were chosen on synthetic data only
(benchmarks/lr_sweep.py; numbers in docs/optimizer.md), never on a user's private cases.
"""
from __future__ import annotations

import math

# accumulated noise per weight that the default step allows (benchmarks/lr_sweep.py, docs/optimizer.md)
LR_NOISE_TAU = 0.5
# never a larger effective step than this (times 1/C): nnU-Net's own 0.01 / (1 - 0.99)
LR_EFF_MAX = 1.0
# never a smaller one: at high noise the 1/sigma scaling was too cautious (synthetic, epsilon 2: the rule's 0.095 gave
# Dice 0.34, 0.3 gave 0.43, 1 gave 0.00), the best step stayed near 0.3 while the step that breaks training fell
LR_EFF_MIN = 0.3
# Fine-tuning from public weights: the accumulated noise per trained weight is kept at FINETUNE_DRIFT x the RMS of
# the public weights that train, without the floor (the floor is for learning from scratch, where a minimum step is
# needed to learn at all; a pretrained start needs the noise to stay small against the weights it starts from).
# Set a priori (a quarter of the weights' own scale), not chosen on any dataset; the Dataset904 sweep of fixed lrs in
# docs/results.md checks it.
FINETUNE_DRIFT = 0.25
# momentum 0.9 (memory ~10 steps) instead of nnU-Net's 0.99 (~100 steps, a quarter of a short DP run)
DEFAULT_MOMENTUM = 0.9
DEFAULT_NESTEROV = True


def noise_per_coordinate(*, noise_multiplier: float, clip_norm: float, expected_batch_size: float,
                         noise_share: float = 1.0) -> float:
    """Std of the noise on each trained coordinate of the averaged update: sigma * C / (qN), times sqrt(noise_share)
    when the noise lives in D of the d trained dimensions (noise_share = D / d: a public projection draws it in k + d_R
    dimensions and V spreads it over all d, so each trained weight gets sqrt(D / d) of it on average)."""
    if not 0 < noise_share <= 1:
        raise ValueError(f"noise_share = D / d must be in (0, 1], got {noise_share}")
    return noise_multiplier * clip_norm / expected_batch_size * math.sqrt(noise_share)


def default_lr(*, noise_multiplier: float, clip_norm: float, expected_batch_size: float, steps: int,
               momentum: float = DEFAULT_MOMENTUM, tau: float = LR_NOISE_TAU, noise_share: float = 1.0) -> float:
    """The initial learning rate of the rule above (for SGD with this momentum; the poly schedule decays it)."""
    if steps < 1 or not 0 <= momentum < 1:
        raise ValueError(f"default_lr needs steps >= 1 and 0 <= momentum < 1, got steps={steps}, momentum={momentum}")
    noise = noise_per_coordinate(noise_multiplier=noise_multiplier, clip_norm=clip_norm,
                                 expected_batch_size=expected_batch_size, noise_share=noise_share)
    lo, hi = LR_EFF_MIN / clip_norm, LR_EFF_MAX / clip_norm
    lr_eff = min(max(tau / (noise * math.sqrt(steps)), lo), hi) if noise > 0 else hi  # tau * qN / (sigma C sqrt(T))
    return (1.0 - momentum) * lr_eff


def finetune_lr(*, noise_multiplier: float, clip_norm: float, expected_batch_size: float, steps: int,
                weight_rms: float | None, momentum: float = DEFAULT_MOMENTUM, drift: float = FINETUNE_DRIFT,
                noise_share: float = 1.0) -> float:
    """The initial learning rate for fine-tuning from public weights whose trained parameters have RMS `weight_rms`:
    lr = (1 - beta) * drift * weight_rms / (n * sqrt(T)), never above the from-scratch default_lr, n the noise per
    trained coordinate (noise_per_coordinate, with the noise's share of the dimensions). No trained weight from the
    public file (weight_rms None: e.g. only new segmentation heads train): the from-scratch rule. The weights are
    public, so the rule costs no privacy."""
    scratch = default_lr(noise_multiplier=noise_multiplier, clip_norm=clip_norm, expected_batch_size=expected_batch_size,
                         steps=steps, momentum=momentum, noise_share=noise_share)
    if weight_rms is None:
        return scratch
    noise = noise_per_coordinate(noise_multiplier=noise_multiplier, clip_norm=clip_norm,
                                 expected_batch_size=expected_batch_size, noise_share=noise_share)
    if noise <= 0 or not weight_rms > 0:
        return scratch
    return min(scratch, (1.0 - momentum) * drift * weight_rms / (noise * math.sqrt(steps)))
