"""nnUNetv2_dp_determine_postprocessing: the arguments of nnUNetv2_determine_postprocessing plus DP-Morph's own."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from nnunet_dp.errors import DPError
from nnunet_dp.postprocessing.determine import ALL_OPERATIONS, determine_dp_morph
from nnunet_dp.postprocessing.refine import PLANES
from nnunet_dp.postprocessing.search import MODES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_dp_determine_postprocessing",
        description="Search DP-Morph (class-wise morphological refinement) on predictions, e.g. a fold's validation "
                    "folder or nnU-Net's crossval_results_folds_* folder, and write postprocessing.pkl and "
                    "postprocessing.json for nnUNetv2_apply_postprocessing.")
    parser.add_argument("-i", required=True, help="folder with predictions (fold_X/validation or crossval_results_*)")
    parser.add_argument("-ref", required=True, help="folder with the ground truth (gt_segmentations or labelsTr)")
    parser.add_argument("-plans_json", default=None, help="plans file; default: plans.json in -i, its parent or "
                                                          "grandparent (the trained model folder)")
    parser.add_argument("-dataset_json", default=None, help="dataset.json; default: found like -plans_json")
    parser.add_argument("-np", type=int, default=2, help="processes (cases are scored in parallel). Default: 2")
    parser.add_argument("-o", default=None, help="where to write postprocessing.pkl/.json. Default: -i (as nnU-Net)")
    parser.add_argument("-mode", choices=MODES, default="adaptive",
                        help="adaptive: per class operation/radius/plane; global: one choice for all classes")
    parser.add_argument("-operations", nargs="+", choices=ALL_OPERATIONS, default=list(ALL_OPERATIONS),
                        help="candidate operations ('none' is always a candidate). Default: all")
    parser.add_argument("-radii", nargs="+", type=float, default=[1.0, 2.0, 3.0],
                        help="candidate radii. Default: 1 2 3")
    parser.add_argument("-radius_unit", choices=("voxel", "mm"), default="voxel",
                        help="voxel: ball in voxel units; mm: ball {x : |x * spacing| <= r} with the plans' median "
                             "spacing. Default: voxel")
    parser.add_argument("-planes", nargs="+", choices=PLANES, default=list(PLANES),
                        help="in_plane (per slice along the coarsest axis) and/or volumetric. Default: both")
    parser.add_argument("-margin", type=float, default=0.001,
                        help="a choice is kept only if its mean Dice beats 'none' by more than this. Default: 0.001")
    parser.add_argument("--epsilon-select", "-epsilon_select", dest="epsilon_select", type=float, default=None,
                        metavar="EPS",
                        help="choose privately with the exponential mechanism at this epsilon (recorded in "
                             "postprocessing.json; add it to the training epsilon). Default: not private")
    parser.add_argument("--seed", "-seed", dest="seed", type=int, default=None,
                        help="seed the private selection (needs -epsilon_select): reproducible but NOT private, so "
                             "epsilon_select no longer holds; postprocessing.json says private_randomness false "
                             "(the seed itself is not written). Default: fresh OS entropy, private")
    parser.add_argument("--with_connected_components", action="store_true",
                        help="run nnU-Net's own connected-component determination first and search DP-Morph on top; "
                             "one pkl holds both")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        determine_dp_morph(args.i, args.ref, args.plans_json, args.dataset_json, args.np, mode=args.mode,
                           operations=args.operations, radii=args.radii, radius_unit=args.radius_unit,
                           planes=args.planes, margin=args.margin, epsilon_select=args.epsilon_select, seed=args.seed,
                           with_connected_components=args.with_connected_components, output_folder=args.o)
    except DPError as error:
        sys.exit(f"ERROR: {error}")


if __name__ == "__main__":
    main()
