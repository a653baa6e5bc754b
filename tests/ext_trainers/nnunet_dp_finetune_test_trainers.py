"""Test-only public (non-DP) trainer: nnU-Net's own trainer for 1 epoch of 2 iterations, with BatchNorm as public
nnU-Net models often have, to make the checkpoint that a DP fine-tuning starts from (-pretrained_weights)."""
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_DPTestPublicBN(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 (nnU-Net's exact signature)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 1, 2, 1
        self.configuration_manager.network_arch_init_kwargs["norm_op"] = "torch.nn.BatchNorm2d"
