"""nnUNetv2_dp_advise: before training, how loud the DP noise will be for a dataset, and what changes it.

Reads only nnUNet_preprocessed's plans, dataset.json and splits_final.json (never an image or a label; with
--pretrained also that public checkpoint, for the fine-tuning lr), builds the
network from the plans exactly as the DP trainer does (DP plan changes, the trainer's build_network_architecture) to
count its parameters, and prints, per target epsilon, expected batch size and number of epochs: q, sigma (calibrated as
training calibrates it), epsilon, the noise-to-signal ratio sigma * sqrt(d) / (qN), and the default learning rate.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import inspect
import io
import json
import os
from os.path import isdir, isfile, join
from typing import Any

from nnunet_dp.advise import NOISE_RATIO_SEVERE, NOISE_RATIO_WARN, advice, advise_row, advise_table, noise_summary
from nnunet_dp.config import DPConfig
from nnunet_dp.errors import DPConfigError
from nnunet_dp.tools.prediction import lever_dimensions, predict, render_prediction

_META_FILES = {"dataset.json", "dataset_fingerprint.json", "splits_final.json"}


class AdviseInputError(ValueError):
    """A bad command-line value; the message names the option, the value and what is allowed."""


def dataset_folder(dataset: str, configuration: str) -> str:
    """The preprocessed folder of -d (an id or a DatasetXXX_Name), with errors that say what to run."""
    root = os.environ.get("nnUNet_preprocessed")
    if not root or not isdir(root):
        raise AdviseInputError(f"nnUNet_preprocessed = {root!r} is not an existing folder: set it as for nnU-Net "
                               "(documentation/setting_up_paths.md)")
    if dataset.startswith("Dataset"):
        names = [dataset] if isdir(join(root, dataset)) else []
    elif dataset.isdigit():
        names = sorted(n for n in os.listdir(root) if n.startswith(f"Dataset{int(dataset):03d}_")
                       and isdir(join(root, n)))
    else:
        raise AdviseInputError(f"-d {dataset!r} is not allowed: a dataset id (e.g. 4) or name (Dataset004_Hippocampus)")
    if len(names) != 1:
        found = "several datasets with this id: " + ", ".join(names) if names else "no such dataset"
        raise AdviseInputError(f"-d {dataset}: {found} in nnUNet_preprocessed = {root}. Plan and preprocess it first: "
                               f"nnUNetv2_plan_and_preprocess -d {dataset} -c {configuration}")
    return join(root, names[0])


def _load_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise AdviseInputError(f"{path} cannot be read ({type(e).__name__}: {e}); run nnUNetv2_plan_and_preprocess "
                               "for this dataset again") from e


def read_inputs(folder: str, plans_id: str, configuration: str) -> tuple[dict, dict]:
    """(plans, dataset.json); a missing plans file or configuration names the option and what exists."""
    plans_file = join(folder, f"{plans_id}.json")
    if not isfile(plans_file):
        have = sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".json") and f not in _META_FILES)
        raise AdviseInputError(f"-p {plans_id}: no {plans_file}; plans here: {', '.join(have) or 'none'} (run "
                               "nnUNetv2_plan_and_preprocess, or give -p one of these)")
    plans, dataset_json = _load_json(plans_file), _load_json(join(folder, "dataset.json"))
    if configuration not in plans.get("configurations", {}):
        raise AdviseInputError(f"-c {configuration}: not in {plans_file}; allowed: "
                               f"{', '.join(plans.get('configurations', {}))}")
    return plans, dataset_json


def training_cases(folder: str, dataset_json: dict, fold: int | str) -> tuple[int, str]:
    """N for the fold, as nnU-Net's do_split finds it, and where it came from (no case is read)."""
    total = dataset_json.get("numTraining")
    if not isinstance(total, int) or total < 1:
        raise AdviseInputError(f"dataset.json of {folder} has numTraining = {total!r}; it needs an integer >= 1")
    if fold == "all":
        return total, f"fold 'all': all {total} cases of dataset.json numTraining"
    splits_file = join(folder, "splits_final.json")
    n_folds = 5
    if isfile(splits_file):
        with open(splits_file) as f:
            splits = json.load(f)
        if fold < len(splits):
            return len(splits[fold]["train"]), f"splits_final.json, fold {fold}"
        n_folds = len(splits)
    if fold >= n_folds:  # nnU-Net then makes a seeded random 80:20 split
        n = int(total * 0.8)
        return n, f"fold {fold} is not among the {n_folds} folds: nnU-Net's random 80:20 split of {total} cases"
    val = total // 5 + (1 if fold < total % 5 else 0)  # sklearn KFold, as nnU-Net's generate_crossval_split
    return total - val, (f"no splits_final.json yet: fold {fold} of the 5-fold split nnU-Net will make of "
                         f"numTraining = {total} (about 80 %)")


