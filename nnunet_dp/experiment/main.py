"""nnUNetv2_dp_experiment: the rules × ε × lr × fine-tuning levers × refinement comparison on one dataset, with a
held-out test split.

    nnUNetv2_dp_experiment -d 902 -c 2d --budget tiny -o exp902

holds out a seeded test split of the raw training cases, trains the non-private reference and each (rule, ε) under
the same budget on the rest (fold 0 of the experiment's own splits_final.json), chooses DP-Morph on the validation
predictions only (privately: ε_select = 1 per choice unless --epsilon-select, added to each refined row's ε; or
--dpmorph-selection nonprivate, labelled "selection not private"), applies it to the test predictions and scores all
on test. Writes OUT/results.csv, results.md and
PNG plots. Finished runs (OUT/runs/<name>/result.json) are skipped; an interrupted training resumes with --c.
--seed seeds the split only: the DP runs draw their noise and sampling from fresh OS entropy, unless --reproducible
seeds them too (repeatable, not private; the results tables say so). DP runs use the DP trainers' default learning
rate (nnunet_dp.optim.default_lr); --lrs LR ... trains each (rule, ε) once more per LR, and the report marks the lr
with the best validation Dice (a choice on private cases: not private).

Fine-tuning (issue 11; none of it costs privacy): --public-fraction F draws a seeded public part of the non-test cases,
trains nnU-Net's ordinary trainer on it once (the budget's epochs, or --public-epochs E) and fine-tunes every run from
it with its plans on the private rest (data.py, pretrain.py); --pretrained FILE fine-tunes every run from a given
checkpoint; --trainable, --augmentations-per-case and --ema-decay add the DP runs' levers (their cross product per
rule, ε and lr; levers.py); --reference-trainable norm_bias adds a non-private reference that trains only that subset
(the ordinary reference stays the one ratios divide by); --seeds K repeats every run K times and the tables show
mean ± sd.

Before anything is preprocessed or trained the whole grid is checked (prepare.py, budget.py): the split, the
configuration, every run's DP settings through the trainers' own DPConfig and make_plan on fold 0's N training cases,
earlier run folders, --pretrained's file; all problems are reported at once, each with its fix. The named budgets
adapt to the dataset (batch at most N/4 and a voxel target per step, tiny's patch at most 64x64) and the resolved
budget (batch, steps, q, sigma and lr per run, patch, network) is printed and saved as OUT/budget.json (--dry-run stops
there). The DP runs train first; after the first epochs an ETA for the grid is printed, and every progress line carries
the time left. A failed run prints its last error, is marked FAILED in results.md/csv, and the other runs go on.
"""

from __future__ import annotations

import argparse
import os
from os.path import isdir, isfile, join

from nnunet_dp.experiment.plan import REFINEMENTS, ExperimentError


def _check(args: argparse.Namespace) -> None:
    for r in args.refine:
        if r not in REFINEMENTS:
            raise ExperimentError("--refine", r, f"one of {list(REFINEMENTS)}")
    if args.device not in (None, "cpu", "cuda"):
        raise ExperimentError("-device", args.device, "cpu or cuda")
    if args.np < 1:
        raise ExperimentError("-np", args.np, "an integer >= 1")
    if not 0 < args.test_fraction < 1:
        raise ExperimentError("--test-fraction", args.test_fraction, "a number strictly between 0 and 1")
    if args.public_fraction is not None and not 0 < args.public_fraction < 1:
        raise ExperimentError("--public-fraction", args.public_fraction, "a number strictly between 0 and 1 (the share "
                              "of the non-test cases drawn as public data)", "E.g. --public-fraction 0.3.")
    if args.public_epochs is not None and (args.public_fraction is None or isinstance(args.public_epochs, bool)
                                           or args.public_epochs < 1):
        raise ExperimentError("--public-epochs", args.public_epochs, "an integer >= 1, together with --public-fraction "
                              "(it sets how long the public model trains)",
                              "E.g. --public-fraction 0.3 --public-epochs 32.")
    if args.public_fraction is not None and args.pretrained is not None:
        raise ExperimentError("--pretrained", args.pretrained, "no file together with --public-fraction (that option "
                              "trains the public model the runs start from)", "Give one of the two.")
    for var in ("nnUNet_raw", "nnUNet_preprocessed"):
        if not os.environ.get(var):
            raise ExperimentError(f"environment variable {var}", os.environ.get(var), "a folder",
                                  "Set nnUNet_raw and nnUNet_preprocessed as for nnU-Net.")


def _dataset(name_or_id: str) -> tuple[str, str]:
    from nnunetv2.paths import nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        name = maybe_convert_to_dataset_name(name_or_id if not name_or_id.isdigit() else int(name_or_id))
    except RuntimeError as error:
        raise ExperimentError("-d", name_or_id, "a dataset in nnUNet_raw", str(error).splitlines()[0]) from error
    raw = join(nnUNet_raw, name)
    if not isfile(join(raw, "dataset.json")) or not isdir(join(raw, "labelsTr")):
        raise ExperimentError("-d", name_or_id, f"a raw dataset with dataset.json and labelsTr in {raw}")
    return name, raw


def _environment() -> dict[str, str]:
    from nnunet_dp.locations import trainer_folder

    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ)
    env["nnUNet_extTrainer"] = os.pathsep.join(
        p for p in [trainer_folder(), join(here, "trainers"), env.get("nnUNet_extTrainer")] if p)
    env.setdefault("nnUNet_compile", "f")
    env.setdefault("PYTHONUNBUFFERED", "1")  # the training log arrives as it is written (the ETA reads it)
    return env


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
