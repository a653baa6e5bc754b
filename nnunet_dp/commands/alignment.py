"""nnUNetv2_dp_alignment: gradient alignment of every scaling rule on a trained (or freshly initialised) DP fold.

This module parses the options; the work is nnunet_dp.tools.alignment's (its docstring says how)."""

from __future__ import annotations

import argparse
import sys

from nnunet_dp.commands._args import add_device, device_of
from nnunet_dp.errors import DPError
from nnunet_dp.tools.alignment import run


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nnUNetv2_dp_alignment", description=__doc__.split("\n\n")[0])
    ap.add_argument("-d", required=True, help="dataset name or id")
    ap.add_argument("-c", required=True, help="configuration, e.g. 2d or 3d_fullres")
    ap.add_argument("-f", required=True, help="fold (0-4 or all)")
    ap.add_argument("-tr", default="nnUNetTrainerDP", help="DP trainer class (default nnUNetTrainerDP)")
    ap.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    ap.add_argument("-chk", nargs="+", default=["checkpoint_final.pth"],
                    help="checkpoint file name(s) in the fold folder or paths; 'none' = freshly initialised network. "
                         "Several give one curve per checkpoint (default checkpoint_final.pth). Another trainer's "
                         "checkpoint (e.g. the public model a DP run fine-tuned from: the signal at its start) is "
                         "analysed with the DP settings of the first DP checkpoint given, or else of "
                         "nnUNet_dp_config or the fold folder's dp_config.json")
    ap.add_argument("-n", type=int, default=20, help="Poisson batches per checkpoint (default 20)")
    ap.add_argument("-o", default=None, help="output folder (default: <fold folder>/alignment)")
    add_device(ap)
    ap.add_argument("-ref", choices=("batch", "dataset"), default="batch",
                    help="g_bar: the batch mean of the unscaled per-case gradients, or a training-set mean estimated "
                         "from -ref_steps extra batches drawn first (default batch)")
    ap.add_argument("-ref_steps", type=int, default=None, help="batches for -ref dataset (default ceil(1/q))")
    ap.add_argument("-mc", type=int, default=16, help="Monte Carlo noise draws per step (0: closed form only)")
    ap.add_argument("--seed", "-seed", type=int, default=0, help="seed of batches, fresh initialisation and Monte Carlo "
                    "(analysis only; no private noise is drawn)")
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = build_parser()
    args = ap.parse_args(argv)
    args.device = device_of(args)
    if args.n < 1 or args.mc < 0 or (args.ref_steps is not None and args.ref_steps < 1):
        ap.error(f"-n must be >= 1 (got {args.n}), -mc >= 0 (got {args.mc}), -ref_steps >= 1 (got {args.ref_steps})")
    if args.f != "all":
        try:
            args.f = int(args.f)
        except ValueError:
            ap.error(f"-f must be a fold number or 'all', got {args.f!r}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        run(args)
    except DPError as e:
        sys.exit(f"nnUNetv2_dp_alignment: {e}")


if __name__ == "__main__":
    main()
