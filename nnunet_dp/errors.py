"""Typed user-facing errors. Each message says what was wrong, the value seen, what is allowed and how to fix it."""
from __future__ import annotations

from typing import Any


class DPError(Exception):
    """Base class of every error nnunet-dp raises on purpose."""


class DPConfigError(DPError, ValueError):
    """A setting (from the nnUNet_dp_config JSON, a class attribute or an argument) has a bad value."""

    def __init__(self, key: str, value: Any, allowed: str, source: str = "nnUNet_dp_config", fix: str = "") -> None:
        self.key, self.value, self.allowed, self.source, self.fix = key, value, allowed, source, fix
        super().__init__(f"DP setting '{key}' = {value!r} (from {source}) is not allowed: {allowed}."
                         + (f" {fix}" if fix else ""))


class DPModelError(DPError):
    """The network cannot be trained privately (a layer couples samples, a parameter is frozen, ...)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n  - ".join(problems)
        super().__init__(f"The network cannot be trained with per-case differential privacy:\n  - {lines}")


class DPLedgerError(DPError):
    """The privacy ledger in a checkpoint is missing or does not match the current run."""


class DPBudgetExhausted(DPError):
    """Another step would spend more than the privacy budget."""


class DPDivergedError(DPError):
    """Most sampled cases had a non-finite gradient or loss: the data hold NaN/inf or the training diverged."""


class DPCheckpointError(DPError):
    """A checkpoint cannot be read or does not fit this training."""


class DPDataError(DPError):
    """The training data hold values the dataset does not allow (e.g. labels outside dataset.json's classes)."""
