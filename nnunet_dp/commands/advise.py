"""nnUNetv2_dp_advise: before training, how loud the DP noise will be for a dataset, and what changes it.

This module parses the options; the work is nnunet_dp.tools.advise's (its docstring says how)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from os.path import isdir
from typing import Any

from nnunet_dp.commands._args import fold_arg
from nnunet_dp.config import TRAINABLE
from nnunet_dp.tools.advise import AdviseInputError, advise, render


def _positive(kind: type) -> Any:
    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not 0 < value < float("inf"):  # also refuses nan
            raise argparse.ArgumentTypeError(f"{text!r} is not allowed: {'an integer' if kind is int else 'a number'}"
                                             " > 0")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nnUNetv2_dp_advise", description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    ap.add_argument("-d", required=True, help="dataset id or name (DatasetXXX_Name), as for nnUNetv2_train")
    ap.add_argument("-c", required=True, help="configuration, e.g. 2d or 3d_fullres")
    ap.add_argument("-p", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    ap.add_argument("-tr", default="nnUNetTrainerDP", help="DP trainer (its rule and settings; default: nnUNetTrainerDP)")
    ap.add_argument("-f", type=fold_arg, default=0, help="fold whose training cases count (default: 0; or 'all')")
    ap.add_argument("--target-epsilon", "--epsilons", dest="target_epsilon", type=_positive(float), nargs="+",
                    metavar="EPS",
                    help="target epsilons (default: target_epsilon of nnUNet_dp_config, else 8)")
    ap.add_argument("--trainable", choices=TRAINABLE,
                    help="which parameters DP-SGD trains (default: the settings' `trainable`, else all)")
    ap.add_argument("--batch-sizes", type=_positive(float), nargs="+", metavar="B",
                    help="expected batch sizes qN (default: the plans' batch size B, 2B, 4B and N/4, at most N)")
    ap.add_argument("--epochs", type=_positive(int), nargs="+", metavar="EPOCHS",
                    help="numbers of epochs (default: the settings' num_epochs, 2x and 4x)")
    ap.add_argument("--pretrained", metavar="FILE",
                    help="the public checkpoint you will give nnUNetv2_train as -pretrained_weights: the lr column "
                         "then follows the DP trainers' fine-tuning rule (nnunet_dp.optim.finetune_lr) from the RMS "
                         "of the public weights that train, loaded as the trainer loads them (reads only this file)")
    ap.add_argument("--json", metavar="FILE", help="also write the table to this JSON file")
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.json and not isdir(os.path.dirname(os.path.abspath(args.json))):
        ap.error(f"--json {args.json}: its folder does not exist; give a path in an existing folder")
    try:
        report = advise(args)
    except AdviseInputError as e:
        ap.error(str(e))
    print(render(report))
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
        except OSError as e:
            ap.error(f"--json {args.json}: cannot write it ({e.strerror}); give a path in an existing folder")
        print(f"\nwritten: {args.json}")
    if not any(row["feasible"] for row in [*report["rows"], *report["current"]]):
        sys.exit("nnUNetv2_dp_advise: no setting in the table is feasible for this dataset (each row says why); "
                 "change --target-epsilon, --batch-sizes or --epochs, or the settings file")


if __name__ == "__main__":
    main()
