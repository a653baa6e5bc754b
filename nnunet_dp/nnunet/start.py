"""What a DP training sets up before its first step, for nnUNetTrainerDP's hooks: the privacy plan (sigma, q, steps),
the optimizer with the DP learning rate and the trained parameters, the noise advice, the public projection, and the
DP-Morph operations of the network."""
from __future__ import annotations

import sys
from typing import Any

import torch
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

from nnunet_dp.advise import training_advice
from nnunet_dp.errors import DPConfigError
from nnunet_dp.nnunet import finetune, selection
from nnunet_dp.nnunet.projection import shared_projection
from nnunet_dp.optim import default_lr, noise_per_coordinate
from nnunet_dp.run import DPRun, make_plan


def morph_ops(trainer: Any) -> dict[str, list]:
    """morph_in_training as the per-class operations the plans' network applies (nnunet_dp.morph)."""
    cfg, labels = trainer.dp_config, trainer.label_manager
    if cfg.morph_in_training != "none" and labels.has_regions:
        raise DPConfigError("morph_in_training", cfg.morph_in_training, "'none' for a region-based dataset (the "
                            "operations act on the labels' classes)", trainer.dp_config_source)
    return cfg.morph_ops(labels.num_segmentation_heads, len(trainer.configuration_manager.patch_size))


def make_run(trainer: Any) -> DPRun:
    """Calibrate sigma for the fold's training cases and log the plan."""
    if trainer.dataset_class is None:
        trainer.dataset_class = infer_dataset_class(trainer.preprocessed_dataset_folder)
    tr_keys, _ = trainer.do_split()
    cfg = trainer.dp_config
    plan = make_plan(cfg, rule=trainer.dp_rule, num_training_cases=len(tr_keys),
                     plans_batch_size=trainer.configuration_manager.batch_size)
    run = DPRun(plan, device=trainer.device, seed=cfg.seed, strategy=cfg.per_sample_strategy)
    trainer.print_to_log_file(
        f"DP: rule={plan.rule} C={plan.clip_norm} sigma={plan.noise_multiplier:.4f} q={plan.sampling_rate:.4f} "
        f"(expected batch {plan.expected_batch_size:.2f} of N={plan.num_training_cases}) steps={plan.planned_steps}"
        f" -> epsilon={run.projected_epsilon():.3f} at delta={plan.delta} ({plan.accountant})")
    if plan.max_steps is not None and plan.max_steps < plan.planned_steps:
        trainer.print_to_log_file(f"DP WARNING: only {plan.max_steps} of the {plan.planned_steps} planned steps fit "
                                  f"in target_epsilon={plan.target_epsilon}; training will stop there.")
    return run


def dp_optimizer(trainer: Any) -> tuple[torch.optim.Optimizer, PolyLRScheduler]:
    """nnU-Net's SGD and poly schedule with DP-aware defaults: momentum 0.9 and, unless initial_lr is set, the
    learning rate of nnunet_dp.optim.default_lr for this run's noise and steps; the LoRA adapters (trainable lora)
    are added before the trained parameters are chosen (and before DDP wraps the network)."""
    cfg, plan = trainer.dp_config, trainer._dp_setup().plan
    rule_lr = default_lr(noise_multiplier=plan.noise_multiplier, clip_norm=plan.clip_norm,
                         expected_batch_size=plan.expected_batch_size, steps=plan.planned_steps, momentum=cfg.momentum)
    trainer.initial_lr = cfg.initial_lr if cfg.initial_lr is not None else rule_lr
    source = "initial_lr setting" if cfg.initial_lr is not None else "default rule"
    trainer.dp_lr_rule = source  # the fine-tuning rule may replace it (finetune.apply_finetune_lr)
    noise = noise_per_coordinate(noise_multiplier=plan.noise_multiplier, clip_norm=plan.clip_norm,
                                 expected_batch_size=plan.expected_batch_size)
    trainer.print_to_log_file(
        f"DP optimizer: SGD lr={trainer.initial_lr:.4g} ({source}; rule: {rule_lr:.4g}), momentum={cfg.momentum}, "
        f"nesterov={cfg.nesterov}, effective step lr/(1-momentum)={trainer.initial_lr / (1 - cfg.momentum):.4g}, "
        f"noise per coordinate sigma*C/(qN)={noise:.4g}")
    net = trainer._plain_network()
    if selection.add_lora_(net, cfg):
        trainer.print_to_log_file(f"DP trainable=lora: rank-{cfg.lora_rank} adapters on every convolution but the "
                                  "segmentation heads; checkpoints hold the merged plain network")
    trainer.dp_selection = selection.select_trainable(net, cfg.trainable)  # frozen in initialize
    optimizer = torch.optim.SGD(trainer.dp_selection.trained, trainer.initial_lr, weight_decay=trainer.weight_decay,
                                momentum=cfg.momentum, nesterov=cfg.nesterov)
    return optimizer, PolyLRScheduler(optimizer, trainer.initial_lr, trainer.num_epochs)


def log_noise_advice(trainer: Any, dimensions: int | None = None) -> None:
    """The noise on the averaged update against the signal C (nnunet_dp.advise), logged and kept for privacy.json.
    dimensions: the noise's dimensions when not the trained parameters' count (projection)."""
    finetuning = finetune.pretrained_weights_arg(sys.argv[1:]) is not None  # nnU-Net loads it after initialize
    d = trainer.dp_selection.num_trained if dimensions is None else dimensions
    trainer.dp_noise, warning = training_advice(trainer._dp_setup().plan, d, finetuning)
    n = trainer.dp_noise["noise"]
    trainer.print_to_log_file(f"DP noise: norm ~{n['noise_norm']:.4g} on the averaged update = {n['noise_ratio']:.3g} "
                              f"x the largest signal C (sigma*sqrt(d)/(qN), d = {n['num_trained_parameters']} noised "
                              f"dimensions; warns above {n['warn_above']:g}; nnUNetv2_dp_advise shows the levers)")
    if warning is not None:
        trainer.print_to_log_file(f"DP WARNING: {warning}")


def attach_projection(trainer: Any) -> None:
    """projection public: the public subspace (nnunet_dp.nnunet.projection) before the first step, and the advice
    for the noise's new dimension."""
    if trainer.dp_config.projection != "public":
        return
    trainer.dp_run.projection, trainer.dp_projection = shared_projection(trainer)  # rank 0's under DDP
    r = trainer.dp_projection
    trainer.print_to_log_file(
        f"DP projection=public: k={r['projection_dim']} dimensions of {r['projected_parameters']} projected parameters "
        f"({r['public_energy_captured']:.1%} of the {r['public_gradients']} public gradients' energy; public data "
        f"{r['public_data']}); {r['unprojected_parameters']} parameters not projected; noise in "
        f"{r['noise_dimensions']} dimensions")
    log_noise_advice(trainer, r["noise_dimensions"])
