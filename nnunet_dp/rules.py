"""Per-case scaling rules: s(||g||) applied to each case's gradient before summation, and their sensitivity.

Each rule is a pure function of the per-case gradient norms (a tensor) and keyword-only constants. Every rule
here guarantees ||s(||g||) * g|| <= sensitivity, so Gaussian noise with std sigma * sensitivity gives DP.
Formulas (docs/how_it_works.md, the trainers table):
  flat   (Abadi et al., CCS 2016)             s = min(1, C / ||g||)            Delta = C
  autos  (Bu et al., NeurIPS 2023, Auto-S)     s = C / (||g|| + gamma)          Delta = C
  nsgd   (Yang et al., 2022, NSGD)             s = C / (||g|| + r)              Delta = C
  psac   (Xia et al., AAAI 2023, PSAC)         s = C / (||g|| + r / (||g|| + r)) Delta = C
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

RuleName = Literal["flat", "autos", "nsgd", "psac"]


def flat_scale(norms: torch.Tensor, *, clip_norm: float) -> torch.Tensor:
    """Abadi et al. 2016: min(1, C/||g||); a zero gradient keeps scale 1."""
    return torch.clamp(clip_norm / norms.clamp_min(torch.finfo(norms.dtype).tiny), max=1.0)


def autos_scale(norms: torch.Tensor, *, clip_norm: float, gamma: float) -> torch.Tensor:
    """Bu et al. 2023 (automatic clipping, Auto-S): C / (||g|| + gamma)."""
    return clip_norm / (norms + gamma)


def nsgd_scale(norms: torch.Tensor, *, clip_norm: float, r: float) -> torch.Tensor:
    """Yang et al. 2022 (normalised SGD): the paper's 1/(||g|| + r), times C so that Delta = C."""
    return clip_norm / (norms + r)


def psac_scale(norms: torch.Tensor, *, clip_norm: float, r: float) -> torch.Tensor:
    """Xia et al. 2023 (per-sample adaptive clipping): C / (||g|| + r / (||g|| + r))."""
    return clip_norm / (norms + r / (norms + r))


@dataclass(frozen=True)
class ScalingRule:
    """A named rule with its constants bound: ``rule.scale(norms)`` and ``rule.sensitivity``."""

    name: RuleName
    clip_norm: float
    constant: float | None = None

    def scale(self, norms: torch.Tensor) -> torch.Tensor:
        fn, const_name = _RULES[self.name]
        kwargs = {const_name: self.constant} if const_name else {}
        return fn(norms, clip_norm=self.clip_norm, **kwargs)

    @property
    def sensitivity(self) -> float:
        """L2 sensitivity of the sum of scaled per-case gradients to adding/removing one case (= C for all)."""
        return float(self.clip_norm)


_RULES: dict[str, tuple[Callable[..., torch.Tensor], str | None]] = {
    "flat": (flat_scale, None),
    "autos": (autos_scale, "gamma"),
    "nsgd": (nsgd_scale, "r"),
    "psac": (psac_scale, "r"),
}
RULE_NAMES: tuple[str, ...] = tuple(_RULES)


def make_rule(name: RuleName, *, clip_norm: float, autos_gamma: float = 0.01, nsgd_r: float = 0.1,
              psac_r: float = 0.1) -> ScalingRule:
    """Bind a rule's constants by name; unknown names raise ValueError listing the known ones."""
    if name not in _RULES:
        raise ValueError(f"Unknown scaling rule {name!r}; known rules: {', '.join(RULE_NAMES)}.")
    constant = {"flat": None, "autos": autos_gamma, "nsgd": nsgd_r, "psac": psac_r}[name]
    return ScalingRule(name=name, clip_norm=clip_norm, constant=constant)
