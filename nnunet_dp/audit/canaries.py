"""White-box "Dirac" gradient canaries run through the training step itself, and a complete one-run audit.

Steinke, Nasr, Jagielski (NeurIPS 2023), Algorithm 1 with gradient canaries (their white-box DP-SGD audit): m canaries,
each a fixed vector supported on its own random set of coordinates of the flattened trained parameters (disjoint sets,
so canaries do not see each other), included independently with probability 1/2. A canary's norm n is chosen so that the rule's
scaled norm s(n) * n reaches the sensitivity Delta (= C) as closely as the rule allows (`canary_norm`): n = C for flat;
the others reach C only as n -> infinity, so n is the closed-form norm that reaches CANARY_FRACTION * C. An included
canary is a training case like any other: Poisson-sampled with rate q at every step, and its per-case gradient goes
through the product's own path, `DPRun.private_step` (per-case engine -> rule scale -> sum -> one noise draw -> / qN ->
.grad) and the accountant; nothing of it is re-implemented here.

The audit run is a pure-gradient-canary run (no real data): the trained "model" is a parameter vector theta of
`num_params` entries (a bias-free nn.Linear(num_params, 1)), a canary case is the input row x = its canary vector and
the per-case loss is <theta, x>, so the per-case gradient is exactly the canary vector. The expected batch size is
q * m (population: the m potential canaries; a public constant, as qN in training). Plain SGD with lr 1 applies each
privatised gradient, so theta_T - theta_0 = -(sum of privatised gradients).

Scores (higher = "in"): 'final' is <-(theta_T - theta_0), u_c> with u_c the canary's unit direction (the final model
update alone). 'per_step' (default) is the white-box attack on every intermediate update g_t: the sum over steps of the
log-likelihood ratio of the projection <g_t, u_c> under "canary in" (Poisson-subsampled, size a = s(n) n / qN with n the
canary norm) vs "out", with each step's noise level read from the update itself (a robust MAD estimate over all
coordinates, so the auditor assumes nothing about the noise the code adds). DP-SGD's accountant covers the release of
every intermediate update, so any function of them is a valid attack. 'per_step' is much stronger than 'final' and also
sees steps whose noise is missing (e.g. skipped on some batches), which the final update alone averages away.
"""
from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from nnunet_dp.accounting import calibrate_noise, epsilon_for
from nnunet_dp.audit.estimator import audit_from_scores
from nnunet_dp.config import ACCOUNTANTS, AccountantName
from nnunet_dp.errors import DPConfigError
from nnunet_dp.noise import stream_seed
from nnunet_dp.per_sample import trainable_parameters
from nnunet_dp.rules import RULE_NAMES, RuleName, ScalingRule, make_rule
from nnunet_dp.run import DPPlan, DPRun
from nnunet_dp.sampling import poisson_sample

ScoreName = Literal["per_step", "final"]
SCORES: tuple[str, ...] = ("per_step", "final")
_SOURCE = "the one-run audit's arguments"
MAD_TO_STD = 1.4826  # std of a normal distribution = 1.4826 * its median absolute deviation
NOISE_FLOOR = 1e-3  # a step's noise scale counts as at least this fraction of the median step's
CANARY_FRACTION = 1 - 1e-6  # a canary's scaled norm s(n) * n reaches this fraction of Delta (canary_norm)


