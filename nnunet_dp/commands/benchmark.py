"""nnUNetv2_dp_benchmark: time per optimizer step and peak memory of nnU-Net's own step vs our DP step vs opacus.

This module parses the options; the work is nnunet_dp.tools.benchmark's (its docstring says how)."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import replace

import torch

from nnunet_dp import benchmark as core
from nnunet_dp.commands._args import add_device, device_of
from nnunet_dp.config import TRAINABLE
from nnunet_dp.tools.bench_methods import (
    METHODS,
    load_configs,
    quick_configs,
)
from nnunet_dp.tools.benchmark import DEFAULT_CONFIGS, PLANS_DIR, bench_config, probe_memory


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nnUNetv2_dp_benchmark", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=None, help=f"configurations to run (default: "
                   f"{' '.join(DEFAULT_CONFIGS)}; --quick: tiny2d, or tiny3d)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   help="methods to time (default: all); nnunet is the reference every ratio divides by")
    p.add_argument("--plans", nargs="+", default=[str(PLANS_DIR / "Dataset902_Hippocampus_nnUNetPlans.json"),
                                                   str(PLANS_DIR / "large_2d_256.json")],
                   help="nnU-Net plans files (default: the committed copies under benchmarks/plans)")
    add_device(p)
    p.add_argument("--trainable", nargs="+", default=["all"], choices=TRAINABLE,
                   help="DP setting trainable for every method; several values run each configuration once per value "
                        "(default: all)")
    p.add_argument("--morph", nargs="+", default=["none"], choices=("none", "close", "open"),
                   help="DP setting morph_in_training (kernel 3 on every foreground class) for every method; several "
                        "values run each configuration once per value, e.g. --morph none close (default: none)")
    p.add_argument("--quick", action="store_true", help="CI smoke test: tiny networks, 1 round, no plans needed")
    p.add_argument("--batch-size", type=int, default=0, help="cases per step (default: plans; CPU: capped)")
    p.add_argument("--max-batch-voxels", type=int, default=200_000,
                   help="CPU: cap the batch at this many voxels (at least 2 cases)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per method before the rounds (>= 1)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="CPU: skip the memory subprocesses")
    p.add_argument("--probe-timeout", type=float, default=600,
                   help="seconds a CPU memory probe (a fresh process per method) may take (default 600)")
    p.add_argument("--json", default=None, help="write the rows as a JSON list to this file")
    p.add_argument("--verbose", action="store_true", help="print every timed step")
    p.add_argument("--probe-memory", default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.device = device_of(args)
    if args.quick:
        args.rounds = min(args.rounds, 2)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # opacus' hooks, once per layer
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as nnU-Net's run_training
    configs = quick_configs() if args.quick else load_configs(args.plans)
    names = args.configs or (["tiny2d"] if args.quick else list(DEFAULT_CONFIGS))
    unknown = [n for n in names if n not in configs]
    if unknown:
        sys.exit(f"--configs {' '.join(unknown)}: not in the plans; known: {', '.join(configs)}")
    if args.probe_memory:
        return probe_memory(args, replace(configs[names[0]], trainable=args.trainable[0], morph=args.morph[0]))
    env = core.environment(device)
    print(f"nnUNetv2_dp_benchmark on {env}", flush=True)
    rows: list[core.Row] = []
    for name in names:
        for trainable in args.trainable:
            for morph in args.morph:
                rows += bench_config(replace(configs[name], trainable=trainable, morph=morph), args.methods, device,
                                     args)
    env_end = core.environment(device)
    header = (f"device {device} ({env.get('gpu', 'CPU')}), torch {env['torch']}, {env['threads']} threads; "
              f"load average {env['loadavg']} at start, {env_end['loadavg']} at end; median of {args.rounds} rounds")
    print("\n" + core.format_table(rows, header))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**r.to_json(), "env_start": env, "env_end": env_end} for r in rows], f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
