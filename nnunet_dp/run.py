"""DPRun: the state of one private training run (rule, sigma, q, ledger, noise generator) and its step.

Framework-agnostic: the nnU-Net trainer owns a DPRun and calls ``private_step`` from its train_step.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nnunet_dp.accounting import PrivacyLedger, calibrate_noise, epsilon_for, max_steps_within
from nnunet_dp.config import DPConfig
from nnunet_dp.errors import DPLedgerError
from nnunet_dp.journal import History, StepJournal, total_steps
from nnunet_dp.noise import make_generator, stream_seed
from nnunet_dp.per_sample import LossFn, ScaledSum, Target, choose_strategy, scaled_sum, trainable_parameters
from nnunet_dp.projection import Projection
from nnunet_dp.rules import RuleName, make_rule
from nnunet_dp.step import privatize_, write_grads_

# Settings that must not change between an interrupted run and its resumption.
_RESUME_KEYS = ("rule", "noise_multiplier", "sampling_rate", "num_training_cases", "clip_norm", "accountant",
                "delta", "rule_constant", "target_epsilon")


@dataclass(frozen=True)
class DPPlan:
    """Everything fixed before the first step."""

    rule: RuleName
    rule_constant: float | None
    clip_norm: float
    noise_multiplier: float
    sampling_rate: float
    num_training_cases: int
    planned_steps: int
    max_steps: int | None  # None: no target epsilon, only reporting
    target_epsilon: float | None
    delta: float
    accountant: str

    @property
    def expected_batch_size(self) -> float:
        return self.sampling_rate * self.num_training_cases


def calibrate(cfg: DPConfig, *, num_training_cases: int, plans_batch_size: int) -> tuple[float, float, int]:
    """(q, sigma, planned steps) after the checks that need N: sigma calibrated from the target epsilon over all
    planned steps, or the given noise_multiplier. The advisor (nnunet_dp.advise) calls this too."""
    cfg.check_against_dataset(num_training_cases, plans_batch_size)
    q = cfg.sampling_rate_for(num_training_cases, plans_batch_size)
    steps = cfg.num_epochs * cfg.num_iterations_per_epoch
    sigma = cfg.noise_multiplier if cfg.noise_multiplier is not None else calibrate_noise(
        target_epsilon=cfg.target_epsilon, delta=cfg.delta, sampling_rate=q, steps=steps, accountant=cfg.accountant)
    return q, float(sigma), steps


def make_plan(cfg: DPConfig, *, rule: RuleName, num_training_cases: int, plans_batch_size: int) -> DPPlan:
    """Calibrate sigma (`calibrate`) and find the step limit within the target epsilon."""
    q, sigma, steps = calibrate(cfg, num_training_cases=num_training_cases, plans_batch_size=plans_batch_size)
    max_steps = None if cfg.target_epsilon is None else max_steps_within(
        target_epsilon=cfg.target_epsilon, noise_multiplier=sigma, sampling_rate=q, delta=cfg.delta,
        accountant=cfg.accountant, upper=max(steps, 1) * 64)
    bound = make_rule(rule, clip_norm=cfg.clip_norm, autos_gamma=cfg.autos_gamma, nsgd_r=cfg.nsgd_r,
                      psac_r=cfg.psac_r)
    return DPPlan(rule=rule, rule_constant=bound.constant, clip_norm=cfg.clip_norm, noise_multiplier=float(sigma),
                  sampling_rate=q, num_training_cases=num_training_cases, planned_steps=steps, max_steps=max_steps,
                  target_epsilon=cfg.target_epsilon, delta=cfg.delta, accountant=cfg.accountant)


class DPRun:
    """One private run. The noise generator is made from fresh OS entropy every time a DPRun is made (every start
    and every resume): noise is never restored from a checkpoint, so it is never replayed (docs/invariants.md, invariant 5).
    With an explicit seed ("reproducible, not private") it is seeded from the seed and the number of steps already
    taken, so a resumed run does not replay the noise of the steps it repeats either."""

    def __init__(self, plan: DPPlan, *, device: torch.device, seed: int | None, strategy: str = "auto") -> None:
        self.plan = plan
        self.rule = make_rule(plan.rule, clip_norm=plan.clip_norm,
                              **({} if plan.rule_constant is None else {_CONST[plan.rule]: plan.rule_constant}))
        self.ledger = PrivacyLedger(accountant=plan.accountant, delta=plan.delta)  # type: ignore[arg-type]
        self.seed = seed
        self.generator = make_generator(device, seed)
        self.strategy = choose_strategy(strategy, device=device)
        self.last: ScaledSum | None = None
        self.journal: StepJournal | None = None
        self.projection: Projection | None = None  # setting projection: public (set before the first step)
        self._step_limit = plan.max_steps  # total steps allowed (None: no target epsilon)

    @property
    def steps(self) -> int:
        return self.ledger.steps

    def can_step(self) -> bool:
        """False once one more step would spend more than the target epsilon."""
        return self._step_limit is None or self.steps < self._step_limit

    def attach_journal(self, journal: StepJournal | None, history: History) -> None:
        """Continue from `history`, every step that ever ran in the output folder (the journal's, or the
        checkpoint's where that knows more); from now on each step is journaled before its noise is drawn. Ranks
        that do not write files pass journal=None with rank 0's history."""
        p = self.plan
        self.ledger.set_history(history)
        self.journal = journal
        if p.target_epsilon is not None:
            same = all((s, q) == (p.noise_multiplier, p.sampling_rate) for s, q, _ in history)
            self._step_limit = p.max_steps if same else total_steps(history) + max_steps_within(
                target_epsilon=p.target_epsilon, noise_multiplier=p.noise_multiplier, sampling_rate=p.sampling_rate,
                delta=p.delta, accountant=p.accountant, prior=history, upper=max(p.planned_steps, 1) * 64)
        if self.seed is not None:
            self.generator.manual_seed(stream_seed(self.seed, self.steps))
        if journal is not None:
            journal.start_session(noise_multiplier=p.noise_multiplier, sampling_rate=p.sampling_rate,
                                  steps_before=self.steps, rule=p.rule, clip_norm=p.clip_norm,
                                  private_randomness=self.seed is None)

    def epsilon(self) -> float:
        return self.ledger.epsilon()

    def projected_epsilon(self) -> float:
        """epsilon after all planned steps (what the run was calibrated for)."""
        return epsilon_for(noise_multiplier=self.plan.noise_multiplier, sampling_rate=self.plan.sampling_rate,
                           steps=self.plan.planned_steps, delta=self.plan.delta,
                           accountant=self.plan.accountant)  # type: ignore[arg-type]

    def private_step(self, model: nn.Module, loss_fn: LossFn, data: torch.Tensor | None, target: Target | None,
                     autocast: Callable[[], Any] = torch.enable_grad, *, group: int = 1) -> ScaledSum:
        """Per-case gradients -> rule -> sum -> noise once -> / qN, written into .grad; one ledger step.
        group: patches per case (augmentations_per_case); the batch holds them case-major (see scaled_sum)."""
        if not self.can_step():
            raise DPLedgerError(f"privacy budget exhausted: {self.steps} steps already reach the target epsilon "
                                f"{self.plan.target_epsilon}")
        result = scaled_sum(model, loss_fn, data, target, self.rule, strategy=self.strategy, autocast=autocast,
                            group=group)
        if self.journal is not None:
            self.journal.record_step()  # write-ahead: synced before the noise is drawn
        summed = [g.float() if g.dtype in (torch.float16, torch.bfloat16) else g for g in result.grads]
        privatize_(summed, noise_multiplier=self.plan.noise_multiplier, sensitivity=self.rule.sensitivity,
                   expected_batch_size=self.plan.expected_batch_size, generator=self.generator,
                   projection=self.projection)
        write_grads_(trainable_parameters(model), summed)
        self.ledger.step(noise_multiplier=self.plan.noise_multiplier, sampling_rate=self.plan.sampling_rate)
        self.last = result
        return result

    def state_dict(self) -> dict[str, Any]:
        """Plan and ledger; never the noise generator's state (it could regenerate the noise)."""
        return {"plan": self.plan.__dict__.copy(), "ledger": self.ledger.state_dict()}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore the ledger. Missing or inconsistent state is an error, never a reset. A noise generator state in
        an older checkpoint is ignored: noise is always fresh after a resume."""
        if not state or "ledger" not in state:
            self.ledger = PrivacyLedger.from_state_dict(None, accountant=self.plan.accountant,  # raises
                                                        delta=self.plan.delta)  # type: ignore[arg-type]
        saved = state.get("plan", {})
        diffs = [f"{k}: checkpoint {saved.get(k)!r} != now {getattr(self.plan, k)!r}" for k in _RESUME_KEYS
                 if not _same(saved.get(k), getattr(self.plan, k))]
        if diffs:
            raise DPLedgerError("The checkpoint was trained with other DP settings; resuming would mix them:\n  "
                                + "\n  ".join(diffs) + "\nRestore the original nnUNet_dp_config to resume, or start "
                                "a new training without --c.")
        self.ledger = PrivacyLedger.from_state_dict(state["ledger"], accountant=self.plan.accountant,  # type: ignore
                                                    delta=self.plan.delta)


_CONST = {"autos": "autos_gamma", "nsgd": "nsgd_r", "psac": "psac_r"}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(b)))
    return a == b


def dp_autocast(device: torch.device) -> Callable[[], Any]:
    """The DP step's autocast: bf16 on CUDA (no GradScaler: per-case norms must be unscaled), none elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext
