"""nnUNetv2_dp_plan: an nnU-Net plans file from user-given values only (no fingerprint, no image).

This module parses the options; the work is nnunet_dp.tools.dp_plan's (its docstring says how)."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

from batchgenerators.utilities.file_and_folder_operations import join, load_json
from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

from nnunet_dp.tools.dp_plan import ALLOWED_NORM, DPPlanError, build_plans, write_plans


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nnUNetv2_dp_plan", description=(
        "Write nnU-Net plans from user-given values only: no dataset fingerprint, no image. Then run "
        "nnUNetv2_preprocess -d D -plans_name PLANS -c C and nnUNetv2_train D C F -tr nnUNetTrainerDP -p PLANS."))
    p.add_argument("-d", required=True, help="dataset name or id")
    p.add_argument("-c", required=True, help="configuration: 2d or 3d_fullres")
    p.add_argument("--spacing", type=float, nargs="+", required=True, help="target spacing (mm), nnU-Net's axis order")
    p.add_argument("--patch-size", type=int, nargs="+", required=True, help="patch size in voxels")
    p.add_argument("--normalization", nargs="+", required=True, help=f"one, or one per channel: {ALLOWED_NORM}")
    p.add_argument("-p", default="nnUNetPlans_dp", help="plans name (default nnUNetPlans_dp)")
    p.add_argument("--batch-size", type=int, default=None, help="nnU-Net's batch size (default 12 for 2d, 2 for 3d)")
    p.add_argument("--features", type=int, nargs="+", default=None,
                   help="features of the first stage (doubled per stage, capped as nnU-Net), or one per stage")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw

    if not nnUNet_raw or not nnUNet_preprocessed:
        raise DPPlanError("nnUNet_raw / nnUNet_preprocessed", (nnUNet_raw, nnUNet_preprocessed), "both set",
                          "export the nnU-Net folder variables")
    dataset_name = maybe_convert_to_dataset_name(args.d)
    raw_folder = join(nnUNet_raw, dataset_name)
    dataset_json = load_json(join(raw_folder, "dataset.json"))
    plans = build_plans(args, dataset_name, dataset_json, shlex.join(["nnUNetv2_dp_plan", *argv]))
    path = write_plans(plans, dataset_name, raw_folder, nnUNet_preprocessed, args.c)
    conf = plans["configurations"][args.c]
    if conf["patch_size"] != list(args.patch_size):
        print(f"patch size {list(args.patch_size)} padded to {conf['patch_size']} (a multiple of 2**pools per axis)")
    print(f"Plans written to {path} ({args.c}: spacing {conf['spacing']}, patch size {conf['patch_size']}, "
          f"{conf['architecture']['arch_kwargs']['n_stages']} stages, normalisation {conf['normalization_schemes']})."
          f"\nNext: nnUNetv2_preprocess -d {args.d} -plans_name {args.p} -c {args.c}")


if __name__ == "__main__":  # pragma: no cover
    main()
