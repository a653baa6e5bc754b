"""GPU check for the DP step (issue 2): bf16 autocast without GradScaler must not distort per-case norms, and the
private step runs on CUDA. Compares, on nnU-Net PlainConvUNet networks (2D and 3D, deep supervision):
  - per-case norms and the scaled sum under bf16 autocast against an fp32 run of the same cases (relative error);
  - noise std of a CUDA DPRun step against sigma * Delta / (qN);
  - time per step: DP step vs a non-private step (nnU-Net style: autocast + GradScaler + clip 12) at the same batch.
Writes a JSON report. Usage: python benchmarks/gpu_check_dp.py --json OUT.json [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from torch import nn

from nnunet_dp.config import DPConfig
from nnunet_dp.per_sample import scaled_sum, trainable_parameters
from nnunet_dp.rules import make_rule
from nnunet_dp.run import DPRun, make_plan

CONFIGS = {  # shaped like nnU-Net's plans for Hippocampus-sized 2d / 3d_fullres and a larger 2D
    "2d_64": dict(dim=2, size=64, batch=8, features=[32, 64, 128, 256], stages=4),
    "3d_40": dict(dim=3, size=40, batch=4, features=[32, 64, 128, 256], stages=4),
    "2d_256": dict(dim=2, size=256, batch=12, features=[32, 64, 128, 256, 512, 512], stages=6),
}


def network(dim: int, features: list[int], stages: int) -> nn.Module:
    conv, norm = (nn.Conv2d, nn.InstanceNorm2d) if dim == 2 else (nn.Conv3d, nn.InstanceNorm3d)
    return PlainConvUNet(1, stages, features, conv, 3, [1] + [2] * (stages - 1), [2] * stages, 3, [2] * (stages - 1),
                         True, norm, {"eps": 1e-5, "affine": True}, None, None, nn.LeakyReLU, {"inplace": True},
                         deep_supervision=True)


def loss_fn(n_outputs: int) -> nn.Module:
    loss = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    w = np.array([1 / 2 ** i for i in range(n_outputs)])
    w[-1] = 0
    return DeepSupervisionWrapper(loss, w / w.sum())


def data(dim: int, size: int, b: int, n_out: int, device: torch.device):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn((b, 1) + (size,) * dim, generator=g).to(device)
    seg = torch.randint(0, 3, (b, 1) + (size,) * dim, generator=g).float()
    ts = [seg[(slice(None), slice(None)) + (slice(None, None, 2 ** k),) * dim].to(device) for k in range(n_out)]
    return x, ts


def timed(fn, reps: int, device: torch.device) -> float:
    times = []
    for _ in range(reps):
        torch.cuda.synchronize(device) if device.type == "cuda" else None
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize(device) if device.type == "cuda" else None
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def check(name: str, spec: dict, device: torch.device) -> dict:
    model = network(spec["dim"], spec["features"], spec["stages"]).to(device)
    n_out = spec["stages"] - 1
    lf = loss_fn(n_out)
    x, ts = data(spec["dim"], spec["size"], spec["batch"], n_out, device)
    rule = make_rule("psac", clip_norm=1.0)
    bf16 = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else torch.enable_grad
    ref = scaled_sum(model, lf, x, ts, rule)
    amp = scaled_sum(model, lf, x, ts, rule, autocast=bf16)
    flat_ref = torch.cat([g.flatten() for g in ref.grads])
    flat_amp = torch.cat([g.flatten() for g in amp.grads])
    out = {"config": name, "norm_rel_err_max": float(((amp.norms - ref.norms).abs() / ref.norms).max()),
           "sum_cosine": float(torch.nn.functional.cosine_similarity(flat_ref, flat_amp, dim=0)),
           "accumulator_dtype": str(amp.grads[0].dtype), "norm_dtype": str(amp.norms.dtype)}
    cfg = DPConfig(noise_multiplier=1.3, target_epsilon=None, expected_batch_size=spec["batch"], num_epochs=1,
                   num_iterations_per_epoch=10)
    run = DPRun(make_plan(cfg, rule="psac", num_training_cases=100, plans_batch_size=2), device=device, seed=0)
    run.private_step(model, lf, None, None, bf16)
    z = torch.cat([p.grad.flatten() for p in trainable_parameters(model)]) * run.plan.expected_batch_size
    out["noise_std_measured"], out["noise_std_expected"] = float(z.std()), 1.3 * 1.0
    opt = torch.optim.SGD(model.parameters(), 1e-3, momentum=0.99, nesterov=True)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None

    def nonprivate():
        opt.zero_grad(set_to_none=True)
        with bf16() if device.type == "cuda" else torch.enable_grad():
            loss = lf(model(x), ts)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 12)
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()

    def private():
        opt.zero_grad(set_to_none=True)
        run.private_step(model, lf, x, ts, bf16)
        opt.step()

    for fn in (nonprivate, private):
        fn()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_np = timed(nonprivate, 5, device)
    mem_np = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else float("nan")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_dp = timed(private, 5, device)
    mem_dp = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else float("nan")
    out.update(time_nonprivate_s=t_np, time_dp_s=t_dp, time_ratio=t_dp / t_np, mem_nonprivate_mb=mem_np,
               mem_dp_mb=mem_dp, mem_ratio=mem_dp / mem_np if mem_np == mem_np else None, batch=spec["batch"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    args = ap.parse_args()
    device = torch.device(args.device)
    rows = []
    for name in args.configs:
        row = check(name, CONFIGS[name], device)
        print(json.dumps(row), flush=True)
        rows.append(row)
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "rows": rows}
    with open(args.json, "w") as f:
        json.dump(info, f, indent=2)


if __name__ == "__main__":
    main()
