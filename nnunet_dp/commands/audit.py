"""nnUNetv2_dp_audit: evidence for a trained fold's privacy. Two subcommands:

  mia      membership inference on any trained nnU-Net fold (DP or not): the seed paper's loss-threshold attack and a
           per-case Dice attack, training cases (members) against held-out cases (non-members). Its files (JSON,
           CSV, plot) are private: unnoised statistics of the training cases.
  one-run  the one-run canary audit (Steinke, Nasr, Jagielski, NeurIPS 2023) of a DP fold's mechanism at the
           settings in its privacy.json: a lower bound on epsilon to hold against the accountant's epsilon.
"""

from __future__ import annotations

import argparse
import sys

from nnunet_dp.commands._args import add_device, device_of, fold_arg
from nnunet_dp.errors import DPError
from nnunet_dp.tools.audit.mia_run import run_mia
from nnunet_dp.tools.audit.one_run import run_one_run


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: an integer >= 1")
    return int(text)


def _confidence(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: a number in (0, 1), e.g. 0.95")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-d", required=True, help="dataset id or name (DatasetXXX_Name), as for nnUNetv2_train")
    p.add_argument("-c", required=True, help="configuration, e.g. 2d or 3d_fullres")
    p.add_argument("-f", required=True, type=fold_arg, help="fold (0, 1, ... or all)")
    p.add_argument("-tr", required=True, help="trainer of the model folder, e.g. nnUNetTrainerDP or nnUNetTrainer")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-o", default=None, help="output folder (default: the fold folder)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nnUNetv2_dp_audit", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[1])
    sub = ap.add_subparsers(dest="command", required=True, metavar="{mia,one-run}")
    mia = sub.add_parser("mia", help="membership inference: training vs held-out cases (any nnU-Net model)")
    _common(mia)
    mia.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint in the fold folder "
                     "(default checkpoint_final.pth, the released model)")
    mia.add_argument("--nonmembers", metavar="FILE", help="held-out case ids (JSON list or one per line), already "
                     "preprocessed; default: the fold's validation cases")
    mia.add_argument("--tta", action="store_true", help="predict with mirroring, as nnUNetv2_predict (slower)")
    mia.add_argument("--seed", type=int, default=0, help="seed of the calibration split of the threshold attack "
                     "(the attacker's choice, not private; default 0)")
    add_device(mia)
    one = sub.add_parser("one-run", help="one-run canary audit of a DP fold's mechanism (privacy.json's settings)")
    _common(one)
    one.add_argument("--canaries", type=_positive_int, default=1000, metavar="M", help="number of canaries "
                     "(default 1000)")
    one.add_argument("--confidence", type=_confidence, default=0.95, help="confidence of the bound (default 0.95)")
    one.add_argument("-device", choices=("cuda", "cpu"), default=None, help="accepted as in every command; one-run "
                     "always runs on the CPU (it replays the mechanism on canary gradients, no network)")
    return ap


def main(argv: list[str] | None = None) -> None:
    """The console script (returns None: a console script's return value becomes its exit status)."""
    args = build_parser().parse_args(argv)
    if args.command == "mia":
        args.device = device_of(args)
    if args.command == "one-run" and args.device == "cuda":
        print("nnUNetv2_dp_audit one-run: -device cuda ignored: the audit replays the DP mechanism on canary "
              "gradients (no network) and runs on the CPU")
    try:
        run_mia(args) if args.command == "mia" else run_one_run(args)
    except DPError as e:
        sys.exit(f"nnUNetv2_dp_audit {args.command}: {e}")


if __name__ == "__main__":
    main()
