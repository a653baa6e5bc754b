"""nnUNetv2_dp_privacy: each fold's privacy.json in a readable form, and the (epsilon, delta) of a release."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from nnunet_dp.commands._args import add_model, fold_folders
from nnunet_dp.errors import DPError
from nnunet_dp.release import (
    compose_release,
    format_release,
)
from nnunet_dp.release_folders import RELEASE_JSON, fold_summary, load_fold, load_selection, read_privacy_json


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="The (epsilon, delta) of a release: the DP fold runs ensembled for "
                                             "prediction, composed per case, plus a DP-Morph selection.")
    ap.add_argument("folders", nargs="*", metavar="FOLD_DIR",
                    help="fold folder(s), e.g. $nnUNet_results/Dataset.../nnUNetTrainerDP__...__2d/fold_0; or name "
                         "them as nnU-Net does with -d -c -f -tr -p")
    add_model(ap, required=False, folds=True)
    ap.add_argument("--postprocessing", metavar="PP_DIR", default=None,
                    help="folder of the postprocessing.pkl/.json released with the models")
    ap.add_argument("--splits", default=None, help="splits_final.json the folds trained with. Default: found through "
                                                   "the fold's debug.json or $nnUNet_preprocessed/<dataset>")
    ap.add_argument("--delta", type=float, default=None, help="delta of the release. Default: the runs' delta")
    ap.add_argument("-o", default=RELEASE_JSON, help=f"output file. Default: ./{RELEASE_JSON}")
    ap.add_argument("--overwrite", action="store_true", help="replace the output file if it exists (default: stop)")
    return ap


def main(argv: Sequence[str] | None = None) -> None:
    """nnUNetv2_dp_privacy: each fold's privacy.json in a readable form, and the (epsilon, delta) of the release."""
    from nnunet_dp.nnunet.report import versions, write_json_atomic

    ap = build_parser()
    args = ap.parse_args(argv)
    if bool(args.folders) == (args.d is not None):
        ap.error("give the fold folders, or -d DATASET -c CONFIGURATION [-f FOLD ...] [-tr TRAINER] [-p PLANS]: one "
                 "of the two")
    if args.d is not None:
        if args.c is None:
            ap.error("-c CONFIGURATION is needed with -d")
        args.folders = fold_folders(args)
    if os.path.exists(args.o) and not args.overwrite:
        sys.exit(f"ERROR: -o {args.o} exists (an earlier release report?). Give another -o, or --overwrite to "
                 "replace it.")
    try:
        reports = [read_privacy_json(f) for f in args.folders]
        folds = [load_fold(f, args.splits) for f in args.folders]
        selection, pp_assumptions = (None, []) if args.postprocessing is None else load_selection(args.postprocessing)
        release = compose_release(folds, selection, delta=args.delta)
    except DPError as e:
        sys.exit(f"ERROR: {e}")
    assumptions = list(dict.fromkeys([a for r in reports for a in r["assumptions"]] + pp_assumptions))
    release.update(assumptions=assumptions, versions=versions())
    write_json_atomic(args.o, release)
    for folder, rep in zip(args.folders, reports):
        print(fold_summary(folder, rep))
    print("Not covered by epsilon:")
    for a in assumptions:
        print(f"  - {a}")
    print(format_release(release, args.o))
