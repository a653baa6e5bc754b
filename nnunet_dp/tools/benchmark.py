"""nnUNetv2_dp_benchmark: time per optimizer step and peak memory of nnU-Net's own step vs our DP step vs opacus.

    nnUNetv2_dp_benchmark                       # 2d, 3d_fullres (Dataset902 plans) and 2d_256, on CPU
    nnUNetv2_dp_benchmark -device cuda --json bench_gpu.json
    nnUNetv2_dp_benchmark --quick --json q.json # CI smoke test: tiny plans-like networks, seconds, no data needed
    nnUNetv2_dp_benchmark --trainable all norm_bias   # each configuration twice: all parameters, then norm_bias only

Networks are built from nnU-Net plans exactly as nnUNetTrainerDP builds them (nnU-Net's get_network_from_plans after
the DP changes of nnunet_dp.nnunet.plans), with nnU-Net's deep-supervision DC_and_CE loss; batches are random tensors
of the plans' patch size. Methods, alternated round by round (nnunet_dp.benchmark):
- nnunet: nnU-Net's nnUNetTrainer.train_step (autocast + GradScaler on CUDA, clip_grad_norm_ 12, SGD step);
- dp-<strategy>: nnUNetTrainerDP.train_step (per-case gradients, rule, noise, accountant, SGD step), for each
  per-case strategy and 'auto' (bf16 autocast without GradScaler on CUDA, fp32 norms and accumulator);
- opacus: GradSampleModule hooks + DPOptimizer on the same network and loss, where it runs.
--trainable: every method (nnU-Net's step included) trains only that subset (the DP setting `trainable`; frozen
parameters exactly as the DP trainers freeze them); rows are labelled `2d/norm_bias` and compared with nnU-Net's step
on the same subset. The CPU batch size is the plans' batch size capped at --max-batch-voxels (nnU-Net's 2d batch of 366 would take
minutes per method on 2 cores); on CUDA the plans' batch size is used. --batch-size overrides both.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
from pathlib import Path

import numpy as np
import torch

from nnunet_dp import benchmark as core
from nnunet_dp.nnunet.case_loss import make_case_loss
from nnunet_dp.rules import make_rule
from nnunet_dp.step import privatize_, write_grads_
from nnunet_dp.tools.bench_methods import (
    BenchConfig,
    Method,
    build_loss,
    build_method,
    build_network,
    make_batch,
)

PLANS_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "plans"


DEFAULT_CONFIGS = ("2d", "3d_fullres", "2d_256")


def batch_size_for(cfg: BenchConfig, device: torch.device, args: argparse.Namespace) -> int:
    if args.batch_size:
        return args.batch_size
    if device.type == "cuda":
        return cfg.plans_batch_size
    voxels = int(np.prod(cfg.patch_size))
    return max(2, min(cfg.plans_batch_size, args.max_batch_voxels // voxels))


def per_case_norms(cfg: BenchConfig, batch: tuple, device: torch.device, strategy: str) -> torch.Tensor:
    """Per-case gradient norms from our engine, fp32 without autocast, on the initial weights."""
    from nnunet_dp.per_sample import scaled_sum
    net = build_network(cfg, seed=0).to(device)
    return scaled_sum(net, make_case_loss(build_loss(cfg)), *batch, make_rule("flat", clip_norm=1.0),
                      strategy=strategy).norms


def agreement_notes(cfg: BenchConfig, batch: tuple, device: torch.device, built: dict[str, Method]
                    ) -> dict[str, str]:
    """Per-case norms of each other strategy against the loop's, and opacus' against ours (opacus: its check is
    its warm-up pass)."""
    notes: dict[str, str] = {}
    ref = per_case_norms(cfg, batch, device, "loop")
    checked: dict[str, str] = {"loop": "dp-loop"}
    for name, m in built.items():
        if m.run is not None and m.strategy in checked and name != checked[m.strategy]:
            notes[name] = f"runs {m.strategy}, as {checked[m.strategy]}"
        elif m.run is not None and m.strategy not in checked:
            got = per_case_norms(cfg, batch, device, m.strategy)
            notes[name] = f"norms vs loop: max rel diff {((got - ref).abs() / ref).max().item():.1e}"
            checked[m.strategy] = name
        elif m.per_case_norms is not None:
            try:
                ratio = m.per_case_norms() / ref
            except Exception as e:  # noqa: BLE001 - reported; the caller leaves the method out of the timing
                notes[name] = f"did not run: {type(e).__name__}: {str(e)[:100]}"
                continue
            notes[name] = (f"per-case norms {ratio.min().item():.2f}-{ratio.max().item():.2f}x ours"
                           f"{' (WRONG)' if (ratio - 1).abs().max() > 1e-3 else ' (agree)'}")
    return notes


def overhead_seconds(m: Method, device: torch.device, repeats: int = 5) -> float:
    """Median time of what a DP step adds around the per-case engine: the rule's scales, the noise draw and division
    (privatize_), writing .grad and the accountant step."""
    run, params = m.run, [p for p in m.model.parameters() if p.requires_grad]
    b = max(1, round(run.plan.expected_batch_size))
    norms = torch.rand(b, device=device)
    grads = [torch.zeros_like(p, dtype=torch.float32) for p in params]

    def once() -> None:
        run.rule.scale(norms)
        privatize_(grads, noise_multiplier=run.plan.noise_multiplier, sensitivity=run.rule.sensitivity,
                   expected_batch_size=run.plan.expected_batch_size, generator=run.generator)
        write_grads_(params, grads)
        run.ledger.step(noise_multiplier=run.plan.noise_multiplier, sampling_rate=run.plan.sampling_rate)
    once()
    return core.median([core.timed(once, device) for _ in range(repeats)])


def cuda_peak_mb(name: str, cfg: BenchConfig, b: int, device: torch.device) -> float:
    """max_memory_allocated over building one method and two steps, with nothing else of the benchmark alive."""
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    m = build_method(name, cfg, make_batch(cfg, b, device), device)
    m.step()
    m.step()
    torch.cuda.synchronize(device)
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    del m
    gc.collect()
    return peak


def cpu_peak_mb(name: str, cfg: BenchConfig, b: int, args: argparse.Namespace) -> tuple[float | None, str]:
    """Peak RSS of a fresh process (building the method + two steps) minus its RSS after the imports."""
    argv = ["-m", "nnunet_dp.commands.benchmark", "--probe-memory", name, "--configs", cfg.name,
            "--batch-size", str(b), "--threads", str(torch.get_num_threads()), "-device", "cpu"]
    argv += ["--quick"] if args.quick else ["--plans", *args.plans]
    argv += ["--trainable", cfg.trainable, "--morph", cfg.morph]
    out = core.run_json_subprocess(argv, timeout=args.probe_timeout)
    return out.get("peak_mem_mb"), out.get("error", "")


def probe_memory(args: argparse.Namespace, cfg: BenchConfig) -> None:
    """--probe-memory: run in a fresh process; prints {"peak_mem_mb": ...}."""
    import opacus  # noqa: F401 - every probe imports the same modules before its baseline RSS
    core.warm_libraries(len(cfg.patch_size))
    del build_network(cfg, seed=0).decoder  # imports the network's classes (nnU-Net imports them by name)
    base = core.rss_mb()
    m = build_method(args.probe_memory, cfg, make_batch(cfg, args.batch_size, torch.device("cpu")),
                     torch.device("cpu"))
    m.step()
    m.step()
    print(json.dumps({"peak_mem_mb": round(core.peak_rss_mb() - base, 1), "baseline_rss_mb": round(base, 1)}))


def bench_config(cfg: BenchConfig, methods: list[str], device: torch.device, args: argparse.Namespace
                 ) -> list[core.Row]:
    b = batch_size_for(cfg, device, args)
    log = print if args.verbose else (lambda s: None)
    trained = sum(p.numel() for p in build_network(cfg, seed=0).parameters() if p.requires_grad)
    print(f"[{cfg.label}] patch {list(cfg.patch_size)}, batch {b} (plans: {cfg.plans_batch_size}), {trained:,} trained "
          f"parameters, load {os.getloadavg()[0]:.2f}", flush=True)
    batch = make_batch(cfg, b, device)
    built: dict[str, Method] = {}
    failed: dict[str, str] = {}
    for name in methods:
        try:
            built[name] = build_method(name, cfg, batch, device)
            if built[name].per_case_norms is None:
                built[name].step()  # warm-up; a method that fails it is reported, not timed
        except Exception as e:  # noqa: BLE001 - e.g. opacus on a layer it cannot handle: reported in the table
            built.pop(name, None)
            failed[name] = f"did not run: {type(e).__name__}: {str(e)[:100]}"
    notes = {**agreement_notes(cfg, batch, device, built), **failed}
    for name in [n for n, note in notes.items() if note.startswith("did not run")]:
        built.pop(name, None)
    times = core.alternate({n: m.step for n, m in built.items()}, rounds=args.rounds, warmup=args.warmup - 1
                           if args.warmup > 0 else 0, device=device, log=log)
    rows = []
    for name in methods:
        m = built.get(name)
        t = core.median(times[name]) if name in times else None
        share = overhead_seconds(m, device) / t if m is not None and m.run is not None and t else None
        rows.append(core.Row(cfg.label, name, t, None, times_s=[round(x, 4) for x in times.get(name, [])],
                             batch_size=b, patch_size=list(cfg.patch_size), strategy=m.strategy if m else None,
                             overhead_share=share, note="; ".join(x for x in (m.describe() if m else "", notes.get(name, ""))
                                                                  if x)))
    del built, batch
    for row in rows:
        if row.time_s is None:
            continue
        if device.type == "cuda":
            row.peak_mem_mb = round(cuda_peak_mb(row.method, cfg, b, device), 1)
        elif args.memory:
            row.peak_mem_mb, err = cpu_peak_mb(row.method, cfg, b, args)
            row.note = "; ".join(x for x in (row.note, err) if x)
    return core.add_ratios(rows)
