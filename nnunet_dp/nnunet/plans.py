"""DP changes to an nnU-Net configuration, written into the plans so that inference rebuilds the same network.

The DP trainer saves its (changed) plans to the results folder as nnU-Net always does; nnUNetv2_predict builds the
network from that plans.json, so the norm layers used in training are the ones used at inference, whatever the
environment says then.

Plans written by nnUNetv2_dp_plan (nnunet_dp.tools.dp_plan) carry a record of the user-given values; the trainer
checks it (plans_provenance) and then neither reads nor copies nnU-Net's dataset fingerprint (start_without_fingerprint).
"""
from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from batchgenerators.utilities.file_and_folder_operations import join, maybe_mkdir_p, save_json
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.helpers import empty_cache
from torch import distributed as dist

from nnunet_dp.config import NormConversion
from nnunet_dp.layers import GROUP_NORM_PATH
from nnunet_dp.morph import MORPH_NETWORK_PATH

_BATCH_NORM_MARKERS = ("BatchNorm",)
_NORM_MARKERS = ("BatchNorm", "InstanceNorm", "GroupNorm", "LayerNorm")


def dp_architecture(architecture: dict, *, norm_conversion: NormConversion, num_groups: int) -> dict:
    """A copy of the plans' 'architecture' entry with sample-coupling norms replaced by GroupNormNNUNet.

    norm_conversion 'batchnorm' converts only BatchNorm (InstanceNorm is per-sample already); 'all' converts every
    norm layer to GroupNorm.
    """
    arch = copy.deepcopy(architecture)
    kwargs = arch["arch_kwargs"]
    norm_op = kwargs.get("norm_op") or ""
    markers = _BATCH_NORM_MARKERS if norm_conversion == "batchnorm" else _NORM_MARKERS
    if any(m in norm_op.split(".")[-1] for m in markers) and norm_op != GROUP_NORM_PATH:
        kwargs["norm_op"] = GROUP_NORM_PATH
        kwargs["norm_op_kwargs"] = {"eps": 1e-5, "affine": True, "num_groups": num_groups}
        if "norm_op" not in arch.get("_kw_requires_import", []):
            arch["_kw_requires_import"] = [*arch.get("_kw_requires_import", []), "norm_op"]
    return arch


def morph_architecture(architecture: dict, morph_ops: dict[str, list]) -> dict:
    """The architecture with DP-Morph in training (nnunet_dp.morph.morph_network wrapping the plans' network class),
    unchanged when `morph_ops` is empty."""
    if not morph_ops:
        return architecture
    arch = copy.deepcopy(architecture)
    if arch["network_class_name"] != MORPH_NETWORK_PATH:
        arch["arch_kwargs"]["morph_base_network"] = arch["network_class_name"]
        arch["network_class_name"] = MORPH_NETWORK_PATH
    arch["arch_kwargs"]["morph_ops"] = morph_ops
    return arch


def apply_dp_to_configuration(plans: dict, resolved_configuration: dict, configuration_name: str, *,
                              norm_conversion: NormConversion, num_groups: int,
                              morph_ops: dict[str, list] | None = None) -> None:
    """In place, on both the plans dict (saved to the results folder) and the resolved configuration used now:
    batch Dice off (it couples cases), per-sample norms, and DP-Morph in training where `morph_ops` names any."""
    arch = morph_architecture(dp_architecture(resolved_configuration["architecture"], norm_conversion=norm_conversion,
                                              num_groups=num_groups), morph_ops or {})
    for target in (plans["configurations"][configuration_name], resolved_configuration):
        target["architecture"] = copy.deepcopy(arch)
        target["batch_dice"] = False


# ---- plans made without the data (nnUNetv2_dp_plan) ---------------------------------------------------------------
DP_PLAN_KEY = "nnunet_dp_plan"  # the record nnUNetv2_dp_plan writes into the plans (nnunet_dp.tools.dp_plan)
FINGERPRINT_JSON = "dataset_fingerprint.json"
WITHHELD_FINGERPRINT = {
    "nnunet_dp": ("not copied: these plans were written by nnUNetv2_dp_plan from user-given values and do not use the "
                  "dataset fingerprint. nnU-Net's dataset_fingerprint.json (if one was extracted) is computed from the "
                  "private cases and stays in nnUNet_preprocessed; this placeholder lets nnU-Net's model export run.")}


