"""Learning rate and momentum under DP noise, on synthetic data only (no private case is ever looked at).

Trains nnU-Net's 2d PlainConvUNet (narrowed as in the experiment's `tiny` budget) with the package's own private step
(DPRun: per-case gradients, flat clipping, one noise draw, / qN) and nnU-Net's SGD (Nesterov, poly schedule) on
synthetic disks and rings (nnunet_dp.synthetic), and reports validation Dice for a grid of effective steps
lr / (1 - momentum), momenta and privacy budgets. This is the evidence behind the default learning rate
(nnunet_dp.optim.default_lr): its constant was chosen here, never on the private cases of a user.

    python benchmarks/lr_sweep.py --out lr_sweep.json          # ~15 min on 2 CPU cores
    python benchmarks/lr_sweep.py --quick                      # CI smoke test: 2 runs of a few steps

Rows: epsilon, sigma, noise per coordinate sigma*C/(qN), steps, momentum, effective step, lr, the rule's effective step
for that row, validation Dice (mean over disk and ring), and the final training loss.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from torch import nn

from nnunet_dp.config import DPConfig
from nnunet_dp.nnunet.case_loss import make_case_loss
from nnunet_dp.optim import default_lr
from nnunet_dp.run import DPRun, make_plan
from nnunet_dp.sampling import poisson_sample
from nnunet_dp.synthetic import _case


def make_data(n: int, size: int, seed: int, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    images, segs = zip(*(_case(rng, (size, size)) for _ in range(n)))
    x = torch.from_numpy(np.stack(images))[:, None]
    x = x + torch.from_numpy(rng.normal(0, noise, x.shape).astype(np.float32))  # harder than the demo's data
    x = (x - x.mean(dim=(1, 2, 3), keepdim=True)) / x.std(dim=(1, 2, 3), keepdim=True)  # nnU-Net's z-score
    return x, torch.from_numpy(np.stack(segs)).long()[:, None]


def network(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return PlainConvUNet(input_channels=1, n_stages=4, features_per_stage=[8, 16, 32, 64], conv_op=nn.Conv2d,
                         kernel_sizes=3, strides=[1, 2, 2, 2], n_conv_per_stage=[2, 2, 2, 2], num_classes=3,
                         n_conv_per_stage_decoder=[2, 2, 2], conv_bias=True, norm_op=nn.InstanceNorm2d,
                         norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                         nonlin_kwargs={"inplace": True}, deep_supervision=True)


def loss_fn() -> nn.Module:
    loss = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    w = np.array([1 / 2 ** i for i in range(4)])
    w[-1] = 0
    return DeepSupervisionWrapper(loss, w / w.sum())


def targets(seg: torch.Tensor) -> list[torch.Tensor]:
    return [seg.float()[:, :, ::k, ::k] for k in (1, 2, 4, 8)]


def dice(model: nn.Module, x: torch.Tensor, seg: torch.Tensor) -> float:
    with torch.no_grad():
        pred = model(x)[0].argmax(1, keepdim=True)
    scores = []
    for c in (1, 2):
        p, t = pred == c, seg == c
        inter, total = (p & t).sum().item(), p.sum().item() + t.sum().item()
        scores.append(2 * inter / total if total else 1.0)
    return float(np.mean(scores))


def train_one(*, epsilon: float, steps: int, momentum: float, lr_eff: float | None, data: tuple, val: tuple,
              batch: float, seed: int) -> dict:
    x, seg = data
    n = len(x)
    cfg = DPConfig(target_epsilon=epsilon, expected_batch_size=batch, num_epochs=1, num_iterations_per_epoch=steps)
    plan = make_plan(cfg, rule="flat", num_training_cases=n, plans_batch_size=2)
    rule_lr = default_lr(noise_multiplier=plan.noise_multiplier, clip_norm=plan.clip_norm,
                         expected_batch_size=plan.expected_batch_size, steps=steps, momentum=momentum)
    lr = rule_lr if lr_eff is None else lr_eff * (1 - momentum)
    run = DPRun(plan, device=torch.device("cpu"), seed=seed, strategy="auto")
    model, loss = network(seed), make_case_loss(loss_fn())
    opt = torch.optim.SGD(model.parameters(), lr, momentum=momentum, nesterov=True, weight_decay=3e-5)
    rng = np.random.default_rng(seed)
    last = []
    for t in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * (1 - t / steps) ** 0.9  # nnU-Net's poly schedule, per step
        idx = poisson_sample(list(range(n)), sampling_rate=plan.sampling_rate, rng=rng)
        flips = torch.from_numpy(rng.random(len(idx)) < 0.5)
        xb, sb = x[idx], seg[idx]
        xb, sb = torch.where(flips[:, None, None, None], xb.flip(-1), xb), torch.where(
            flips[:, None, None, None], sb.flip(-1), sb)
        opt.zero_grad(set_to_none=True)
        res = run.private_step(model, loss, xb if idx else None, targets(sb) if idx else None)
        opt.step()
        if res.losses.numel():
            last.append(res.losses.mean().item())
    return {"epsilon": epsilon, "sigma": plan.noise_multiplier,
            "noise_per_coordinate": plan.noise_multiplier * plan.clip_norm / plan.expected_batch_size,
            "steps": steps, "momentum": momentum, "lr_eff": lr / (1 - momentum), "lr": lr,
            "rule_lr_eff": rule_lr / (1 - momentum), "is_rule": lr_eff is None,
            "val_dice": dice(model, *val), "final_train_loss": float(np.mean(last[-20:])) if last else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="write all rows as JSON here")
    ap.add_argument("--quick", action="store_true", help="2 runs of 5 steps (smoke test)")
    ap.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 2.0])
    ap.add_argument("--lr-effs", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2])
    ap.add_argument("--momenta", type=float, nargs="+", default=[0.9, 0.99])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seeds", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    n_train, n_val, size = (30, 6, 32) if args.quick else (166, 40, 32)
    data, val = make_data(n_train, size, 1, 0.8), make_data(n_val, size, 2, 0.8)
    grid = [(e, m, lr) for e in args.epsilons for m in args.momenta for lr in [*args.lr_effs, None]]
    if args.quick:
        grid, args.steps = [(8.0, 0.9, 0.4), (8.0, 0.9, None)], 5
    rows, start = [], time.time()
    for i, (eps, mom, lr_eff) in enumerate(grid):
        for seed in range(args.seeds):
            row = train_one(epsilon=eps, steps=args.steps, momentum=mom, lr_eff=lr_eff, data=data, val=val,
                            batch=32 if not args.quick else 6, seed=seed)
            rows.append(row)
            print(f"[{i + 1}/{len(grid)} {time.time() - start:5.0f}s] eps {eps:g} sigma {row['sigma']:.2f} "
                  f"momentum {mom} lr_eff {row['lr_eff']:.3g}{' (rule)' if row['is_rule'] else ''} "
                  f"-> val Dice {row['val_dice']:.3f} (train loss {row['final_train_loss']:.3f})", flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(rows, f, indent=1)
    assert all(math.isfinite(r["lr"]) for r in rows)


if __name__ == "__main__":
    main()