def find_trainer(name: str) -> type:
    """The DP trainer class -tr names: this package's trainers, else nnU-Net's search (nnUNet_extTrainer too)."""
    import nnunet_dp.trainers.nnunet_dp_trainers as ours
    from nnunet_dp.nnunet.trainer import nnUNetTrainerDP

    cls = getattr(ours, name, None)
    if cls is None:
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                cls = recursive_find_trainer_class_by_name(name)
            except (RuntimeError, AssertionError):
                cls = None
    if not (inspect.isclass(cls) and issubclass(cls, nnUNetTrainerDP)):
        allowed = ", ".join(n for n in ours.__all__)
        raise AdviseInputError(f"-tr {name}: {'not found' if cls is None else 'not a DP trainer'}; allowed: a "
                               f"subclass of nnUNetTrainerDP, e.g. {allowed} (others via nnUNet_extTrainer)")
    return cls


# the prediction for your settings (the first target epsilon) at the JSON's top level, as the docs name them
TOP_LEVEL = ("predicted_ratio_low", "predicted_ratio_high", "cases_for_ratio_0.5", "cases_for_ratio_0.8")


def load_settings(trainer: type, trainable: str | None, fold_folder: str | None = None) -> tuple[DPConfig, str]:
    """The DP settings the training will use: nnUNet_dp_config on the trainer's defaults; without it the fold
    folder's dp_config.json when one exists (what a --c would continue with; the trainer reads it the same way);
    else the defaults."""
    from nnunet_dp.nnunet.resume import load_dp_config

    try:
        if fold_folder is not None:
            cfg, source = load_dp_config(fold_folder, trainer.dp_defaults)
        else:
            cfg = DPConfig.from_env(**trainer.dp_defaults)
            source = os.environ.get("nnUNet_dp_config") or "defaults (nnUNet_dp_config not set)"
    except DPConfigError as e:
        raise AdviseInputError(str(e)) from e
    return (dataclasses.replace(cfg, trainable=trainable) if trainable else cfg), source


def fold_folder_of(dataset_name: str, trainer: str, plans: str, configuration: str, fold: int | str) -> str | None:
    """The fold folder nnU-Net would train into, when nnUNet_results is set."""
    if not os.environ.get("nnUNet_results"):
        return None
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    return get_output_folder(dataset_name, trainer, plans, configuration, fold)


def default_grid(cfg: DPConfig, *, n: int, plans_batch: int) -> tuple[list[float], list[int]]:
    """Batch sizes {B, 2B, 4B, N/4} at most N, and epochs {E, 2E, 4E}."""
    batches = sorted({min(float(b), float(n)) for b in (plans_batch, 2 * plans_batch, 4 * plans_batch, n / 4)})
    return batches, sorted({cfg.num_epochs * k for k in (1, 2, 4)})


def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def format_row(row: dict[str, Any], mark: str = "") -> str:
    head = f"{mark:1}{_fmt(row['target_epsilon'], 'g'):>6} {row['expected_batch_size']:>7.4g} " \
           f"{_fmt(row['sampling_rate'], '.4f'):>7} {row['epochs']:>6} {row['steps']:>7}"
    if not row["feasible"]:
        return f"{head}  infeasible: {row['reason']}"
    flag = {"ok": "", "warn": "  !", "severe": "  !!"}[row["level"]]
    return (f"{head} {row['noise_multiplier']:>8.4g} {row['epsilon']:>7.3f} {row['noise_per_coordinate']:>9.3g} "
            f"{row['noise_norm']:>9.4g} {row['noise_ratio']:>8.4g} {row['lr']:>8.4g} {row['effective_step']:>7.3g}{flag}")


HEADER = (f"{'':1}{'eps*':>6} {'qN':>7} {'q':>7} {'epochs':>6} {'steps':>7} {'sigma':>8} {'eps':>7} "
          f"{'noise/c':>9} {'|noise|':>9} {'ratio':>8} {'lr':>8} {'lr_eff':>7}")


