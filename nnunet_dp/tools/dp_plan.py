"""nnUNetv2_dp_plan: an nnU-Net plans file from user-given values only (no fingerprint, no image).

nnU-Net's planner sets spacing, patch size and CT normalisation from the dataset fingerprint (all cases, no noise).
This command writes the same plans format from values the user gives: spacing, patch size, normalisation per
channel. The topology comes from nnU-Net's own get_pool_and_conv_props for that patch size and spacing. It reads only
dataset.json (channels, labels, file ending; copied to nnUNet_preprocessed as nnU-Net's planner does) and a
splits_final.json in the raw folder if there is one. The axes are nnU-Net's array axes as its reader returns them
(no transposition: transpose_forward [0, 1, 2], like nnU-Net's `suppress_transpose`).
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Literal, get_args

from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json, maybe_mkdir_p, save_json
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from dynamic_network_architectures.building_blocks.helper import convert_dim_to_conv_op, get_matching_instancenorm
from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape

from nnunet_dp.errors import DPError
from nnunet_dp.nnunet.plans import DP_PLAN_KEY, plans_digest

Configuration = Literal["2d", "3d_fullres"]


NormalizationName = Literal["zscore-per-image", "ct-window", "rescale-to-0-1", "rgb-to-0-1", "nonorm"]


# nnU-Net's normalisation class for each name; none of them reads anything across cases (ct-window: only the window)
SCHEMES: dict[str, str] = {"zscore-per-image": "ZScoreNormalization", "ct-window": "CTNormalization",
                           "rescale-to-0-1": "RescaleTo01Normalization", "rgb-to-0-1": "RGBTo01Normalization",
                           "nonorm": "NoNormalization"}


MIN_FEATURE_MAP = 4  # nnU-Net's UNet_featuremap_min_edge_length


MAX_FEATURES = {2: 512, 3: 320}  # nnU-Net's UNet_max_features_2d / _3d


DEFAULT_BATCH = {2: 12, 3: 2}  # nnU-Net's reference batch sizes; DP training samples its own batches (q)


ALLOWED_NORM = "zscore-per-image, ct-window:LO,HI[,MEAN,STD], rescale-to-0-1, rgb-to-0-1 or nonorm"


class DPPlanError(DPError, ValueError):
    """A bad nnUNetv2_dp_plan option: names the option, the value, what is allowed and how to fix it."""

    def __init__(self, option: str, value: Any, allowed: str, fix: str) -> None:
        self.option, self.value = option, value
        super().__init__(f"nnUNetv2_dp_plan: {option} = {value!r} is not allowed: {allowed}. Fix: {fix}")


@dataclass(frozen=True)
class ChannelNorm:
    """One channel's normalisation. ct-window: clip to [lo, hi], then (x - mean) / std; mean and std default to the
    window's centre and half width, which maps the window onto [-1, 1]."""
    name: NormalizationName
    window: tuple[float, float, float, float] | None = None  # lo, hi, mean, std

    def intensity_properties(self) -> dict[str, float]:
        """nnU-Net's foreground_intensity_properties for this channel: only CTNormalization reads them."""
        if self.window is None:
            return {}
        lo, hi, mean, std = self.window
        return {"mean": mean, "median": mean, "std": std, "min": lo, "max": hi,
                "percentile_00_5": lo, "percentile_99_5": hi}


def parse_normalization(text: str) -> ChannelNorm:
    name, _, rest = text.partition(":")
    if name not in get_args(NormalizationName):
        raise DPPlanError("--normalization", text, ALLOWED_NORM, "give one of these per channel (or one for all)")
    if name != "ct-window":
        if rest:
            raise DPPlanError("--normalization", text, ALLOWED_NORM, f"write {name} without ':...'")
        return ChannelNorm(name)
    try:
        values = [float(v) for v in rest.split(",")]
    except ValueError:
        values = []
    if len(values) not in (2, 4) or not all(abs(v) < float("inf") for v in values):
        raise DPPlanError("--normalization", text, "ct-window:LO,HI or ct-window:LO,HI,MEAN,STD with finite numbers",
                          "e.g. ct-window:-160,240 (soft tissue, in HU)")
    lo, hi = values[:2]
    if lo >= hi:
        raise DPPlanError("--normalization", text, "a window with LO < HI", f"e.g. ct-window:{min(lo, hi)},"
                          f"{max(lo, hi) if lo != hi else hi + 1}")
    mean, std = values[2:] if len(values) == 4 else ((lo + hi) / 2, (hi - lo) / 2)
    if std <= 0:
        raise DPPlanError("--normalization", text, "STD > 0", "give a positive STD or leave MEAN,STD out")
    return ChannelNorm("ct-window", (lo, hi, mean, std))


