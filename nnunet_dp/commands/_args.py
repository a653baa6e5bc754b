"""The command-line conventions every nnUNetv2_dp_* program shares (nnU-Net's): -d -c -f -tr -p address a trained
model, -device picks the device with one default everywhere, ε options are spelled --target-epsilon / --epsilon-select
(metavar EPS), epochs --epochs (metavar EPOCHS)."""
from __future__ import annotations

import argparse
import os

DEVICES = ("cuda", "cpu")


def fold_arg(text: str) -> int | str:
    """argparse type of nnU-Net's -f: an integer >= 0 or 'all'."""
    if text == "all":
        return text
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: an integer >= 0 (e.g. 0) or 'all'")
    return int(text)


def default_device() -> str:
    """cuda where torch sees a GPU, else cpu: the same default for every command."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-device", choices=DEVICES, default=None,
                        help="cuda or cpu. Default: cuda if torch sees a GPU, else cpu")


def device_of(args: argparse.Namespace) -> str:
    return args.device or default_device()


def add_model(parser: argparse.ArgumentParser, *, required: bool = True, folds: bool = False,
              trainer: str | None = "nnUNetTrainerDP") -> None:
    """nnU-Net's way to name a trained model: -d DATASET -c CONFIGURATION -f FOLD -tr TRAINER -p PLANS."""
    parser.add_argument("-d", required=required, help="dataset id or name, as for nnUNetv2_train")
    parser.add_argument("-c", required=required, help="configuration, e.g. 2d or 3d_fullres")
    parser.add_argument("-f", type=fold_arg, nargs="+" if folds else None, default=[0] if folds else 0,
                        help="fold(s): integers or 'all'. Default: 0")
    parser.add_argument("-tr", default=trainer, help=f"trainer. Default: {trainer}")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier. Default: nnUNetPlans")


def fold_folders(args: argparse.Namespace) -> list[str]:
    """The fold folders -d -c -f -tr -p name in $nnUNet_results (nnU-Net's get_output_folder)."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    if not os.environ.get("nnUNet_results"):
        raise SystemExit("ERROR: nnUNet_results is not set: set it as for nnU-Net, or give the fold folders")
    try:
        dataset = maybe_convert_to_dataset_name(int(args.d) if str(args.d).isdigit() else args.d)
    except RuntimeError as e:
        raise SystemExit(f"ERROR: -d {args.d}: {str(e).splitlines()[0]}") from e
    folds = args.f if isinstance(args.f, list) else [args.f]
    return [get_output_folder(dataset, args.tr, args.p, args.c, f) for f in folds]
