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

Fine-tuning (none of it costs privacy): --public-fraction F draws a seeded public part of the non-test cases,
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
import shlex
import subprocess
import sys
from collections.abc import Sequence

from nnunet_dp.commands._args import add_device
from nnunet_dp.config import TRAINABLE
from nnunet_dp.errors import DPError
from nnunet_dp.experiment.main import run_experiment
from nnunet_dp.experiment.plan import BUDGETS, REFINEMENTS, RULES
from nnunet_dp.tools.morph_selection import DEFAULT_EPSILON_SELECT


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nnUNetv2_dp_experiment", description=__doc__.split("\n\n")[0])
    p.add_argument("-d", required=True, help="dataset id or name (nnUNet_raw must hold it)")
    p.add_argument("-c", default="2d", help="nnU-Net configuration. Default: 2d")
    p.add_argument("--rules", nargs="+", default=list(RULES), help=f"runs, from {list(RULES)}. Default: all")
    p.add_argument("--epsilons", "--target-epsilon", dest="epsilons", nargs="+", type=float, default=[1.0, 8.0],
                   metavar="EPS", help="target ε of the DP runs. "
                                                                                "Default: 1 8")
    p.add_argument("--lrs", nargs="+", type=float, default=[], metavar="LR",
                   help="learning-rate sweep: each (rule, ε) DP run is trained once with the DP default rule "
                        "(nnunet_dp.optim.default_lr) and once per LR (initial_lr = LR, momentum the default 0.9); "
                        "the report marks the lr with the best validation Dice (not private: tuning on the private "
                        "cases leaks). The non-private reference keeps the budget's lr. Default: none (the rule only)")
    p.add_argument("--refine", nargs="+", default=list(REFINEMENTS),
                   help=f"DP-Morph modes scored on test, from {list(REFINEMENTS)} ('none' is always scored)")
    p.add_argument("--dpmorph-selection", default="private", metavar="MODE",
                   help="how the DP-Morph choice is made on the private validation cases: private (the exponential "
                        "mechanism at --epsilon-select, fresh OS entropy; each refined row carries epsilon_total = "
                        "training ε + ε_select, composed as nnUNetv2_dp_privacy does) or nonprivate (the best "
                        "candidate, no noise, for comparison: every refined row, plot point and text says 'selection "
                        "not private'). A folder's finished runs whose choice was made otherwise choose again. "
                        "Default: private")
    p.add_argument("--epsilon-select", type=float, default=None, metavar="EPS",
                   help=f"ε of each private DP-Morph choice (one per refined row; adaptive splits it over the classes)."
                        f" Default: {DEFAULT_EPSILON_SELECT:g} (docs/dp_morph.md says why)")
    p.add_argument("--budget", default="tiny", help=f"one of {list(BUDGETS)} (tiny: 2 CPU cores; small, full: a GPU) "
                   "or a JSON file with the budget's fields. Default: tiny")
    p.add_argument("--test-fraction", type=float, default=0.2, help="held-out share of the cases. Default: 0.2")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="share of the non-test (private) cases that validate fold 0. Default: 0.2")
    p.add_argument("--train-cases", type=int, default=None, metavar="N",
                   help="train on N of fold 0's training cases: a seeded subsample, nested (the N cases of a smaller N "
                        "are among those of a larger one, for the same --seed); validation, test and public cases stay "
                        "as they are. For the utility-vs-N law (benchmarks/n_law.py). Default: all of them")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out test split only; the DP runs' noise and "
                   "Poisson sampling draw fresh OS entropy (no seed in any file) unless --reproducible. Default: 0")
    p.add_argument("--reproducible", action="store_true",
                   help="seed the DP runs' noise and sampling with --seed too: repeatable, NOT private (the noise can "
                        "be regenerated and subtracted from the weights); results.md/csv then say 'private "
                        "randomness: no'")
    p.add_argument("--seeds", type=int, default=1, metavar="K",
                   help="repeat every run K times (run names end in _s1.._sK when K > 1): fresh OS entropy per repeat, "
                        "or seed --seed + k - 1 under --reproducible; tables show mean ± sd over the repeats (and n), "
                        "plots error bars (sd). Default: 1")
    p.add_argument("--public-fraction", type=float, default=None, metavar="F",
                   help="0 < F < 1: after the test split, a seeded (--seed), disjoint, case-level public part of "
                        "round(F x M) of the M other cases; ordinary nnU-Net training on it (the non-private budget "
                        "trainer, same budget and network, trained once) gives the pretrained weights and the plans, "
                        "and every run fine-tunes from them on the private rest. An in-distribution split of the same "
                        "dataset: the most favourable public data there can be. Default: none (from scratch)")
    p.add_argument("--public-dataset", default=None, metavar="DATASET",
                   help="the public model trains on this other nnU-Net dataset (in nnUNet_raw; e.g. other labels of the "
                        "same images, or another site) instead of a part of -d: the realistic case of a public model "
                        "trained elsewhere. Its labels may differ (the segmentation heads then start random). If it "
                        "shares case identifiers with -d (a derived dataset), give --public-fraction too: the public "
                        "cases are then round(F x M) identifiers of -d's non-test cases, taken from this dataset, and "
                        "the private training, validation and test cases are none of them (checked, counts printed). "
                        "Without shared identifiers every case of it is public")
    p.add_argument("--public-epochs", type=int, default=None, metavar="EPOCHS",
                   help="with --public-fraction: train the public model E epochs (of the budget's steps per epoch) "
                        "instead of the budget's epochs. Costs no privacy (public cases only), and the DP runs keep "
                        "what the public model knows: on Hippocampus at ε = 1 and 8 DP fine-tuning ended within 0.002 "
                        "test Dice of the public model alone (docs/results.md). Default: the budget's")
    p.add_argument("--pretrained", default=None, metavar="FILE",
                   help="fine-tune every run (DP and the non-private reference) from this nnU-Net checkpoint (its "
                        "network must be the one the budget's plans build; not with --public-fraction)")
    p.add_argument("--trainable", nargs="+", default=["all"], metavar="T",
                   help=f"DP setting trainable, one or more of {list(TRAINABLE)} (each value a run per rule, ε, lr). "
                        "Default: all")
    p.add_argument("--lora-ranks", nargs="+", type=int, default=[], metavar="R",
                   help="with 'lora' in --trainable: one run per rank R of the adapters (DP setting lora_rank). "
                        "Default: the trainers' default rank")
    p.add_argument("--projection-dims", nargs="+", type=int, default=[], metavar="K",
                   help="add DP runs that train every parameter with the case gradients projected on the top-K "
                        "subspace of public-case gradients (DP settings projection public, projection_dim K), one "
                        "per K; needs --public-fraction or --public-dataset (the public model and its cases)")
    p.add_argument("--morph-in-training", nargs="+", default=["none"], metavar="OP",
                   help="DP setting morph_in_training, one or more of none, close, open (each a run per rule, ε, "
                        "lever): DP-Morph inside the network, before the loss and at inference. Default: none")
    p.add_argument("--reference-trainable", nargs="+", default=["all"], metavar="T",
                   help=f"non-private references beside the ordinary one (trainable all, which every ratio divides "
                        f"by): one more per other value of {list(TRAINABLE)}, trained without noise from the same "
                        "start with only those parameters (run nonprivate_norm_bias: what the subset can hold at "
                        "all). Needs nonprivate in --rules. Default: all")
    p.add_argument("--augmentations-per-case", nargs="+", type=int, default=[1], metavar="K",
                   help="DP setting augmentations_per_case, one or more integers in [1, 64]. Default: 1")
    p.add_argument("--ema-decay", nargs="+", default=["none"], metavar="D",
                   help="DP setting ema_decay, one or more of 'none' and numbers in (0, 1), e.g. none 0.999. "
                        "Default: none")
    p.add_argument("-o", default=None, help="output folder. Default: ./dp_experiment_<dataset>_<c>_<budget>")
    add_device(p)
    p.add_argument("-np", type=int, default=2, help="processes for DP-Morph and evaluation. Default: 2")
    p.add_argument("--dry-run", action="store_true",
                   help="check the whole grid against the dataset (plans it if it has no plans, fingerprint and plans "
                        "only), print and save the resolved budget (OUT/budget.json), then stop before preprocessing "
                        "and training")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    command = "nnUNetv2_dp_experiment " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    try:
        outcome = run_experiment(args, command)
    except (DPError, RuntimeError, subprocess.SubprocessError) as error:
        sys.exit(f"ERROR: {error}")
    if outcome is None:
        print("--dry-run: the grid passed every check; nothing was preprocessed or trained.")
        return
    path, results, failed = outcome
    print(f"\nResults: {path}")
    if failed:
        sys.exit(f"ERROR: {len(failed)} of {len(results)} runs failed ({', '.join(failed)}); results.md and results.csv "
                 "mark them and give each reason. Run the same command again to retry them (finished runs are "
                 "skipped).")


if __name__ == "__main__":
    main()
