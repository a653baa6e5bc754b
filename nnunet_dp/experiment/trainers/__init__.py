"""Trainers that only nnUNetv2_dp_experiment uses (its subprocesses add this folder to nnUNet_extTrainer)."""
