"""Fine-tuning from public weights: the record of the public checkpoint a training starts from (`nnUNetv2_train ...
-pretrained_weights FILE`), its heads, the fine-tuning learning rate, and the EMA's checkpoint entries (which
parameters train is nnunet_dp.nnunet.selection). A public checkpoint costs no privacy, provided the pretraining data do not contain the private cases (privacy.json says so).

nnU-Net loads -pretrained_weights itself (run_training.maybe_load_checkpoint: trainer.initialize(), then
load_pretrained_weights(trainer.network, FILE)) and does not tell the trainer the file. The trainer reads the option
from the command line (`pretrained_weights_arg`) and records the file only if the network's weights equal the file's
for every key nnU-Net transfers (`pretrained_record`). nnU-Net never transfers the segmentation heads (another
dataset may have other labels); `transfer_heads` copies them too when the checkpoint's labels equal this dataset's,
so that fine-tuning starts from the public model's predictions rather than from random heads.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import torch
from torch import nn

from nnunet_dp import lora
from nnunet_dp.config import DPConfig
from nnunet_dp.ema import ParameterEMA
from nnunet_dp.nnunet.resume import read_checkpoint
from nnunet_dp.nnunet.selection import Selection
from nnunet_dp.optim import FINETUNE_DRIFT, finetune_lr

PRETRAINED_ASSUMPTION = ("The pretraining data must not contain the private training cases; epsilon covers only the "
                         "fine-tuning on them.")


SKIPPED_BY_NNUNET = ".seg_layers."  # nnunetv2.run.load_pretrained_weights never transfers the segmentation heads


_RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


# ---- the public checkpoint ----------------------------------------------------------------------------------------
def pretrained_weights_arg(argv: Sequence[str]) -> str | None:
    """The FILE of nnUNetv2_train's `-pretrained_weights FILE` (or `=FILE`) in `argv`, read as nnU-Net's own parser
    (run_training_entry) reads it. nnU-Net's `-p PLANS` is declared too: Python 3.11's argparse would otherwise read
    it as a prefix of -pretrained_weights (allow_abbrev=False does not stop that for single-dash options). A command
    line nnU-Net would refuse (e.g. the ambiguous `-pre`) names no file."""
    parser = _NoExitParser(add_help=False)
    parser.add_argument("-p", type=str, default=None)
    parser.add_argument("-pretrained_weights", type=str, default=None)
    try:
        args, _ = parser.parse_known_args(list(argv))
    except ValueError:
        return None
    return args.pretrained_weights


class _NoExitParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse would print usage and exit the training
        raise ValueError(message)


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _source_dataset(checkpoint: dict) -> str | None:
    init = checkpoint.get("init_args") or {}
    plans, dataset_json = init.get("plans") or {}, init.get("dataset_json") or {}
    return plans.get("dataset_name") or dataset_json.get("name")


def _untransferred_words(keys: list[str]) -> list[str]:
    """Plain words for the keys of the file that nnU-Net does not transfer."""
    heads = [k for k in keys if SKIPPED_BY_NNUNET in k]
    stats = [k for k in keys if k not in heads and k.rsplit(".", 1)[-1] in _RUNNING_STATS]
    other = [k for k in keys if k not in heads and k not in stats]
    words = []
    if heads:
        words.append(f"{len(heads)} segmentation-head tensors: nnU-Net never transfers them; the heads start from "
                     "random initialisation and train")
    if stats:
        words.append(f"{len(stats)} BatchNorm running statistics (running_mean, running_var, num_batches_tracked) of "
                     "the public network: they have no place in this per-sample norm network (GroupNorm/InstanceNorm "
                     "normalise each case by its own statistics); the norm layers' affine weights and biases were "
                     "transferred")
    if other:
        words.append(f"{len(other)} tensors with no counterpart in this network (e.g. {other[0]!r})")
    return words


def pretrained_record(path: str, model: nn.Module, dataset_name: str) -> tuple[dict[str, Any] | None, list[str]]:
    """privacy.json's `pretrained_weights` for the public checkpoint `path` that nnU-Net loaded into `model`, and
    log lines. None (with the reason logged) where the network's weights differ from the file's for a key that
    nnU-Net transfers: then the file was not what this network started from."""
    checkpoint = read_checkpoint(path)
    file_weights = checkpoint.get("network_weights")
    if not isinstance(file_weights, dict):
        return None, [f"DP: {path} holds no 'network_weights'; pretrained_weights recorded as null"]
    state = model.state_dict()
    mapped = [k for k in file_weights if k in state and SKIPPED_BY_NNUNET not in k]
    differ = [k for k in mapped if not torch.equal(state[k].detach().cpu(), file_weights[k].detach().cpu())]
    if differ or not mapped:
        why = f"{len(differ)} of the {len(mapped)} transferred tensors (e.g. {differ[0]!r})" if differ else \
            "no tensor of the file fits this network"
        return None, [(f"DP WARNING: -pretrained_weights {path} was given, but the network's weights differ from "
                       f"the file's in {why}: the file was not loaded into this network (a programmatic training?). "
                       "pretrained_weights is recorded as null.")]
    source = _source_dataset(checkpoint)
    transferred = set(mapped)
    not_transferred = sorted(k for k in file_weights if k not in transferred)
    record = {"path": os.path.abspath(path), "sha256": sha256_of(path), "plans_source_dataset": source,
              "other_dataset": None if source is None else source != dataset_name,
              "trainer_name": checkpoint.get("trainer_name"), "transferred": len(mapped),
              "not_transferred": not_transferred}
    lines = [(f"DP: fine-tuning from public weights {path} (sha256 {record['sha256'][:12]}..., trained on "
              f"{source or 'an unknown dataset'}): {len(mapped)} tensors transferred")]
    lines += [f"DP: not transferred: {w}" for w in _untransferred_words(not_transferred)]
    if source == dataset_name:
        lines.append(f"DP WARNING: the pretrained checkpoint's plans name this dataset ({source}). If it was trained "
                     "on these private cases (without this run's DP), epsilon does not protect them.")
    return record, lines


def transfer_heads(path: str, model: nn.Module, dataset_json: dict[str, Any]) -> tuple[list[str], str]:
    """Copy the checkpoint's segmentation heads (the keys nnU-Net skips) into `model` when the checkpoint's labels
    (its init_args' dataset_json) equal `dataset_json`'s and every head tensor has the same shape. Returns the keys
    copied (empty: nothing changed) and the log line that says what happened and why."""
    checkpoint = read_checkpoint(path)
    file_weights = checkpoint.get("network_weights") or {}
    state = model.state_dict()
    heads = sorted(k for k in state if SKIPPED_BY_NNUNET in k)
    theirs = ((checkpoint.get("init_args") or {}).get("dataset_json") or {}).get("labels")
    ours = dataset_json.get("labels")
    why = None
    if not heads:
        why = "this network has no segmentation heads under '.seg_layers.'"
    elif theirs != ours:
        why = (f"the checkpoint's labels {theirs!r} differ from this dataset's {ours!r}" if theirs is not None else
               "the checkpoint does not record its labels (init_args.dataset_json.labels)")
    elif any(k not in file_weights or tuple(file_weights[k].shape) != tuple(state[k].shape) for k in heads):
        why = "the checkpoint's head tensors do not fit this network's (names or shapes differ)"
    if why is not None:
        return [], f"DP: segmentation heads not transferred ({why}): they start from random initialisation and train"
    with torch.no_grad():
        for k in heads:
            state[k].copy_(file_weights[k].to(state[k].device, state[k].dtype))
    return heads, (f"DP: segmentation heads transferred from the public checkpoint too ({len(heads)} tensors; same "
                   "labels; transfer_heads=true; nnU-Net itself never transfers them)")


def trained_rms(selection: Selection, exclude: Any = ()) -> float | None:
    """Root mean square of the values of the trained parameters (after the public weights were loaded), leaving out
    `exclude` (parameters that did not come from the public file); None when nothing is left."""
    left = {id(p) for p in exclude}
    params = [p for p in selection.trained if id(p) not in left]
    if not params:
        return None
    with torch.no_grad():
        total = sum(float(p.detach().double().pow(2).sum()) for p in params)
    return math.sqrt(total / sum(p.numel() for p in params))


def not_from_public(model: nn.Module, heads_transferred: bool) -> list[nn.Parameter]:
    """Trained parameters that the public file did not provide: the segmentation heads when they were not transferred
    (other labels: random initialisation) and the LoRA factors (new)."""
    out = list(lora.factor_parameters(model))
    if not heads_transferred:
        out += list(model.decoder.seg_layers.parameters()) if hasattr(getattr(model, "decoder", None),
                                                                      "seg_layers") else []
    return out


def set_initial_lr(trainer: Any, lr: float, rule: str) -> None:
    """The initial lr of nnU-Net's SGD and poly schedule, after configure_optimizers built them."""
    trainer.initial_lr, trainer.dp_lr_rule = lr, rule
    trainer.lr_scheduler.initial_lr = lr
    for group in trainer.optimizer.param_groups:
        group["lr"] = lr


def apply_finetune_lr(trainer: Any) -> str:
    """A fresh start from public weights without an initial_lr setting: optim.finetune_lr from the RMS of the trained
    weights that came from the public file (no privacy cost), with the noise per trained coordinate of this run (a
    public projection draws it in fewer dimensions). Returns the log line."""
    plan, cfg = trainer._dp_setup().plan, trainer.dp_config
    net, record = trainer._plain_network(), trainer.dp_pretrained or {}
    rms = trained_rms(trainer.dp_selection, not_from_public(net, bool(record.get("heads_transferred"))))
    dims = (trainer.dp_projection or {}).get("noise_dimensions") or trainer.dp_selection.num_trained
    share = min(1.0, dims / trainer.dp_selection.num_trained)
    lr = finetune_lr(noise_multiplier=plan.noise_multiplier, clip_norm=plan.clip_norm,
                     expected_batch_size=plan.expected_batch_size, steps=plan.planned_steps, weight_rms=rms,
                     momentum=cfg.momentum, noise_share=share)
    if rms is None:
        set_initial_lr(trainer, lr, "from-scratch rule (no trained weight from the public file)")
        return (f"DP lr: {lr:.4g}, the from-scratch rule: none of the trained parameters came from the public file "
                "(new segmentation heads), so there is no public weight to keep")
    set_initial_lr(trainer, lr, "fine-tuning rule")
    noise = plan.noise_multiplier * plan.clip_norm / plan.expected_batch_size * math.sqrt(share)
    drift = lr / (1 - cfg.momentum) * noise * math.sqrt(plan.planned_steps)
    return (f"DP fine-tuning lr: {lr:.4g} (fine-tuning rule, nnunet_dp.optim.finetune_lr): accumulated noise per "
            f"trained weight ~{drift:.3g} = {drift / max(rms, 1e-12):.2f} x the RMS {rms:.3g} of the trained weights "
            f"that came from the public file (the rule keeps it at most {FINETUNE_DRIFT:g} x; the noise lives in "
            f"{dims} of the {trainer.dp_selection.num_trained} trained dimensions). Set initial_lr to override")


def restore_lr(trainer: Any, checkpoint: dict) -> None:
    """--c / --val: the lr the checkpoint's training used (a fine-tuning lr is not what configure_optimizers
    recomputes)."""
    if checkpoint.get("dp_initial_lr") is not None:
        set_initial_lr(trainer, float(checkpoint["dp_initial_lr"]), checkpoint.get("dp_lr_rule") or "checkpoint")


# ---- privacy.json fields, checkpoint entries ----------------------------------------------------------------------
def report_extra(cfg: DPConfig, selection: Selection | None,
                 pretrained: dict[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
    """privacy.json's fine-tuning fields and the assumptions they add."""
    extra = {"trainable": cfg.trainable,
             "num_trained_parameters": None if selection is None else selection.num_trained,
             "num_parameters": None if selection is None else selection.num_parameters,
             "pretrained_weights": pretrained, "augmentations_per_case": cfg.augmentations_per_case,
             "ema_decay": cfg.ema_decay, **({"lora_rank": cfg.lora_rank} if cfg.trainable == "lora" else {}),
             "morph_in_training": cfg.morph_in_training}
    return extra, [PRETRAINED_ASSUMPTION] if pretrained is not None else []


def ema_line(decay: float) -> str:
    return (f"DP ema_decay={decay}: validation, checkpoint_best and checkpoint_final use an exponential moving average "
            f"of the trained weights (over ~{1 / (1 - decay):.0f} steps); post-processing, it costs no privacy")


def checkpoint_weights(model: nn.Module, ema: ParameterEMA | None, filename: str) -> dict[str, Any]:
    """The weight entries of a checkpoint. With an EMA: checkpoint_latest keeps the raw weights in network_weights
    (what training continues from), every other checkpoint (final, best: what nnUNetv2_predict and nnU-Net's
    validation load) the average, with the raw weights under raw_network_weights; all hold ema_network_weights."""
    raw = model.state_dict()
    if ema is None:
        return {"network_weights": raw}
    averaged = ema.weights(model)
    if filename.endswith("checkpoint_latest.pth"):
        return {"network_weights": raw, "ema_network_weights": averaged, "ema_updates": ema.updates}
    return {"network_weights": averaged, "raw_network_weights": raw, "ema_network_weights": averaged,
            "ema_updates": ema.updates}


def restore_ema(checkpoint: dict, model: nn.Module, decay: float | None,
                log: Callable[[str], None]) -> ParameterEMA | None:
    """The EMA a resumed training continues (the model must hold the raw weights), or None when the setting is off."""
    if decay is None:
        return None
    ema = ParameterEMA(model, decay)
    if "ema_network_weights" not in checkpoint:
        log("DP: the checkpoint holds no EMA weights (ema_decay was off); the average starts from its weights")
        return ema
    saved_decay = (checkpoint.get("dp_config") or {}).get("ema_decay", decay)
    ema.load_state_dict({"decay": saved_decay, "updates": checkpoint.get("ema_updates", 0),
                         "shadow": checkpoint["ema_network_weights"]})
    return ema


def start_finetuning(trainer: Any) -> None:
    """At on_train_start (after nnU-Net loaded -pretrained_weights or a --c checkpoint): a resume continues from the
    raw weights; a fresh start records the public checkpoint named on the command line (nnU-Net does not pass it to
    the trainer: it is read from sys.argv, and kept only if the network's weights equal the file's); the EMA starts
    from the weights training starts from."""
    net, cfg = trainer._plain_network(), trainer.dp_config
    if trainer.dp_raw_weights is not None:
        net.load_state_dict(trainer.dp_raw_weights)
        trainer.dp_raw_weights = None
    path = pretrained_weights_arg(sys.argv[1:])
    if trainer.dp_resumed_steps is None and path is not None:  # every rank: the heads and the lr must agree
        trainer.dp_pretrained, lines = pretrained_record(path, net, trainer.plans_manager.dataset_name)
        if trainer.dp_pretrained is not None and cfg.transfer_heads:
            copied, line = transfer_heads(path, net, trainer.dataset_json)
            if copied:  # the record's "not transferred: ... heads start from random initialisation" no longer holds
                lines = [x for x in lines if "segmentation-head tensors" not in x]
            lines.append(line)
            trainer.dp_pretrained["heads_transferred"] = bool(copied)
            trainer.dp_pretrained["transferred"] += len(copied)
            trainer.dp_pretrained["not_transferred"] = [k for k in trainer.dp_pretrained["not_transferred"]
                                                        if k not in copied]
        elif trainer.dp_pretrained is not None:
            trainer.dp_pretrained["heads_transferred"] = False
        for line in lines:
            trainer.print_to_log_file(line)
    if cfg.trainable != "all" and trainer.dp_pretrained is None and path is None:
        trainer.print_to_log_file(f"DP WARNING: trainable={cfg.trainable} without -pretrained_weights: the frozen "
                                  "parameters keep their random initialisation")
    if cfg.ema_decay is not None:
        trainer.dp_ema = trainer.dp_ema or ParameterEMA(net, cfg.ema_decay)
        trainer.print_to_log_file(ema_line(cfg.ema_decay))
