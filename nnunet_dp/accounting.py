"""Privacy accounting: a thin wrapper over opacus accountants, with a ledger that round-trips through checkpoints.

The accountant is always named explicitly (RDP by default). The ledger holds the accountant's history
[(sigma, q, steps), ...], so the epsilon reported after any number of resumes covers every step that ran.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from nnunet_dp.config import AccountantName
from nnunet_dp.errors import DPConfigError, DPLedgerError

LEDGER_VERSION = 1


def epsilon_of(history: Sequence[tuple[float, float, int]], *, delta: float,
               accountant: AccountantName = "rdp") -> float:
    """epsilon of a composition [(sigma, q, steps), ...] of Poisson-subsampled Gaussian steps (opacus)."""
    history = [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0]
    if not history:
        return 0.0
    acc = create_accountant(accountant)
    acc.history = history
    return float(acc.get_epsilon(delta=delta))


def epsilon_for(*, noise_multiplier: float, sampling_rate: float, steps: int, delta: float,
                accountant: AccountantName = "rdp") -> float:
    """epsilon after `steps` Poisson-subsampled Gaussian steps (opacus)."""
    return epsilon_of([(noise_multiplier, sampling_rate, steps)], delta=delta, accountant=accountant)


def calibrate_noise(*, target_epsilon: float, delta: float, sampling_rate: float, steps: int,
                    accountant: AccountantName = "rdp") -> float:
    """Smallest sigma (opacus binary search, tolerance 0.01) whose epsilon after `steps` is <= target."""
    try:
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sampling_rate, steps=steps, accountant=accountant))
    except ValueError as e:
        raise DPConfigError("target_epsilon", target_epsilon, f"a budget reachable with sigma <= 1e6 for q = "
                            f"{sampling_rate:.4g} and {steps} steps ({e})") from e


def max_steps_within(*, target_epsilon: float, noise_multiplier: float, sampling_rate: float, delta: float,
                     accountant: AccountantName = "rdp", upper: int = 10_000_000,
                     prior: Sequence[tuple[float, float, int]] = ()) -> int:
    """Largest number of steps (after the steps in `prior`) whose total epsilon is <= target_epsilon (binary search;
    epsilon grows with steps). 0 when `prior` alone already reaches the target."""
    def fits(n: int) -> bool:
        return epsilon_of([*prior, (noise_multiplier, sampling_rate, n)], delta=delta,
                          accountant=accountant) <= target_epsilon

    if not fits(0):
        return 0
    lo, hi = 0, 1
    while hi < upper and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, upper)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


class PrivacyLedger:
    """Steps taken so far, through an opacus accountant; serialisable into a checkpoint."""

    def __init__(self, *, accountant: AccountantName, delta: float) -> None:
        self.accountant_name: AccountantName = accountant
        self.delta = delta
        self._acc = create_accountant(accountant)

    @property
    def steps(self) -> int:
        return sum(int(n) for _, _, n in self._acc.history)

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return [(float(s), float(q), int(n)) for s, q, n in self._acc.history]

    def step(self, *, noise_multiplier: float, sampling_rate: float) -> None:
        self._acc.step(noise_multiplier=noise_multiplier, sample_rate=sampling_rate)

    def epsilon(self) -> float:
        return float(self._acc.get_epsilon(delta=self.delta)) if self._acc.history else 0.0

    def set_history(self, history: Sequence[tuple[float, float, int]]) -> None:
        """Replace the steps known so far (e.g. by the folder's journal, which also knows crashed steps)."""
        self._acc.history = [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0]

    def state_dict(self) -> dict[str, Any]:
        return {"version": LEDGER_VERSION, "accountant": self.accountant_name, "delta": self.delta,
                "history": self.history}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any] | None, *, accountant: AccountantName,
                        delta: float) -> PrivacyLedger:
        """Restore; a missing ledger or one made with another accountant/delta is an error, never a reset."""
        if not state or "history" not in state:
            raise DPLedgerError("The checkpoint has no privacy ledger (key 'dp_state'; not written by a DP trainer). "
                                "Resuming would restart the "
                                "privacy accounting at zero and under-report epsilon. Start a new training "
                                "(without --c) in a fresh output folder, or resume from the checkpoint written by "
                                "the DP trainer.")
        for key, mine in (("accountant", accountant), ("delta", delta)):
            if state.get(key) != mine:
                raise DPLedgerError(f"The checkpoint's privacy ledger was made with {key}={state.get(key)!r} but "
                                    f"this run uses {key}={mine!r}. Keep the settings of the original run to "
                                    f"resume (nnUNet_dp_config), or start a new training.")
        ledger = cls(accountant=accountant, delta=delta)
        ledger._acc.history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]
        return ledger
