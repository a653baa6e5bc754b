"""nnUNetv2_dp_benchmark's configurations and methods: nnU-Net networks from plans, and one optimizer step each of
nnU-Net's own train step, our DP train step (per strategy) and opacus (GradSampleModule hooks + DPOptimizer).

tests/test_benchmark.py checks the nnU-Net and DP steps against nnUNetTrainer.train_step / nnUNetTrainerDP.train_step
on the same weights and batch.
"""
from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import nn

from nnunet_dp import benchmark as core
from nnunet_dp import lora
from nnunet_dp.config import DPConfig
from nnunet_dp.nnunet.case_loss import make_case_loss
from nnunet_dp.nnunet.plans import dp_architecture, morph_architecture
from nnunet_dp.nnunet.selection import freeze_, select_trainable
from nnunet_dp.per_sample import _STRATEGIES, choose_strategy
from nnunet_dp.run import DPRun, dp_autocast, make_plan

NUM_CLASSES = 3  # Dataset902: background, anterior, posterior
DP_METHODS = tuple(f"dp-{s}" for s in (*_STRATEGIES, "auto"))
METHODS = (core.BASELINE, *DP_METHODS, "opacus")


@dataclass(frozen=True)
class BenchConfig:
    name: str
    patch_size: tuple[int, ...]
    plans_batch_size: int
    architecture: dict  # nnU-Net plans 'architecture' entry (network_class_name, arch_kwargs, _kw_requires_import)
    trainable: str = "all"  # DP setting `trainable`, applied to every method's network (nnU-Net's step included)
    morph: str = "none"  # DP setting morph_in_training (close/open on every foreground class, kernel 3)

    @property
    def label(self) -> str:
        """The configuration's name in the tables: `2d`, `2d/norm_bias` for a trained subset, `2d+close` with
        DP-Morph in training."""
        name = self.name if self.trainable == "all" else f"{self.name}/{self.trainable}"
        return name if self.morph == "none" else f"{name}+{self.morph}"

    @property
    def strides(self) -> np.ndarray:
        return np.array(self.architecture["arch_kwargs"]["strides"])


def quick_configs() -> dict[str, BenchConfig]:
    """Tiny plans-like PlainConvUNets (2D and 3D, ConvTranspose, InstanceNorm, deep supervision) for CI."""
    out = {}
    for dim, patch, batch in ((2, (32, 32), 4), (3, (16, 16, 16), 2)):
        conv = f"torch.nn.modules.conv.Conv{dim}d"
        norm = f"torch.nn.modules.instancenorm.InstanceNorm{dim}d"
        kwargs = {"n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": conv, "kernel_sizes": [[3] * dim] * 3,
                  "strides": [[1] * dim, [2] * dim, [2] * dim], "n_conv_per_stage": [2, 2, 2],
                  "n_conv_per_stage_decoder": [2, 2], "conv_bias": True, "norm_op": norm,
                  "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                  "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
        arch = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                "arch_kwargs": kwargs, "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
        out[f"tiny{dim}d"] = BenchConfig(f"tiny{dim}d", patch, batch, arch)
    return out


def load_configs(plans_files: list[str]) -> dict[str, BenchConfig]:
    """Every configuration with its own architecture in the given plans files, with the DP trainer's changes."""
    out = {}
    for path in plans_files:
        with open(path) as f:
            plans = json.load(f)
        for name, c in plans["configurations"].items():
            if "architecture" in c and "patch_size" in c:
                arch = dp_architecture(c["architecture"], norm_conversion="batchnorm", num_groups=8)
                out[name] = BenchConfig(name, tuple(c["patch_size"]), int(c["batch_size"]), arch)
    return out


def build_network(cfg: BenchConfig, *, seed: int, inplace: bool = True) -> nn.Module:
    """The plans' network; parameters outside cfg.trainable are frozen exactly as the DP trainers freeze them
    (nnunet_dp.nnunet.selection.select_trainable + freeze_)."""
    arch = copy.deepcopy(cfg.architecture)
    if cfg.morph != "none":
        dims = len(cfg.patch_size)
        arch = morph_architecture(arch, {str(c): [cfg.morph, [3] * dims] for c in range(1, NUM_CLASSES)})
    if not inplace:
        arch["arch_kwargs"]["nonlin_kwargs"] = {**(arch["arch_kwargs"].get("nonlin_kwargs") or {}), "inplace": False}
    torch.manual_seed(seed)
    net = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], 1,
                                 NUM_CLASSES, allow_init=True, deep_supervision=True)
    if cfg.trainable == "lora":
        lora.add_adapters_(net, DPConfig().lora_rank, skip=list(net.decoder.seg_layers.modules()))
    if cfg.trainable != "all":
        freeze_(net, select_trainable(net, cfg.trainable))
    return net


