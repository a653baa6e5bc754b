"""DP trainer declarations, found by nnU-Net through nnUNet_extTrainer (see nnunet_dp.trainer_folder)."""
