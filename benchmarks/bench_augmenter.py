"""Ordered augmenter (make_augmenter) against nnU-Net's NonDetMultiThreadedAugmenter, side by side.

    python benchmarks/bench_augmenter.py                   # loader only: 300 batches x 5 rounds, 2 workers
    python benchmarks/bench_augmenter.py --consumer train  # the demo's training: each batch goes through train_step
    python benchmarks/bench_augmenter.py --quick           # 40 cases, 20 batches x 1 round (smoke test only)

Both augmenters get the same loader: the real nnUNetPoissonDataLoader with nnU-Net's training transforms, built by
nnUNetTrainerDP.get_dataloaders on the demo's synthetic dataset (made and preprocessed once into --work), with the
demo's DP settings (Poisson batches of ~32 of 320 cases). Each round times both, in alternating order, consuming
--batches batches after a warm-up of 2 batches per worker. With --consumer none the consumer does nothing else, so the
loader is the bottleneck: the worst case for a round-robin reader, which waits for the slowest worker while NonDet
takes whatever is ready. With --consumer train every batch goes through the trainer's private train_step (the demo's
network and settings, CPU), as in training. Prints both times and ordered/nondet per round and the median ratio.
Target: ordered within 10 % of NonDet. On a shared machine compare only rounds at similar load (last column).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from itertools import pairwise
from os.path import isdir, join

DATASET_ID, NAME = 990, "DPDemo"
DATASET = f"Dataset{DATASET_ID}_{NAME}"


def set_env(work: str, *, quick: bool) -> None:
    """nnU-Net reads its folders at import: call before importing nnunetv2."""
    from nnunet_dp.tools.demo import DEMO_SETTINGS, QUICK_SETTINGS

    cfg = join(work, "dp_config.json")
    os.makedirs(work, exist_ok=True)
    with open(cfg, "w") as f:
        # the demo's settings, with enough epochs that the budget allows every timed step (a step costs the same)
        json.dump({**(QUICK_SETTINGS if quick else DEMO_SETTINGS), "num_epochs": 1000}, f)
    os.environ.update(nnUNet_raw=join(work, "nnUNet_raw"), nnUNet_preprocessed=join(work, "nnUNet_preprocessed"),
                      nnUNet_results=join(work, "nnUNet_results"), nnUNet_dp_config=cfg, nnUNet_compile="f",
                      nnUNet_def_n_proc="2")


def prepare(work: str, *, quick: bool) -> None:
    """The demo's data steps: synthetic dataset, nnU-Net planning and preprocessing, the demo's smaller network."""
    from nnunet_dp.synthetic import make_dataset
    from nnunet_dp.tools.demo import DEMO_FEATURES, console_script, planning_env, shrink_network

    pre = join(os.environ["nnUNet_preprocessed"], DATASET)
    if isdir(join(pre, "nnUNetPlans_2d")):
        return
    make_dataset(os.environ["nnUNet_raw"], dataset_id=DATASET_ID, name=NAME, num_train=40 if quick else 400,
                 num_test=20, shape=(32, 32))
    subprocess.run([console_script("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "2d", "-np", "2"],
                   env=planning_env(dict(os.environ)), check=True, capture_output=True)
    shrink_network(join(pre, "nnUNetPlans.json"), DEMO_FEATURES)


def demo_trainer():
    """nnUNetTrainerDP on the demo's data, initialised as on_train_start does, with its own Poisson loader and
    nnU-Net's training transforms (built by get_dataloaders, wrapped in-process: no workers to stop)."""
    import torch

    from nnunet_dp.nnunet.trainer import nnUNetTrainerDP

    pre = join(os.environ["nnUNet_preprocessed"], DATASET)
    with open(join(pre, "nnUNetPlans.json")) as f:
        plans = json.load(f) | {"continue_training": False}  # nnUNetTrainer.__init__ pops it (run_training sets it)
    with open(join(pre, "dataset.json")) as f:
        dataset_json = json.load(f)
    os.environ["nnUNet_n_proc_DA"] = "0"
    trainer = nnUNetTrainerDP(plans, "2d", 0, dataset_json, torch.device("cpu"))
    trainer.initialize()  # as on_train_start does before get_dataloaders (sets the batch size, builds the network)
    aug_tr, _ = trainer.get_dataloaders()
    trainer.network.train()
    return trainer, aug_tr.data_loader


def make(kind: str, loader, processes: int):
    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter

    from nnunet_dp.nnunet.augmenter import make_augmenter

    if kind == "nondet":  # exactly as nnUNetTrainerDP._augmenter built it before the ordered augmenter
        return NonDetMultiThreadedAugmenter(loader, None, num_processes=processes, num_cached=max(6, processes),
                                            seeds=None, pin_memory=False, wait_time=0.002)
    return make_augmenter(loader, num_processes=processes, train=True, pin_memory=False)


def timed_round(kind: str, loader, consume, *, processes: int, batches: int) -> tuple[float, list[list[str]]]:
    aug = make(kind, loader, processes)
    try:
        for _ in range(2 * processes):  # start-up and the first batch of every worker are not timed
            next(aug)
        keys, start = [], time.perf_counter()
        for _ in range(batches):
            batch = next(aug)
            keys.append(list(batch["keys"]))
            consume(batch)
        return time.perf_counter() - start, keys
    finally:
        aug._finish()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/nnunet_dp_bench_augmenter", help="data folder (made once, then reused)")
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--consumer", choices=("none", "train"), default="none",
                    help="none: only take the batches (loader-bound); train: the trainer's train_step on each")
    ap.add_argument("--quick", action="store_true", help="smoke test: 40 cases, 20 batches, 1 round")
    args = ap.parse_args()
    work = args.work + ("_quick" if args.quick else "")
    batches, rounds = (20, 1) if args.quick else (args.batches, args.rounds)
    set_env(work, quick=args.quick)
    prepare(work, quick=args.quick)
    trainer, loader = demo_trainer()
    consume = trainer.train_step if args.consumer == "train" else (lambda batch: None)
    plan = trainer.dp_run.plan
    print(f"{plan.num_training_cases} cases, q={plan.sampling_rate:.4f} (expected batch {plan.expected_batch_size:.1f})"
          f", {args.processes} workers, consumer {args.consumer}, {batches} batches per timing, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, load average {os.getloadavg()[0]:.1f}")
    print(f"{'round':>5} {'nondet s':>9} {'ordered s':>10} {'ordered/nondet':>15} {'load':>5}")
    ratios = []
    for r in range(rounds):
        times = {}
        for kind in (("nondet", "ordered") if r % 2 == 0 else ("ordered", "nondet")):
            times[kind], keys = timed_round(kind, loader, consume, processes=args.processes, batches=batches)
            repeats = sum(bool(a) and a == b for a, b in pairwise(keys))
            if repeats:
                print(f"  warning: {repeats} consecutive {kind} batches were identical (workers share a generator?)")
        ratios.append(times["ordered"] / times["nondet"])
        print(f"{r:>5} {times['nondet']:>9.2f} {times['ordered']:>10.2f} {ratios[-1]:>15.3f} {os.getloadavg()[0]:>5.1f}")
    print(f"median ordered/nondet time: {statistics.median(ratios):.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
