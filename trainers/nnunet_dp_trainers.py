"""DP trainer declarations for nnU-Net (nnUNet_extTrainer points at this folder). Class declarations only."""
from typing import ClassVar

from nnunet_dp.nnunet.trainer import nnUNetTrainerDP


class nnUNetTrainerDP_AutoS(nnUNetTrainerDP):
    dp_rule = "autos"


class nnUNetTrainerDP_NSGD(nnUNetTrainerDP):
    dp_rule = "nsgd"


class nnUNetTrainerDP_PSAC(nnUNetTrainerDP):
    dp_rule = "psac"


class nnUNetTrainerDP_eps1(nnUNetTrainerDP):
    dp_defaults: ClassVar[dict[str, float]] = {"target_epsilon": 1.0}


class nnUNetTrainerDP_PSAC_eps1(nnUNetTrainerDP_PSAC):
    dp_defaults: ClassVar[dict[str, float]] = {"target_epsilon": 1.0}


__all__ = [
    "nnUNetTrainerDP",
    "nnUNetTrainerDP_AutoS",
    "nnUNetTrainerDP_NSGD",
    "nnUNetTrainerDP_PSAC",
    "nnUNetTrainerDP_PSAC_eps1",
    "nnUNetTrainerDP_eps1",
]