def build_loss(cfg: BenchConfig) -> nn.Module:
    """nnUNetTrainer._build_loss for a label (not region) dataset, batch Dice off as under DP."""
    loss = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    n = len(cfg.strides) - 1  # nnUNetTrainer._get_deep_supervision_scales: cumprod(strides)[:-1]
    weights = np.array([1 / (2 ** i) for i in range(n)])
    weights[-1] = 0
    return DeepSupervisionWrapper(loss, weights / weights.sum())


def make_batch(cfg: BenchConfig, b: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, list]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((b, 1, *cfg.patch_size), generator=g)
    seg = torch.randint(0, NUM_CLASSES, (b, 1, *cfg.patch_size), generator=g).float()
    targets = []
    for scale in np.cumprod(cfg.strides, axis=0)[:-1]:
        idx = (slice(None), slice(None)) + tuple(slice(None, None, int(s)) for s in scale)
        targets.append(seg[idx].contiguous().to(device))
    return x.to(device), targets


def sgd(net: nn.Module) -> torch.optim.Optimizer:
    """nnUNetTrainer.configure_optimizers (initial_lr 1e-2, weight_decay 3e-5) over the trained parameters (as the DP
    trainers' optimizer under `trainable`)."""
    return torch.optim.SGD([p for p in net.parameters() if p.requires_grad], 1e-2, weight_decay=3e-5, momentum=0.99,
                           nesterov=True)


@dataclass
class Method:
    """One method's own network, optimizer and step on one batch."""

    step: Callable[[], Any]
    model: nn.Module
    strategy: str | None = None
    run: DPRun | None = None
    note: str = ""
    note_fn: Callable[[], str] | None = None  # a note known only after the first step
    per_case_norms: Callable[[], torch.Tensor] | None = None  # opacus: its per-case norms (forward + backward)

    def describe(self) -> str:
        return self.note_fn() if self.note_fn else self.note


def nnunet_method(cfg: BenchConfig, batch: tuple, device: torch.device) -> Method:
    """nnUNetTrainer.train_step (nnunetv2 2.8.1), line by line; tests/test_benchmark.py checks it against the
    original on the same weights and batch."""
    net, loss = build_network(cfg, seed=0).to(device), build_loss(cfg)
    opt = sgd(net)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    data, target = batch

    def step() -> np.ndarray:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=True) if device.type == "cuda" else contextlib.nullcontext():
            output = net(data)
            lo = loss(output, target)
        if scaler is not None:
            scaler.scale(lo).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
            scaler.step(opt)
            scaler.update()
        else:
            lo.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
            opt.step()
        return lo.detach().cpu().numpy()
    return Method(step, net)


def dp_run(strategy: str, b: int, device: torch.device) -> DPRun:
    """A DP run with sigma = 1, q = b / N (fixed batches of b cases; the step cost does not depend on q)."""
    cfg = DPConfig(target_epsilon=None, noise_multiplier=1.0, expected_batch_size=float(b), num_epochs=1,
                   num_iterations_per_epoch=1, per_sample_strategy=strategy)
    plan = make_plan(cfg, rule="flat", num_training_cases=max(1000, 2 * b), plans_batch_size=b)
    return DPRun(plan, device=device, seed=0, strategy=strategy)


