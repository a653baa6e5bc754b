"""Book-keeping variants on the GPU, side by side with nnU-Net's step (one run of nnUNetv2_dp_benchmark per variant,
methods nnunet and dp-bk only), plus a CUDA kernel profile of one bk step. For tuning nnunet_dp.bookkeeping's
defaults; prints each variant's table.

    python benchmarks/gpu_bk_variants.py [--configs 2d 3d_fullres 2d_256] [--profile 2d]
"""
from __future__ import annotations

import argparse

import torch

from nnunet_dp import bookkeeping
from nnunet_dp.nnunet import bench_methods as bm
from nnunet_dp.nnunet import benchmark_cli as cli

VARIANTS = {  # name: (KEEP_RATIO, PER_CASE_CONV)
    "default": (1.0, "auto"),
    "keep-all": (1e9, "auto"),
    "defer-all": (0.0, "auto"),
    "loop-conv": (1.0, "loop"),
}


def profile(config: str) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof
    cfg = bm.load_configs([str(cli.PLANS_DIR / "Dataset902_Hippocampus_nnUNetPlans.json"),
                           str(cli.PLANS_DIR / "large_2d_256.json")])[config]
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
    args = ap.parse_args()
    if args.profile:
        profile(args.profile)
    for name in args.variants:
        bookkeeping.KEEP_RATIO, bookkeeping.PER_CASE_CONV = VARIANTS[name]
        print(f"\n=== variant {name}: KEEP_RATIO={bookkeeping.KEEP_RATIO}, PER_CASE_CONV={bookkeeping.PER_CASE_CONV}")
        cli.main(["-device", "cuda", "--methods", "nnunet", "dp-bk", "--rounds", "5", "--warmup", "2",
                  "--configs", *args.configs])


if __name__ == "__main__":
    main()
