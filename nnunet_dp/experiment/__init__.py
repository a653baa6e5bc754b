"""nnUNetv2_dp_experiment: the rules × ε × lr × fine-tuning levers × refinement comparison on one dataset.

main.py       the grid from the command's options (nnunet_dp.commands.experiment parses them)
prepare.py    every check before any work (all problems at once), the resolved budget, the data the runs read
plan.py       budgets, the run grid (rule × ε × lr × levers × repeats), the held-out test split, the mirrored
              preprocessed folder and the budget's plans
levers.py     --trainable, --augmentations-per-case, --ema-decay (checked through DPConfig) and --seeds
budget.py     the budget resolved for the dataset; every run's settings through the trainers' own DPConfig/make_plan
data.py       nnU-Net's plans and preprocessing; --public-fraction's public part and derived datasets
pretrain.py   the public pretraining (--public-fraction) and the checks of --pretrained FILE
grid.py       every run in turn (the public pretraining first), progress and failures
public_alone.py  the public model alone (no private training) scored like a run: what the DP runs start from
run.py        one run: train, predict the test cases, DP-Morph chosen on validation, scores
dpmorph.py    DP-Morph: chosen on validation (privately by default), applied to test, scored; each refined row's
              selection and composed ε (nnunet_dp.tools.morph_selection); whether a finished run must choose again
progress.py   the ETA and the last error of a log
aggregate.py  mean ± sd over repeats, ratio to the non-private reference, the setting chosen on validation
report.py     results.csv and results.md; plots.py its figures
errors.py     ExperimentError (option, value, allowed, fix)
trainers/     nnU-Net trainers only this command uses (its subprocesses add the folder to nnUNet_extTrainer)
"""
