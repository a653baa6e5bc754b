"""nnUNetv2_dp_experiment, where fine-tuning starts: the public pretraining of --public-fraction (ordinary nnU-Net
training, the harness's non-private budget trainer, same budget and network, on fold 'all' of the public dataset) and
the checks of --pretrained FILE before any work.

Neither costs privacy: ε covers the fine-tuning on the private cases, and the pretraining data must not contain
them (privacy.json's assumptions say so). With --public-fraction the public part is an in-distribution split of the
same dataset, so the pretraining is as close to the private data as public data can be: an optimistic setting.
"""
from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from os.path import isfile, join
from typing import Any

from nnunet_dp.experiment.data import PublicData
from nnunet_dp.experiment.errors import ExperimentError
from nnunet_dp.experiment.plan import TRAINERS
from nnunet_dp.experiment.run import check_settings, run_command

PUBLIC_TRAINER = TRAINERS["nonprivate"]
PUBLIC_FOLD = "all"  # every public case trains (README's `nnUNetv2_train PUB 2d all`)
_SKIPPED = ".seg_layers."  # nnU-Net never transfers the segmentation heads (run/load_pretrained_weights.py)
_RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass(frozen=True)
class PublicPretraining:
    """The public model: trained once per output folder, skipped when its checkpoint_final exists."""

    data: PublicData
    configuration: str
    device: str
    settings: dict[str, Any]  # the non-private budget JSON, as the reference run's
    env: dict[str, str]

    name = "public pretraining"

    @property
    def folder(self) -> str:
        return join(self.data.out, "public")

    @property
    def checkpoint(self) -> str:
        return join(self.data.results, self.data.public, f"{PUBLIC_TRAINER}__nnUNetPlans__{self.configuration}",
                    f"fold_{PUBLIC_FOLD}", "checkpoint_final.pth")

    def done(self) -> bool:
        return isfile(self.checkpoint)

    def run(self, watch: Callable[[str], None] | None = None) -> float:
        """nnUNetv2_train PUBLIC CONFIG all (--c after an interruption). Returns the seconds it took."""
        check_settings(self.folder, self.settings)
        cmd = ["nnUNetv2_train", self.data.public, self.configuration, PUBLIC_FOLD, "-tr", PUBLIC_TRAINER, "-device",
               self.device]
        if isfile(join(os.path.dirname(self.checkpoint), "checkpoint_latest.pth")):
            cmd.append("--c")
        env = {**self.data.env(self.env), "nnUNet_dp_experiment_budget": join(self.folder, "settings.json")}
        t0 = time.time()
        run_command(cmd, env, join(self.folder, "log.txt"), watch)
        return time.time() - t0


# ---- --pretrained FILE ----------------------------------------------------------------------------------------------
_FIX = ("The checkpoint must come from a training with the plans and network this experiment trains: train it with "
        "these plans (README, 'Public → private': nnUNetv2_move_plans_between_datasets into its dataset, then "
        "nnUNetv2_train -p), or use --public-fraction to pretrain inside the experiment. A budget with "
        "features_per_stage (--budget tiny) narrows the 2d network: a checkpoint of the plans' own network needs "
        "--budget small or full.")


def plans_network(plans: dict[str, Any], dataset_json: dict[str, Any], configuration: str) -> Any:
    """The network nnU-Net's trainer builds from `plans` (deep supervision on), on the meta device: shapes only."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(copy.deepcopy(plans))
    conf = manager.get_configuration(configuration)
    channels = determine_num_input_channels(manager, conf, dataset_json)
    heads = manager.get_label_manager(dataset_json).num_segmentation_heads
    with torch.device("meta"):
        return nnUNetTrainer.build_network_architecture(manager, conf, channels, heads, True)


def pretrained_problems(path: str, plans_file: str, dataset_json: dict[str, Any], configuration: str, *,
                        nonprivate: bool, plans_label: str | None = None) -> list[str]:
    """--pretrained FILE before any work: the file exists and loads as an nnU-Net checkpoint, and holds every tensor
    nnU-Net's load_pretrained_weights requires of the network these plans build, with its shape (the segmentation
    heads are never transferred; BatchNorm running statistics only when the non-private reference loads it: the DP
    network's per-sample norms have none). `plans_label` names the plans in the message (default: the file). Empty
    when it fits."""
    from nnunet_dp.errors import DPCheckpointError
    from nnunet_dp.nnunet.resume import read_checkpoint

    if not isfile(path):
        return [str(ExperimentError("--pretrained", path, "an existing nnU-Net checkpoint file (e.g. fold_all/"
                                    "checkpoint_final.pth of an ordinary training on public data)",
                                    "Check the path."))]
    try:
        weights = read_checkpoint(path).get("network_weights")
    except DPCheckpointError as error:
        return [str(ExperimentError("--pretrained", path, "a checkpoint torch.load can read", str(error)))]
    if not isinstance(weights, dict):
        return [str(ExperimentError("--pretrained", path, "an nnU-Net checkpoint with 'network_weights' "
                                    "(checkpoint_final.pth or checkpoint_best.pth of nnUNetv2_train)",
                                    "Give nnU-Net's checkpoint file itself, not an exported or partial state."))]
    with open(plans_file) as f:
        plans = json.load(f)
    state = plans_network(plans, dataset_json, configuration).state_dict()
    needed = [k for k in state if _SKIPPED not in k and (nonprivate or k.rsplit(".", 1)[-1] not in _RUNNING_STATS)]
    missing = [k for k in needed if k not in weights]
    shapes = [k for k in needed if k in weights and tuple(weights[k].shape) != tuple(state[k].shape)]
    if not missing and not shapes:
        return []
    example = (f"{len(missing)} of the network's {len(needed)} tensors are missing (e.g. {missing[0]!r})" if missing
               else f"{len(shapes)} tensors have other shapes (e.g. {shapes[0]!r}: file "
                    f"{tuple(weights[shapes[0]].shape)}, network {tuple(state[shapes[0]].shape)})")
    label = plans_label or plans_file
    return [str(ExperimentError("--pretrained", path, f"a checkpoint of the network the plans build ({label}, "
                                f"configuration {configuration}): {example}", _FIX))]
