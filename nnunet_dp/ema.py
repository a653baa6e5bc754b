"""Exponential moving average (EMA) of the trained parameters, updated after every optimizer step.

    e_0 = theta_0,    e_t = d * e_{t-1} + (1 - d) * theta_t        (d = setting `ema_decay`, in (0, 1))

so that e_t = d^t theta_0 + (1 - d) sum_{k=1..t} d^(t-k) theta_k (Polyak & Juditsky 1992; for DP-SGD, De et al. 2022,
"Unlocking high-accuracy differentially private image classification through scale", sec. 3.3). The average is
computed from the released (noised) weights only: post-processing, it costs no privacy. Only trained parameters
(requires_grad, floating point) are averaged; frozen ones and buffers are the same in both weight sets.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from nnunet_dp.errors import DPCheckpointError, DPConfigError


def check_decay(decay: Any) -> float:
    bad = isinstance(decay, bool) or not isinstance(decay, (int, float)) or not math.isfinite(decay)
    if bad or not 0 < decay < 1:
        raise DPConfigError("ema_decay", decay, "a number in (0, 1) (e.g. 0.999: an average over ~1/(1-d) = 1000 "
                            "steps) or null (off)")
    return float(decay)


def averaged_names(model: nn.Module) -> list[str]:
    """The parameters the EMA follows: trained (requires_grad) floating-point parameters, in model order."""
    return [n for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()]


class ParameterEMA:
    """The average of one model's trained parameters. `weights` gives a full state_dict with the average in place
    of the trained parameters (for a checkpoint); `applied` swaps the average into the model for a while."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = check_decay(decay)
        self.names = averaged_names(model)
        params = dict(model.named_parameters())
        self.shadow: dict[str, torch.Tensor] = {n: params[n].detach().clone() for n in self.names}
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """e <- d e + (1 - d) theta, after an optimizer step."""
        params = dict(model.named_parameters())
        shadow = [self.shadow[n] for n in self.names]
        torch._foreach_mul_(shadow, self.decay)
        torch._foreach_add_(shadow, [params[n].detach() for n in self.names], alpha=1.0 - self.decay)
        self.updates += 1

    def weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's state_dict with the average in place of the trained parameters, under every key that names
        them (by identity: nnU-Net's networks hold each conv and norm twice, e.g. `convs.0.conv.weight` and
        `convs.0.all_modules.0.weight`; load_state_dict would otherwise overwrite the average with the alias)."""
        params = dict(model.named_parameters())
        average = {id(params[n]): self.shadow[n] for n in self.names}
        return {k: average.get(id(v), v.detach()) for k, v in model.state_dict(keep_vars=True).items()}

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the average into the model's parameters (in place: optimizers keep their references)."""
        params = dict(model.named_parameters())
        for n in self.names:
            params[n].copy_(self.shadow[n])

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """The model holds the average inside the block and exactly its own weights again afterwards."""
        params = dict(model.named_parameters())
        raw = {n: params[n].detach().clone() for n in self.names}
        self.copy_to(model)
        try:
            yield
        finally:
            with torch.no_grad():
                for n in self.names:
                    params[n].copy_(raw[n])

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "shadow": {n: t.clone() for n, t in self.shadow.items()}}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue a saved average (a resume): same decay, same averaged parameters."""
        if not _same_decay(state.get("decay"), self.decay):
            raise DPConfigError("ema_decay", self.decay, f"the value the checkpoint's average was made with "
                                f"({state.get('decay')!r}) when resuming it; restore it or start without --c")
        shadow = state.get("shadow") or {}
        missing = [n for n in self.names if n not in shadow]
        if missing:
            raise DPCheckpointError(f"the checkpoint's EMA weights lack {len(missing)} of the {len(self.names)} "
                                    f"trained parameters (e.g. {missing[0]!r}): it was trained with another "
                                    "'trainable' setting or network")
        for n in self.names:
            if shadow[n].shape != self.shadow[n].shape:
                raise DPCheckpointError(f"the checkpoint's EMA weight {n!r} has shape {tuple(shadow[n].shape)}, "
                                        f"the network {tuple(self.shadow[n].shape)}")
            self.shadow[n].copy_(shadow[n])
        self.updates = int(state.get("updates", 0))


def applied(ema: ParameterEMA | None, model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """`ema.applied(model)`, or nothing when the EMA is off."""
    return contextlib.nullcontext() if ema is None else ema.applied(model)


def _same_decay(a: Any, b: float) -> bool:
    return isinstance(a, (int, float)) and abs(float(a) - b) <= 1e-12