def public_start(network: Any, path: str, dataset_json: dict, cfg: DPConfig) -> dict[str, Any]:
    """Load the public checkpoint into `network` as a DP training does (nnU-Net's load_pretrained_weights, then the
    heads when cfg.transfer_heads and the labels match): what the fine-tuning rule reads. Errors name --pretrained."""
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    from nnunet_dp.errors import DPCheckpointError
    from nnunet_dp.nnunet.finetune import transfer_heads

    if not isfile(path):
        raise AdviseInputError(f"--pretrained {path}: no such file; give the checkpoint_final.pth of the public "
                               "training (the file nnUNetv2_train's -pretrained_weights will get)")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            load_pretrained_weights(network, path, verbose=False)
        copied, heads = transfer_heads(path, network, dataset_json) if cfg.transfer_heads else \
            ([], ("DP: segmentation heads not transferred (transfer_heads=false): they start from random "
                  "initialisation and train"))
    except (AssertionError, KeyError, DPCheckpointError, RuntimeError) as e:
        raise AdviseInputError(f"--pretrained {path}: not a checkpoint of this network ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else 'no network_weights'}); it must come from an "
                               "nnU-Net training with the same plans (architecture)") from e
    return {"path": os.path.abspath(path), "heads_transferred": bool(copied), "heads": heads.removeprefix("DP: ")}


def count_parameters(trainer: type, plans: dict, dataset_json: dict, configuration: str,
                     cfg: DPConfig, pretrained: str | None = None) -> dict[str, Any]:
    """Parameters of the network the DP trainer builds (its __init__'s plan changes, then initialize's
    build_network_architecture), all and those `cfg.trainable` trains (the trainer's select_trainable), and the plans'
    batch size. Built on the meta device: shapes only, no memory, no data. With `pretrained`, built on the CPU and
    loaded from that public checkpoint: also the RMS of the trained weights (`weight_rms`, the fine-tuning rule's
    input) and what happened to the heads."""
    import torch
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_dp.nnunet.finetune import not_from_public, trained_rms
    from nnunet_dp.nnunet.plans import apply_dp_to_configuration
    from nnunet_dp.nnunet.selection import add_lora_, select_trainable

    manager = PlansManager(copy.deepcopy(plans))
    conf = manager.get_configuration(configuration)
    apply_dp_to_configuration(manager.plans, conf.configuration, configuration, norm_conversion=cfg.norm_conversion,
                              num_groups=cfg.group_norm_groups)
    channels = determine_num_input_channels(manager, conf, dataset_json)
    heads = manager.get_label_manager(dataset_json).num_segmentation_heads
    if "plans_manager" in inspect.signature(trainer.build_network_architecture).parameters:
        build_args = (manager, conf, channels, heads, True)  # enable_deep_supervision: nnU-Net's default
    else:  # nnU-Net's old signature
        build_args = (conf.network_arch_class_name, conf.network_arch_init_kwargs,
                      conf.network_arch_init_kwargs_req_import, channels, heads, True)

    def build(device: str = "meta") -> Any:
        try:
            with torch.device(device):
                return trainer.build_network_architecture(*build_args)
        except (RuntimeError, NotImplementedError):  # an architecture that cannot be built on the meta device
            return trainer.build_network_architecture(*build_args)

    network = build("cpu" if pretrained else "meta")
    start = None if pretrained is None else public_start(network, pretrained, dataset_json, cfg)
    if cfg.trainable == "lora":
        add_lora_(network, cfg)
    try:
        selection = select_trainable(network, cfg.trainable)  # the trainer's own selection
    except DPConfigError as e:
        raise AdviseInputError(f"--trainable / setting trainable = {cfg.trainable!r}: needs {e.allowed}") from e
    if start is not None:
        start["weight_rms"] = trained_rms(selection, not_from_public(network, start["heads_transferred"]))
    heads_projected = bool(start and start["heads_transferred"])
    return {"all": selection.num_parameters, "trained": selection.num_trained, "plans_batch_size": int(conf.batch_size),
            "pretrained": start, "levers": lever_dimensions(build, cfg, heads_projected=heads_projected)}


