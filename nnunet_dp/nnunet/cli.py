"""Small command-line helpers: where the trainers live, and a privacy summary of a trained folder."""
from __future__ import annotations

import argparse
import json
import os
import sys


def trainer_folder() -> str:
    """The folder to put into nnUNet_extTrainer (installed as nnunet_dp.trainers)."""
    import nnunet_dp.trainers as t

    return os.path.dirname(os.path.abspath(t.__file__))


def env_main() -> None:
    """nnUNetv2_dp_env: print the export line that lets nnU-Net find the DP trainers."""
    argparse.ArgumentParser(description="Print `export nnUNet_extTrainer=...` for the nnunet-dp trainers. Use: "
                                        "eval \"$(nnUNetv2_dp_env)\"").parse_args()
    folder = trainer_folder()
    current = os.environ.get("nnUNet_extTrainer", "")
    paths = [p for p in current.split(os.pathsep) if p and p != folder]
    print(f"export nnUNet_extTrainer={os.pathsep.join([folder, *paths])}")


def privacy_main() -> None:
    """nnUNetv2_dp_privacy: print the privacy.json of a trained fold folder in a readable form."""
    ap = argparse.ArgumentParser(description="Summarise privacy.json of a DP training output folder.")
    ap.add_argument("folder", help="fold folder, e.g. $nnUNet_results/Dataset.../nnUNetTrainerDP__...__2d/fold_0")
    args = ap.parse_args()
    path = os.path.join(args.folder, "privacy.json")
    if not os.path.isfile(path):
        sys.exit(f"No privacy.json in {args.folder!r}: is this the fold folder of a DP trainer run?")
    try:
        with open(path) as f:
            rep = json.load(f)
        missing = [k for k in ("epsilon", "delta", "accountant", "steps", "noise_multiplier", "sampling_rate", "rule",
                               "clip_norm", "num_training_cases", "status", "assumptions") if k not in rep]
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError) as e:
        sys.exit(f"{path} is not a readable privacy.json ({type(e).__name__}: {e}); it may be truncated. Rerun "
                 "the training with --c to rewrite it.")
    if missing:
        sys.exit(f"{path} lacks {', '.join(missing)}: not a privacy.json written by an nnunet-dp trainer.")
    print(f"epsilon = {rep['epsilon']:.4f} at delta = {rep['delta']} ({rep['accountant']}), {rep['steps']} steps, "
          f"sigma = {rep['noise_multiplier']:.4f}, q = {rep['sampling_rate']:.4f}, rule = {rep['rule']}, "
          f"C = {rep['clip_norm']}, N = {rep['num_training_cases']}, status: {rep['status']}")
    print("Not covered by epsilon:")
    for a in rep["assumptions"]:
        print(f"  - {a}")
