"""DP-Morph: class-wise morphological refinement stored as nnU-Net postprocessing (nnunet_dp.postprocessing)."""