def dp_method(cfg: BenchConfig, batch: tuple, device: torch.device, strategy: str) -> Method:
    """nnUNetTrainerDP.train_step, with nnU-Net's loss wrapped by make_case_loss (batched per-case losses)."""
    net, loss = build_network(cfg, seed=0).to(device), make_case_loss(build_loss(cfg))
    opt, run, autocast = sgd(net), dp_run(strategy, batch[0].shape[0], device), dp_autocast(device)
    data, target = batch
    chosen = choose_strategy(strategy, device=device, batch_size=data.shape[0], case_voxels=data[0, 0].numel(),
                             model=net)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        result = run.private_step(net, loss, data, target, autocast)
        opt.step()
        return result.losses.mean().item() if result.losses.numel() else float("nan")
    return Method(step, net, strategy=chosen, run=run)


def opacus_method(cfg: BenchConfig, batch: tuple, device: torch.device) -> Method:
    """opacus GradSampleModule (hooks) + DPOptimizer, sigma = 1, C = 1, on the same network and loss. opacus needs
    LeakyReLU(inplace=False) (its backward hooks on InstanceNorm outputs break under in-place ops) and a gradient for
    every trainable parameter, so the deep-supervision head with loss weight 0 is frozen (its gradient is 0)."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer
    net, loss = build_network(cfg, seed=0, inplace=False).to(device), build_loss(cfg)
    frozen = _freeze_unused_heads(net, loss)
    gsm = GradSampleModule(net, loss_reduction="mean")
    data, target = batch
    opt = DPOptimizer(sgd(gsm), noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=data.shape[0],
                      loss_reduction="mean")
    state = {"autocast": dp_autocast(device), "note": f"inplace=False, {frozen} zero-weight head params frozen"}

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        try:
            with state["autocast"]():
                lo = loss(gsm(data), target)
            lo.backward()
        except RuntimeError as e:  # opacus' grad samplers may refuse bf16 activations: measure it in fp32 then
            if state["autocast"] is contextlib.nullcontext:
                raise
            state["autocast"], state["note"] = contextlib.nullcontext, state["note"] + f"; fp32 (bf16: {str(e)[:60]})"
            for mod in gsm.modules():  # drop what the failed pass left in the hooks
                if hasattr(mod, "activations"):
                    mod.activations = []
            return step()
        opt.step()
    def norms() -> torch.Tensor:
        """opacus' per-case gradient norms from grad_sample (fp32, no optimizer step)."""
        opt.zero_grad(set_to_none=True)
        loss(gsm(data), target).backward()
        sq = sum(p.grad_sample.flatten(1).float().pow(2).sum(1) for p in net.parameters() if p.requires_grad)
        opt.zero_grad(set_to_none=True)
        return sq.sqrt()
    return Method(step, gsm, note_fn=lambda: state["note"], per_case_norms=norms)


def _freeze_unused_heads(net: nn.Module, loss: DeepSupervisionWrapper) -> int:
    """The seg head of each deep-supervision output with loss weight 0 (nnU-Net's lowest) gets requires_grad False."""
    heads = net.decoder.seg_layers  # PlainConvUNet: seg_layers[i] -> output len-1-i (outputs are reversed)
    n = 0
    for k, w in enumerate(loss.weight_factors):
        if w == 0:
            for p in heads[len(heads) - 1 - k].parameters():
                p.requires_grad_(False)
                n += 1
    return n


def build_method(name: str, cfg: BenchConfig, batch: tuple, device: torch.device) -> Method:
    if name == core.BASELINE:
        return nnunet_method(cfg, batch, device)
    if name == "opacus":
        return opacus_method(cfg, batch, device)
    return dp_method(cfg, batch, device, name.removeprefix("dp-"))
