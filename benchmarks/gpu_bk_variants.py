"""Book-keeping variants side by side with nnU-Net's step (one run of nnUNetv2_dp_benchmark per variant, methods
nnunet and dp-bk only), plus a CUDA kernel profile of one bk step. For tuning nnunet_dp.bookkeeping's defaults
(KEEP_RATIO, PER_CASE_CONV, GHOST_NORMS); prints each variant's table. Each variant's ratio is to nnU-Net's step
timed in the same run.

    python benchmarks/gpu_bk_variants.py [--configs 2d 3d_fullres 2d_256] [--profile 2d]
    python benchmarks/gpu_bk_variants.py -device cpu --threads 1 --configs 2d --variants default no-ghost
    python benchmarks/gpu_bk_variants.py --variants default unfold     # the launch-bound kept layers on a GPU
"""
from __future__ import annotations

import argparse

import torch

from nnunet_dp import bookkeeping
from nnunet_dp.commands import benchmark as cli
from nnunet_dp.tools import bench_methods as bm
from nnunet_dp.tools import benchmark as bench

VARIANTS = {  # name: (KEEP_RATIO, PER_CASE_CONV, GHOST_NORMS)
    "default": (1.0, "auto", "auto"),
    "no-ghost": (1.0, "auto", "materialise"),
    "keep-all": (1e9, "auto", "auto"),
    "defer-all": (0.0, "auto", "auto"),
    "defer-all-ghost": (0.0, "auto", "ghost"),
    "loop-conv": (1.0, "loop", "auto"),
    "unfold": (1.0, "unfold", "auto"),  # kept layers' per-case weight gradients by im2col + batched matmul
}


def profile(config: str) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof
    cfg = bm.load_configs([str(bench.PLANS_DIR / "Dataset902_Hippocampus_nnUNetPlans.json"),
                           str(bench.PLANS_DIR / "large_2d_256.json")])[config]
    device = torch.device("cuda")
    m = bm.build_method("dp-bk", cfg, bm.make_batch(cfg, cfg.plans_batch_size, device), device)
    for _ in range(3):
        m.step()
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        m.step()
        torch.cuda.synchronize()
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="+", default=["2d", "3d_fullres", "2d_256"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--profile", default=None)
    ap.add_argument("-device", default="cuda", choices=("cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if args.profile:
        profile(args.profile)
    for name in args.variants:
        bookkeeping.KEEP_RATIO, bookkeeping.PER_CASE_CONV, bookkeeping.GHOST_NORMS = VARIANTS[name]
        print(f"\n=== variant {name}: KEEP_RATIO={bookkeeping.KEEP_RATIO}, PER_CASE_CONV={bookkeeping.PER_CASE_CONV}, "
              f"GHOST_NORMS={bookkeeping.GHOST_NORMS}")
        cli.main(["-device", args.device, "--methods", "nnunet", "dp-bk", "--rounds", str(args.rounds), "--warmup", "2",
                  "--threads", str(args.threads), "--configs", *args.configs]
                 # CPU memory is probed in fresh processes, which would not see this variant's settings
                 + (["--no-memory"] if args.device == "cpu" else []))


if __name__ == "__main__":
    main()
