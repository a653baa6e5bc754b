"""Where the package's nnU-Net pieces live on disk (no import of them: the core never imports nnunetv2)."""
from __future__ import annotations

import importlib.util


def trainer_folder() -> str:
    """The folder to put into nnUNet_extTrainer: nnunet_dp.trainers, wherever setup.py installed it (with an editable
    install, trainers/ of the repository)."""
    spec = importlib.util.find_spec("nnunet_dp.trainers")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("nnunet_dp.trainers is not installed: reinstall nnunet-dp (pip install nnunet-dp)")
    return next(iter(spec.submodule_search_locations))


NOT_FOUND = "Could not find requested nnunet trainer"  # nnunetv2's message (run/run_training.py)


def trainer_hint(output: str) -> str:
    """The fix when nnU-Net could not find a trainer (its own message says nothing of nnUNet_extTrainer's origin)."""
    if NOT_FOUND not in output:
        return ""
    return (f"\nnnU-Net did not find the trainer: point nnUNet_extTrainer at the DP trainers with "
            f"`eval \"$(nnUNetv2_dp_env)\"` (now: {trainer_folder()}), or check the trainer's name (-tr).")
