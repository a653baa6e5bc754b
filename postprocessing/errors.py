"""User-facing DP-Morph errors: each says the setting (or folder), the value seen and what is allowed."""
from __future__ import annotations

from typing import Any

from nnunet_dp.errors import DPError


class DPMorphError(DPError, ValueError):
    """A DP-Morph setting or input has a bad value."""

    def __init__(self, setting: str, value: Any, allowed: str, fix: str = "") -> None:
        self.setting, self.value, self.allowed = setting, value, allowed
        self.fix = fix
        message = f"DP-Morph: {setting} = {value!r} is not allowed: expected {allowed}."
        super().__init__(message + (f" {fix}" if fix else ""))

    def __reduce__(self) -> tuple:
        # keeps the error intact when it is raised in a worker process (-np > 1) and sent back
        return type(self), (self.setting, self.value, self.allowed, self.fix)
