"""Federated DP training of nnU-Net on Flower: several hospitals, one model, each patient protected at their own site.

Each site (a Flower SuperNode beside its own nnUNet_preprocessed) runs nnunet_dp's own DP trainer (nnUNetTrainerDP:
Poisson sampling, per-case clipping, its own Gaussian noise, its own journal and ledger) for a few steps per round and
returns only its noised update, as a Flower ArrayRecord. The server averages the updates. See docs/federated.md.

Flower (flwr, the optional extra ``nnunet-dp[federated]``) is imported only by ``app`` and ``simulate``; splitting,
site training, aggregation and accounting work without it.
"""
from __future__ import annotations

from nnunet_dp.errors import DPError

INSTALL_HINT = "pip install 'nnunet-dp[federated]' (brings flwr[simulation] >= 1.42)"


class FederatedError(DPError, ValueError):
    """A bad federated setting or state: names the setting, the value seen, what is allowed and how to fix it."""

    def __init__(self, key: str, value: object, allowed: str, fix: str = "") -> None:
        self.key, self.value, self.allowed, self.fix = key, value, allowed, fix
        super().__init__(f"federated setting '{key}' = {value!r} is not allowed: {allowed}." + (f" {fix}" if fix else ""))


def require_flwr() -> None:
    """Stop with the install command when Flower is missing."""
    try:
        import flwr  # noqa: F401
    except ImportError as e:
        raise ImportError(f"The federated commands need Flower: {INSTALL_HINT}") from e
