"""nnUNetv2_dp_experiment's error: the option, the value seen, what is allowed and the fix."""
from __future__ import annotations

from typing import Any

from nnunet_dp.errors import DPError


class ExperimentError(DPError, ValueError):
    """A bad option or input of nnUNetv2_dp_experiment: the option, the value seen and what is allowed."""

    def __init__(self, option: str, value: Any, allowed: str, fix: str = "") -> None:
        self.option, self.value, self.allowed, self.fix = option, value, allowed, fix
        super().__init__(f"{option} = {value!r} is not allowed: expected {allowed}." + (f" {fix}" if fix else ""))

    def __reduce__(self) -> tuple:
        return type(self), (self.option, self.value, self.allowed, self.fix)
