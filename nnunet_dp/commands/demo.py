"""nnUNetv2_dp_demo: synthetic dataset -> plan/preprocess -> DP training -> predict -> DP-Morph -> Dice and epsilon.

This module parses the options; the work is nnunet_dp.tools.demo's (its docstring says how)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from nnunet_dp.errors import DPError
from nnunet_dp.tools.demo import DEMO_SETTINGS, QUICK_SETTINGS, run_demo
from nnunet_dp.tools.morph_selection import morph_selection


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nnUNetv2_dp_demo",
                                 description="DP training + DP-Morph demo on a synthetic 2D dataset (no download).")
    ap.add_argument("-o", default="nnunet_dp_demo", help="work folder (created; default ./nnunet_dp_demo)")
    ap.add_argument("-tr", default="nnUNetTrainerDP", help="DP trainer (default nnUNetTrainerDP: flat clipping, the "
                    "recommended rule)")
    ap.add_argument("--quick", action="store_true", help="a minimal budget (smoke test, ~2 minutes)")
    ap.add_argument("--fresh", action="store_true", help="delete the work folder first")
    ap.add_argument("--dpmorph-selection", default="private", metavar="MODE",
                    help="private (default): the DP-Morph choice drawn with the exponential mechanism at "
                         "--epsilon-select, added to the training epsilon; nonprivate: the best candidate on the "
                         "validation cases, not covered by any epsilon (for comparison)")
    ap.add_argument("--epsilon-select", type=float, default=None, metavar="EPS",
                    help="epsilon of the private DP-Morph choice. Default: 1 (morph_selection.DEFAULT_EPSILON_SELECT)")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        selection = morph_selection(args.dpmorph_selection, args.epsilon_select)
    except DPError as error:
        sys.exit(f"ERROR: {error}")
    work = os.path.abspath(args.o)
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work, exist_ok=True)
    run_demo(work, args.tr, QUICK_SETTINGS if args.quick else DEMO_SETTINGS, quick=args.quick,
             epsilon_select=selection.epsilon_select)


if __name__ == "__main__":
    main()
