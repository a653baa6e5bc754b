"""nnUNetv2_dp_audit: membership inference (`mia`) and the one-run canary audit (`one-run`) of a trained fold.

cli.py         the command: parser, subcommands, the mia report
locate.py      dataset, model and fold folders from -d -c -f -tr -p; input errors
membership.py  mia's data path: members / non-members, each case's loss and Dice under nnU-Net's predictor
one_run.py     one-run: the core audit (nnunet_dp.audit) at the settings of the fold's privacy.json
outputs.py     the per-case CSV and the PNG plots
"""
