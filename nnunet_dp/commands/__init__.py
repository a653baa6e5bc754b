"""One module per nnUNetv2_dp_* program: each a thin argument parser that calls library functions (nnunet_dp.tools,
nnunet_dp.experiment, the integration and the core). Nothing below imports this package."""
