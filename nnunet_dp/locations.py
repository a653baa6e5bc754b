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