def advise(args: argparse.Namespace) -> dict[str, Any]:
    """Everything the command prints, as one JSON-able dict."""
    folder = dataset_folder(args.d, args.c)
    plans, dataset_json = read_inputs(folder, args.p, args.c)
    n, n_source = training_cases(folder, dataset_json, args.f)
    trainer = find_trainer(args.tr)
    cfg, source = load_settings(trainer, args.trainable,
                                fold_folder_of(os.path.basename(folder), args.tr, args.p, args.c, args.f))
    counts = count_parameters(trainer, plans, dataset_json, args.c, cfg, args.pretrained)
    start = counts["pretrained"]
    plans_batch = counts["plans_batch_size"]
    batches, epochs = default_grid(cfg, n=n, plans_batch=plans_batch)
    batches, epochs = args.batch_sizes or batches, args.epochs or epochs
    common = {"rule": trainer.dp_rule, "num_training_cases": n, "plans_batch_size": plans_batch,
              "num_trained_parameters": counts["trained"], "weight_rms": start and start["weight_rms"]}
    rows, current = [], []
    # one settings object per target epsilon; a fixed noise_multiplier only when no epsilon is given at all
    for c in [dataclasses.replace(cfg, target_epsilon=e, noise_multiplier=None) for e in args.target_epsilon or []] \
            or [cfg]:
        rows += advise_table(c, **common, batch_sizes=batches, epoch_counts=epochs)
        current.append(advise_row(c, **common, expected_batch_size=c.sampling_rate_for(n, plans_batch) * n,
                                  epochs=c.num_epochs))
    predictions = [predict(levers=counts["levers"], cfg=cfg, num_cases=n, epsilon=c["epsilon"],
                           pretrained=start is not None) for c in current if c["feasible"]]
    return {"dataset": os.path.basename(folder), "configuration": args.c, "plans": args.p, "trainer": args.tr,
            "rule": trainer.dp_rule, "fold": args.f, "num_training_cases": n, "num_training_cases_source": n_source,
            "plans_batch_size": plans_batch, "settings_source": source, "trainable": cfg.trainable,
            "num_parameters": counts["all"], "num_trained_parameters": counts["trained"],
            "clip_norm": cfg.clip_norm, "delta": cfg.delta, "accountant": cfg.accountant, "momentum": cfg.momentum,
            "num_iterations_per_epoch": cfg.num_iterations_per_epoch, "initial_lr_setting": cfg.initial_lr,
            "warn_above": NOISE_RATIO_WARN, "severe_above": NOISE_RATIO_SEVERE, "pretrained": start,
            "current": current, "rows": rows, "private_randomness": cfg.private_randomness,
            "predictions": predictions, **{k: predictions[0][k] if predictions else None for k in TOP_LEVEL}}


def _context(r: dict[str, Any]) -> list[str]:
    return [(f"{r['dataset']} {r['configuration']} ({r['plans']}), trainer {r['trainer']} (rule {r['rule']}), fold "
            f"{r['fold']}; settings: {r['settings_source']}"),
            f"N = {r['num_training_cases']} training cases ({r['num_training_cases_source']})",
            (f"d = {r['num_trained_parameters']:,} trained parameters (trainable: {r['trainable']}) of "
            f"{r['num_parameters']:,}; plans' batch size {r['plans_batch_size']}"),
            (f"C = {r['clip_norm']:g}, delta = {r['delta']:g} ({r['accountant']}), {r['num_iterations_per_epoch']} "
            f"steps per epoch, momentum {r['momentum']:g}"),
            "",
            (f"ratio = sigma*sqrt(d)/(qN), the noise norm on the averaged update over the largest signal C: ! above "
            f"{r['warn_above']:g}, !! above {r['severe_above']:g} (not expected to learn from scratch). lr: " +
            ("the DP default learning rate from scratch (nnunet_dp.optim.default_lr)" if r["pretrained"] is None else
             f"the fine-tuning rule (nnunet_dp.optim.finetune_lr) from the RMS {r['pretrained']['weight_rms']:.4g} "
             f"of the public weights that train, {r['pretrained']['path']}; {r['pretrained']['heads']}") +
            "; lr_eff = lr/(1 - momentum).")]


def render(r: dict[str, Any]) -> str:
    """The report as text: context, the table (current settings marked *), the warning for the current settings."""
    current = {(c["target_epsilon"], c["expected_batch_size"], c["epochs"]) for c in r["current"]}
    lines = [*_context(r), "", HEADER]
    lines += [format_row(row, "*" if (row["target_epsilon"], row["expected_batch_size"], row["epochs"]) in current
                         else "") for row in r["rows"]]
    lines += ["", "Your settings (*):", HEADER, *(format_row(c, "*") for c in r["current"])]
    if r["initial_lr_setting"] is not None:
        lines.append(f"initial_lr = {r['initial_lr_setting']:g} in your settings overrides the lr column.")
    if not r["private_randomness"]:
        lines += ["", ("NOT PRIVATE: your settings set a `seed`. The noise can be regenerated from it and removed from the "
                  "weights: the training would be reproducible, not private. Remove `seed` for a private training.")]
    for p in r["predictions"]:
        lines += ["", *render_prediction(p)]
    for c in r["current"]:
        if c["feasible"] and (text := advice(noise_summary(
                noise_multiplier=c["noise_multiplier"], clip_norm=r["clip_norm"],
                expected_batch_size=c["expected_batch_size"], num_trained_parameters=r["num_trained_parameters"]),
                finetuning=r["pretrained"] is not None)):
            lines += ["", f"target epsilon {_fmt(c['target_epsilon'], 'g')}: {text}"]
    return "\n".join(lines)
