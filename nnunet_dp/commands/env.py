"""nnUNetv2_dp_env: print the export line that lets nnU-Net find the DP trainers."""
from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from nnunet_dp.locations import trainer_folder


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog="nnUNetv2_dp_env", description="Print `export nnUNet_extTrainer=...` for the "
                                   "nnunet-dp trainers. Use: eval \"$(nnUNetv2_dp_env)\"")


def main(argv: Sequence[str] | None = None) -> None:
    build_parser().parse_args(argv)
    folder = trainer_folder()
    current = os.environ.get("nnUNet_extTrainer", "")
    paths = [p for p in current.split(os.pathsep) if p and p != folder]
    print(f"export nnUNet_extTrainer={os.pathsep.join([folder, *paths])}")