@dataclass(frozen=True)
class DiracCanaries:
    """m canaries over `num_params` flattened parameters: canary c is `values[c]` at coordinates `coords[c]`."""

    coords: torch.Tensor  # (m, k) int64, all m*k coordinates distinct
    values: torch.Tensor  # (m, k) float64, every row of L2 norm `norm`
    included: torch.Tensor  # (m,) bool, each True with probability 1/2
    num_params: int
    norm: float

    @property
    def num_canaries(self) -> int:
        return int(self.coords.shape[0])

    def gradients(self, index: torch.Tensor, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """(len(index), num_params): the dense canary vectors of the canaries `index`, one row each."""
        rows = torch.zeros(len(index), self.num_params, dtype=dtype)
        return rows.scatter_(1, self.coords[index], self.values[index].to(dtype))


def canary_norm(rule: ScalingRule, *, fraction: float = CANARY_FRACTION) -> float:
    """The canary gradient norm n whose scaled norm s(n) * n is `fraction` * Delta under `rule` (Delta = C; every
    s(n) * n here increases with n, so any larger norm reaches at least as much). Solving s(n) * n = f C:
      flat   min(1, C/n) n = C for every n >= C                          -> n = C (exactly Delta, any f)
      autos  C n / (n + gamma) = f C                                     -> n = f gamma / (1 - f)
      nsgd   C n / (n + r) = f C                                         -> n = f r / (1 - f)
      psac   C n / (n + r / (n + r)) = f C  <=>  (1 - f) n^2 + (1 - f) r n - f r = 0
             -> its positive root n = 2 f r / ((1 - f) r + sqrt((1 - f)^2 r^2 + 4 (1 - f) f r)) (written without the
                cancellation of (-b + sqrt(b^2 - 4ac)) / 2a for f near 1)
    (rules: nnunet_dp/rules.py and docs/how_it_works.md (rules); the rules other than flat reach C only as n -> infinity)."""
    if not 0 < fraction < 1:
        raise DPConfigError("fraction", fraction, "a number in (0, 1), e.g. 0.999", source=_SOURCE)
    c, f, k = float(rule.clip_norm), float(fraction), float(rule.constant or 0.0)
    if rule.name == "flat":
        return c
    if rule.name in ("autos", "nsgd"):
        return f * k / (1 - f)
    return 2 * f * k / ((1 - f) * k + math.sqrt((1 - f) ** 2 * k**2 + 4 * (1 - f) * f * k))


def make_canaries(*, num_canaries: int, num_params: int, norm: float, generator: torch.Generator,
                  coords_per_canary: int = 1) -> DiracCanaries:
    """Disjoint random coordinate sets (k = coords_per_canary each), random signs, L2 norm `norm` per canary,
    inclusion bits Bernoulli(1/2); all drawn from `generator`."""
    m, k = num_canaries, coords_per_canary
    if m * k > num_params:
        raise DPConfigError("num_params", num_params, f">= num_canaries * coords_per_canary = {m * k} (the canaries' "
                            "coordinate sets are disjoint)", source=_SOURCE)
    coords = torch.randperm(num_params, generator=generator)[:m * k].view(m, k)
    signs = torch.randint(0, 2, (m, k), generator=generator).to(torch.float64) * 2 - 1
    included = torch.randint(0, 2, (m,), generator=generator).bool()
    return DiracCanaries(coords, signs * (norm / math.sqrt(k)), included, num_params, float(norm))


def canary_scores(canaries: DiracCanaries, update: torch.Tensor) -> torch.Tensor:
    """<update, u_c> for every canary c (u_c = canary vector / norm); `update` is a flat (num_params,) tensor."""
    picked = update.detach().to(torch.float64).flatten()[canaries.coords]
    return (picked * canaries.values).sum(1) / canaries.norm


def noise_scale(update: torch.Tensor) -> float:
    """Robust std of a flat update's entries (MAD): the noise level of that step, canary coordinates being few."""
    x = update.detach().to(torch.float64).flatten()
    return MAD_TO_STD * float((x - x.median()).abs().median())


def step_noise_floor(noise_scales: np.ndarray, signal: float) -> np.ndarray:
    """Each step's noise scale, at least NOISE_FLOOR times the median step's (or the largest, or `signal`, when that
    is 0): a step without noise then counts as very precise, not as infinitely precise."""
    s = np.asarray(noise_scales, dtype=np.float64)
    ref = next((v for v in (float(np.median(s)), float(s.max(initial=0.0)), signal) if v > 0), 1.0)
    return np.maximum(s, NOISE_FLOOR * ref)


def likelihood_scores(projections: torch.Tensor, noise_scales: np.ndarray, *, signal: float,
                      sampling_rate: float) -> torch.Tensor:
    """(m,) sum over steps of the log-likelihood ratio "canary in" vs "out" of each step's projection x (Poisson-
    subsampled Gaussian, the mechanism's own model): log(1 - q + q exp((x a - a^2 / 2) / s_t^2)), a = `signal` (the
    scaled canary's size in the update) and s_t the step's noise scale as the update shows it."""
    s = torch.from_numpy(step_noise_floor(noise_scales, signal))[:, None]
    log_in = math.log(sampling_rate) + (projections * signal - signal**2 / 2) / s**2
    log_out = torch.log1p(torch.tensor(-sampling_rate, dtype=torch.float64))  # -inf for q = 1: then log_in alone
    return torch.logaddexp(log_out.expand_as(log_in), log_in).sum(0)


def _carrier_loss(output: torch.Tensor, target: Any) -> torch.Tensor:
    """Per-case loss of the carrier: <theta, x>, whose gradient over theta is the canary vector x."""
    return output.sum()


def _is_int(v: Any, lo: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _is_num(v: Any, lo: float, hi: float, *, lo_open: bool = True, hi_open: bool = False) -> bool:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return ok and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)


def _check_audit_args(rule: Any, sampling_rate: Any, steps: Any, num_canaries: Any, noise_multiplier: Any,
                      target_epsilon: Any, delta: Any, clip_norm: Any, accountant: Any, score: Any,
                      coords_per_canary: Any, confidence: Any) -> None:
    sigma_ok = (noise_multiplier is None) != (target_epsilon is None) and (
        noise_multiplier is None or _is_num(noise_multiplier, 0.0, math.inf, lo_open=False))
    checks = [("rule", rule, rule in RULE_NAMES, f"one of {', '.join(RULE_NAMES)}"),
              ("sampling_rate", sampling_rate, _is_num(sampling_rate, 0.0, 1.0), "a number in (0, 1]"),
              ("steps", steps, _is_int(steps, 1), "an integer >= 1"),
              ("num_canaries", num_canaries, _is_int(num_canaries, 1), "an integer >= 1"),
              ("coords_per_canary", coords_per_canary, _is_int(coords_per_canary, 1), "an integer >= 1"),
              ("delta", delta, _is_num(delta, 0.0, 1.0, hi_open=True), "a number in (0, 1)"),
              ("confidence", confidence, _is_num(confidence, 0.0, 1.0, hi_open=True), "a number in (0, 1)"),
              ("clip_norm", clip_norm, _is_num(clip_norm, 0.0, math.inf), "a finite number > 0"),
              ("accountant", accountant, accountant in ACCOUNTANTS, f"one of {', '.join(ACCOUNTANTS)}"),
              ("score", score, score in SCORES, f"one of {', '.join(SCORES)}"),
              ("noise_multiplier", noise_multiplier, sigma_ok,
               "a number >= 0, given exactly when target_epsilon is not (None)"),
              ("target_epsilon", target_epsilon, target_epsilon is None or _is_num(target_epsilon, 0.0, math.inf),
               "None or a finite number > 0")]
    for key, value, ok, allowed in checks:
        if not ok:
            raise DPConfigError(key, value, allowed, source=_SOURCE)


def _check_rule_constant(rule: Any, rule_constant: Any) -> None:
    if rule_constant is not None and (rule == "flat" or not _is_num(rule_constant, 0.0, math.inf)):
        raise DPConfigError("rule_constant", rule_constant, "None for rule flat, else None or a finite number > 0",
                            source=_SOURCE)


def _make_run(*, rule: RuleName, sigma: float, sampling_rate: float, steps: int, num_canaries: int, clip_norm: float,
              delta: float, accountant: AccountantName, seed: int | None, rule_constant: float | None = None) -> DPRun:
    """The product's DPRun for the canary population (N = m; no target epsilon: the audit reports, never stops).
    rule_constant None: the rule's default constant (gamma, r)."""
    constant = make_rule(rule, clip_norm=clip_norm).constant if rule_constant is None else rule_constant
    plan = DPPlan(rule=rule, rule_constant=constant, clip_norm=clip_norm,
                  noise_multiplier=sigma, sampling_rate=sampling_rate, num_training_cases=num_canaries,
                  planned_steps=steps, max_steps=None, target_epsilon=None, delta=delta, accountant=accountant)
    return DPRun(plan, device=torch.device("cpu"), seed=seed, strategy="loop")


def train_with_canaries(run: DPRun, canaries: DiracCanaries, *, steps: int, rng: np.random.Generator,
                        on_step: Callable[[], None] | None = None) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
    """`steps` private SGD steps (lr 1) of the carrier with the included canaries as its cases. Returns each step's
    canary projections (steps, m), each step's noise scale (steps,), and theta_T - theta_0 (num_params,).
    `on_step` (e.g. a progress bar's update) is called after every step."""
    model = nn.Linear(canaries.num_params, 1, bias=False).double()
    nn.init.zeros_(model.weight)
    params = trainable_parameters(model)
    optimizer = torch.optim.SGD(params, lr=1.0)
    members = torch.nonzero(canaries.included).flatten().tolist()
    projections, scales = [], []
    for _ in range(steps):
        batch = poisson_sample(members, sampling_rate=run.plan.sampling_rate, rng=rng)
        data = canaries.gradients(torch.tensor(batch, dtype=torch.long)) if batch else None
        optimizer.zero_grad(set_to_none=True)
        run.private_step(model, _carrier_loss, data, None if data is None else torch.zeros(len(batch)))
        update = params[0].grad.flatten()
        projections.append(canary_scores(canaries, update))
        scales.append(noise_scale(update))
        optimizer.step()
        if on_step is not None:
            on_step()
    return torch.stack(projections), np.asarray(scales), model.weight.detach().flatten().clone()


def run_one_run_audit(*, rule: RuleName, sampling_rate: float, steps: int, num_canaries: int = 1000,
                      noise_multiplier: float | None = None, target_epsilon: float | None = None,
                      delta: float = 1e-5, clip_norm: float = 1.0, accountant: AccountantName = "rdp",
                      coords_per_canary: int = 1, num_params: int | None = None, score: ScoreName = "per_step",
                      confidence: float = 0.95, candidates: list[tuple[int, int]] | None = None,
                      seed: int | None = None, rule_constant: float | None = None,
                      on_step: Callable[[], None] | None = None, return_scores: bool = False) -> dict[str, Any]:
    """Train once with `num_canaries` Dirac canaries through DPRun.private_step, score them, and return the one-run
    lower bound next to the accountant's epsilon for the same sigma, q, steps and delta. Give noise_multiplier or
    target_epsilon (sigma then calibrated by the accountant). seed None: canaries, sampling and noise from OS
    entropy; an int makes the whole audit reproducible (a test mode: the seed is never written anywhere).
    rule_constant: the rule's constant (None: its default); on_step: called after every step; return_scores: also
    return each canary's score and inclusion bit ('scores', 'included': synthetic canaries, no private data)."""
    _check_audit_args(rule, sampling_rate, steps, num_canaries, noise_multiplier, target_epsilon, delta, clip_norm,
                      accountant, score, coords_per_canary, confidence)
    _check_rule_constant(rule, rule_constant)
    sigma = float(noise_multiplier) if noise_multiplier is not None else calibrate_noise(
        target_epsilon=target_epsilon, delta=delta, sampling_rate=sampling_rate, steps=steps, accountant=accountant)
    base = secrets.randbits(63) if seed is None else seed
    run = _make_run(rule=rule, sigma=sigma, sampling_rate=sampling_rate, steps=steps, num_canaries=num_canaries,
                    clip_norm=clip_norm, delta=delta, accountant=accountant, seed=seed, rule_constant=rule_constant)
    gen = torch.Generator().manual_seed(stream_seed(base, 1))
    canaries = make_canaries(num_canaries=num_canaries, num_params=num_params or num_canaries * coords_per_canary,
                             norm=canary_norm(run.rule), generator=gen, coords_per_canary=coords_per_canary)
    projections, scales, change = train_with_canaries(run, canaries, steps=steps,
                                                      rng=np.random.default_rng(stream_seed(base, 2)), on_step=on_step)
    scaled_norm = float(run.rule.scale(torch.tensor(canaries.norm, dtype=torch.float64))) * canaries.norm
    if score == "final":
        scores = canary_scores(canaries, -change).numpy()
    else:
        signal = scaled_norm / run.plan.expected_batch_size
        scores = likelihood_scores(projections, scales, signal=signal, sampling_rate=sampling_rate).numpy()
    result = audit_from_scores(scores, canaries.included.numpy(), delta=delta, confidence=confidence,
                               candidates=candidates)
    epsilon = epsilon_for(noise_multiplier=sigma, sampling_rate=sampling_rate, steps=steps, delta=delta,
                          accountant=accountant)
    return {**result, "epsilon": epsilon, "noise_multiplier": sigma, "sampling_rate": sampling_rate, "steps": steps,
            "rule": rule, "clip_norm": clip_norm, "score": score, "accountant": accountant,
            "num_included": int(canaries.included.sum()), "coords_per_canary": coords_per_canary,
            "rule_constant": run.plan.rule_constant, "canary_norm": canaries.norm,
            "canary_scaled_norm": scaled_norm, "sensitivity": run.rule.sensitivity,
            **({"scores": scores.tolist(), "included": canaries.included.tolist()} if return_scores else {})}
