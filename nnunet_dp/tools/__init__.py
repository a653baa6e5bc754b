"""What the nnUNetv2_dp_* programs do with nnU-Net datasets, trained folders and models (advise, alignment,
benchmark, audits, plans, export, the demo's pipeline): library functions on top of the integration (nnunet_dp.nnunet)
and the core. Imported by the commands and the experiment harness, never by the integration or the core."""