def check_geometry(configuration: str, spacing: Sequence[float], patch_size: Sequence[int]) -> int:
    """The number of spatial dimensions; stops on spacing/patch sizes that do not fit the configuration."""
    if configuration not in get_args(Configuration):
        raise DPPlanError("-c", configuration, "2d or 3d_fullres", "plan one of these configurations")
    dim = 2 if configuration == "2d" else 3
    if len(spacing) != dim or not all(0 < s < float("inf") for s in spacing):
        raise DPPlanError("--spacing", list(spacing), f"{dim} positive numbers (mm) for {configuration}",
                          f"give {dim} target spacings in nnU-Net's axis order, e.g. {' '.join(['1.0'] * dim)}")
    if len(patch_size) != dim or not all(p >= 1 for p in patch_size):
        raise DPPlanError("--patch-size", list(patch_size), f"{dim} positive integers for {configuration}",
                          f"give {dim} sizes in voxels, e.g. {' '.join(['64'] * dim)}")
    return dim


def topology(spacing: Sequence[float], patch_size: Sequence[int]) -> dict[str, Any]:
    """nnU-Net's own topology rule (get_pool_and_conv_props) for this spacing and patch size. The patch size it
    returns is the given one padded to a multiple of 2**pools per axis."""
    _, strides, kernels, patch, _ = get_pool_and_conv_props(list(spacing), list(patch_size), MIN_FEATURE_MAP, 999999)
    return {"strides": [list(map(int, s)) for s in strides], "kernel_sizes": [list(map(int, k)) for k in kernels],
            "patch_size": [int(p) for p in patch], "n_stages": len(strides)}


def features_per_stage(features: Sequence[int] | None, n_stages: int, dim: int) -> list[int]:
    """One value: the first stage's features, doubled per stage up to nnU-Net's cap; n_stages values: as given."""
    base = list(features or [32])
    if len(base) == 1 and base[0] >= 1:
        return [min(MAX_FEATURES[dim], base[0] * 2 ** i) for i in range(n_stages)]
    if len(base) != n_stages or min(base) < 1:
        raise DPPlanError("--features", base, f"one positive integer, or {n_stages} (one per stage of this topology)",
                          "e.g. --features 32")
    return base


