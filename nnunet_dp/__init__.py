"""nnunet-dp core: differentially private per-case gradient steps and accounting.

This package never imports nnunetv2; the nnU-Net integration lives in ``nnunet_dp.nnunet``.
"""
__version__ = "0.1.0"