def plans_digest(plans: dict, configuration: str) -> str:
    """sha256 of everything in the plans that decides preprocessing and the network's shape for `configuration`
    (normalisation and its intensity values, spacing, patch size, topology, axis order). nnUNetv2_dp_plan stores it;
    the trainer recomputes it: plans edited afterwards no longer count as written from user-given values. The DP
    trainer's own changes (norm layer, batch Dice: apply_dp_to_configuration) are not part of it."""
    conf = plans["configurations"][configuration]
    arch = conf.get("architecture", {}).get("arch_kwargs", {})
    fields = {"intensity": plans.get("foreground_intensity_properties_per_channel"),
              "transpose": [plans.get("transpose_forward"), plans.get("transpose_backward")],
              **{k: conf.get(k) for k in ("spacing", "patch_size", "normalization_schemes", "use_mask_for_norm",
                                          "resampling_fn_data", "resampling_fn_data_kwargs")},
              **{k: arch.get(k) for k in ("n_stages", "strides", "kernel_sizes")}}
    text = json.dumps(json.loads(json.dumps(fields)), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def plans_provenance(plans: dict, configuration: str) -> dict[str, Any]:
    """privacy.json's `plans`: which plans were used and whether they read nothing private (written by
    nnUNetv2_dp_plan for this configuration and unchanged since)."""
    out: dict[str, Any] = {"plans_name": plans.get("plans_name"), "configuration": configuration,
                           "dataset_name": plans.get("dataset_name"),
                           "experiment_planner_used": plans.get("experiment_planner_used")}
    record = plans.get(DP_PLAN_KEY)
    entry = record.get("configurations", {}).get(configuration) if isinstance(record, dict) else None
    if not isinstance(entry, dict):
        return {**out, "source": ("not recorded: nnU-Net's planner on this dataset's fingerprint, or plans moved from "
                                  "another dataset (nnUNetv2_move_plans_between_datasets rewrites dataset_name, so "
                                  "the two cannot be told apart here)"), "data_independent": False}
    unchanged = entry.get("sha256") == plans_digest(plans, configuration)
    out.update(source=record.get("source"), command=entry.get("command"), values=entry.get("values"),
               data_independent=unchanged)
    if not unchanged:
        out["why_not"] = ("the plans were changed after nnUNetv2_dp_plan wrote them (their spacing, patch size, "
                          "topology or normalisation no longer match its record)")
    return out


def start_without_fingerprint(trainer: nnUNetTrainer) -> None:
    """nnUNetTrainer.on_train_start (nnunetv2 2.8) without its copy of the private dataset_fingerprint.json into the
    results folder: with plans from nnUNetv2_dp_plan nothing in training needs it, so it is neither read nor copied
    (a placeholder saying so takes its place). tests/test_dp_plan.py fails when nnU-Net's method changes."""
    if not trainer.was_initialized:
        trainer.initialize()
    trainer.dataloader_train, trainer.dataloader_val = trainer.get_dataloaders()
    maybe_mkdir_p(trainer.output_folder)
    trainer.set_deep_supervision_enabled(trainer.enable_deep_supervision)
    trainer.print_plans()
    empty_cache(trainer.device)
    if trainer.local_rank == 0:
        trainer.dataset_class.unpack_dataset(trainer.preprocessed_dataset_folder, overwrite_existing=False,
                                             num_processes=max(1, round(get_allowed_n_proc_DA() // 2)), verify=True)
    if trainer.is_ddp:
        dist.barrier()
    save_json(trainer.plans_manager.plans, join(trainer.output_folder_base, "plans.json"), sort_keys=False)
    save_json(trainer.dataset_json, join(trainer.output_folder_base, "dataset.json"), sort_keys=False)
    save_json(WITHHELD_FINGERPRINT, join(trainer.output_folder_base, FINGERPRINT_JSON), sort_keys=False)
    trainer.print_to_log_file("DP: plans from nnUNetv2_dp_plan; dataset_fingerprint.json was not read or copied")
    trainer.plot_network_architecture()
    trainer._save_debug_information()