def architecture(topo: dict[str, Any], features: list[int], dim: int) -> dict[str, Any]:
    """The 'architecture' entry nnU-Net's ExperimentPlanner writes (PlainConvUNet, InstanceNorm, LeakyReLU)."""
    conv_op = convert_dim_to_conv_op(dim)
    norm = get_matching_instancenorm(conv_op)
    n = topo["n_stages"]
    return {"network_class_name": f"{PlainConvUNet.__module__}.{PlainConvUNet.__name__}",
            "arch_kwargs": {"n_stages": n, "features_per_stage": features,
                            "conv_op": f"{conv_op.__module__}.{conv_op.__name__}",
                            "kernel_sizes": topo["kernel_sizes"], "strides": topo["strides"],
                            "n_conv_per_stage": [2] * n, "n_conv_per_stage_decoder": [2] * (n - 1),
                            "conv_bias": True, "norm_op": f"{norm.__module__}.{norm.__name__}",
                            "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None,
                            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                            "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


def configuration_entry(plans_name: str, configuration: str, topo: dict[str, Any], spacing: Sequence[float],
                        norms: list[ChannelNorm], batch_size: int, arch: dict[str, Any]) -> dict[str, Any]:
    """One configuration in nnU-Net's format. median_image_size_in_voxels (nnU-Net: from the fingerprint; used only
    for planning) is set to the patch size; no mask is used for normalisation (per image, no cross-case choice)."""
    data_kwargs = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    return {"data_identifier": f"{plans_name}_{configuration}", "preprocessor_name": "DefaultPreprocessor",
            "batch_size": batch_size, "patch_size": topo["patch_size"],
            "median_image_size_in_voxels": topo["patch_size"], "spacing": [float(s) for s in spacing],
            "normalization_schemes": [SCHEMES[n.name] for n in norms], "use_mask_for_norm": [False] * len(norms),
            "resampling_fn_data": resample_data_or_seg_to_shape.__name__,
            "resampling_fn_seg": resample_data_or_seg_to_shape.__name__,
            "resampling_fn_data_kwargs": data_kwargs,
            "resampling_fn_seg_kwargs": {**data_kwargs, "is_seg": True, "order": 1},
            "resampling_fn_probabilities": resample_data_or_seg_to_shape.__name__,
            "resampling_fn_probabilities_kwargs": {**data_kwargs, "order": 1},
            "architecture": arch, "batch_dice": False}


def channel_norms(texts: Sequence[str], dataset_json: dict) -> list[ChannelNorm]:
    channels = dataset_json.get("channel_names") or dataset_json.get("modality") or {}
    norms = [parse_normalization(t) for t in texts]
    if len(norms) == 1:
        norms = norms * len(channels)
    if len(norms) != len(channels):
        raise DPPlanError("--normalization", list(texts), f"one value, or one per channel ({len(channels)}: "
                          f"{', '.join(map(str, channels.values()))})", "give one normalisation per channel in order")
    return norms


def build_plans(args: argparse.Namespace, dataset_name: str, dataset_json: dict, command: str) -> dict[str, Any]:
    """The plans for one configuration, from the arguments and dataset.json only."""
    dim = check_geometry(args.c, args.spacing, args.patch_size)
    norms = channel_norms(args.normalization, dataset_json)
    batch_size = DEFAULT_BATCH[dim] if args.batch_size is None else args.batch_size
    if batch_size < 1:
        raise DPPlanError("--batch-size", batch_size, "an integer >= 1", f"e.g. --batch-size {DEFAULT_BATCH[dim]}")
    topo = topology(args.spacing, args.patch_size)
    arch = architecture(topo, features_per_stage(args.features, topo["n_stages"], dim), dim)
    rw = determine_reader_writer_from_dataset_json(dataset_json, None, verbose=False)  # by file ending: no image read
    plans = {"dataset_name": dataset_name, "plans_name": args.p,
             "original_median_spacing_after_transp": [float(s) for s in args.spacing],
             "original_median_shape_after_transp": topo["patch_size"], "image_reader_writer": rw.__name__,
             "transpose_forward": list(range(3)), "transpose_backward": list(range(3)),
             "configurations": {args.c: configuration_entry(args.p, args.c, topo, args.spacing, norms, batch_size,
                                                            arch)},
             "experiment_planner_used": "nnUNetv2_dp_plan", "label_manager": "LabelManager",
             "foreground_intensity_properties_per_channel": {str(c): n.intensity_properties()
                                                             for c, n in enumerate(norms)}}
    values = {"spacing": [float(s) for s in args.spacing], "patch_size": topo["patch_size"],
              "patch_size_given": list(args.patch_size), "normalization": list(args.normalization),
              "batch_size": batch_size, "features_per_stage": arch["arch_kwargs"]["features_per_stage"]}
    plans[DP_PLAN_KEY] = {"source": "user-given values", "tool": "nnUNetv2_dp_plan", "version": _version(),
                          "reads": "dataset.json (channels, labels, file ending); no image, no dataset_fingerprint.json",
                          "configurations": {args.c: {"command": command, "values": values,
                                                      "sha256": plans_digest(plans, args.c)}}}
    return plans


def _version() -> str:
    try:
        return metadata.version("nnunet-dp")
    except metadata.PackageNotFoundError:
        return "not installed"


def merge_into_existing(path: str, plans: dict[str, Any], configuration: str) -> dict[str, Any]:
    """Add this configuration to plans that nnUNetv2_dp_plan wrote before (as nnU-Net's planner keeps other
    configurations); never into plans made from the fingerprint, and never with other shared values."""
    if not isfile(path):
        return plans
    old = load_json(path)
    if DP_PLAN_KEY not in old:
        raise DPPlanError("-p", plans["plans_name"], "a plans name not used by plans made from the fingerprint",
                          f"{path} was not written by nnUNetv2_dp_plan; choose another -p (default nnUNetPlans_dp)")
    for key in ("foreground_intensity_properties_per_channel", "transpose_forward", "image_reader_writer"):
        if old.get(key) != plans[key]:
            raise DPPlanError("--normalization", plans[DP_PLAN_KEY]["configurations"][configuration]["values"]
                              ["normalization"], f"the values of the other configurations in {path} ({key})",
                              "use the same normalisation as before, or another -p")
    old["configurations"][configuration] = plans["configurations"][configuration]
    old[DP_PLAN_KEY]["configurations"][configuration] = plans[DP_PLAN_KEY]["configurations"][configuration]
    return old


def write_plans(plans: dict[str, Any], dataset_name: str, raw_folder: str, preprocessed: str, configuration: str) -> str:
    """Writes <preprocessed>/<dataset>/<plans_name>.json and copies dataset.json (and a raw splits_final.json) there,
    as nnU-Net's planner does. Returns the plans file's path."""
    folder = join(preprocessed, dataset_name)
    maybe_mkdir_p(folder)
    path = join(folder, f"{plans['plans_name']}.json")
    plans = merge_into_existing(path, plans, configuration)
    for name in ("dataset.json", "splits_final.json"):
        if isfile(join(raw_folder, name)) and (name == "dataset.json" or not isfile(join(folder, name))):
            shutil.copy(join(raw_folder, name), join(folder, name))
    save_json(plans, path, sort_keys=False)
    return path
