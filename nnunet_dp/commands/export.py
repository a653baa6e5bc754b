"""nnUNetv2_dp_export: a zip with only the releasable files of a DP model, the release's epsilon and a model card.

This module parses the options; the work is nnunet_dp.tools.export's (its docstring says how)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from nnunet_dp.commands._args import fold_arg
from nnunet_dp.errors import DPError
from nnunet_dp.release import format_release
from nnunet_dp.tools.export import Request, export


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nnUNetv2_dp_export", description=(
        "Export a DP model as a zip for nnUNetv2_install_pretrained_model_from_zip, with only its releasable files "
        "(no debug.json, progress.png, logs, fingerprint, splits, journal, checkpoint_latest or validation), its "
        "release_privacy.json and a MODEL_CARD.md. Options as nnUNetv2_export_model_to_zip."))
    ap.add_argument("-d", required=True, help="dataset name or id")
    ap.add_argument("-c", nargs="+", required=True, help="configuration(s), e.g. 2d")
    ap.add_argument("-f", nargs="+", type=fold_arg, default=[0, 1, 2, 3, 4], help="folds. Default: 0 1 2 3 4")
    ap.add_argument("-tr", default="nnUNetTrainerDP", help="trainer class. Default: nnUNetTrainerDP")
    ap.add_argument("-p", default="nnUNetPlans", help="plans identifier. Default: nnUNetPlans")
    ap.add_argument("-o", required=True, help="output zip file")
    ap.add_argument("--with-best", action="store_true", help="also pack checkpoint_best.pth (chosen on the fold's "
                                                             "validation cases without noise: not covered by epsilon)")
    ap.add_argument("--postprocessing", metavar="PP_DIR", default=None,
                    help="folder with the DP-Morph postprocessing.pkl/.json to release with the models")
    ap.add_argument("--splits", default=None, help="splits_final.json the folds trained with (as nnUNetv2_dp_privacy)")
    ap.add_argument("--delta", type=float, default=None, help="delta of the release. Default: the runs' delta")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing zip")
    ap.add_argument("--allow-not-covered", action="store_true",
                    help="pack a release that epsilon does not cover (seeded fold, non-private DP-Morph choice); "
                         "release_privacy.json and the card then say NOT covered first")
    return ap


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    request = Request(output=args.o, dataset=args.d, configurations=tuple(args.c), folds=tuple(args.f),
                      trainer=args.tr, plans=args.p, with_best=args.with_best, postprocessing=args.postprocessing,
                      splits=args.splits, delta=args.delta, overwrite=args.overwrite,
                      allow_not_covered=args.allow_not_covered)
    try:
        files, skipped, release = export(request)
    except (DPError, OSError, json.JSONDecodeError) as e:
        sys.exit(f"ERROR: {e}")
    print(f"Packed into {args.o}:")
    print("\n".join(f"  {e.arcname}" + (f"  [{e.note}]" if e.note else "") for e in files))
    print("Left out (private: unnoised statistics of the training or validation cases, or not chosen):")
    print("\n".join(f"  {s}" for s in skipped) or "  nothing")
    print(format_release(release, args.o))


if __name__ == "__main__":  # pragma: no cover
    main()
