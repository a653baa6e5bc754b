"""Invariant 1: which Poisson batch becomes step t is fixed in advance, never by which worker finishes first.

A mock batchgenerators loader tags each batch with (worker thread_id, per-worker counter) and takes longer for
bigger batches, as the real Poisson loader does. The ordered augmenter must hand them out round-robin whatever the
timing; nnU-Net's NonDetMultiThreadedAugmenter does not (shown with one worker much slower than the other).
"""
from __future__ import annotations

import os
import secrets
import time

import numpy as np
import pytest
from batchgenerators.dataloading.data_loader import SlimDataLoaderBase
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter

from nnunet_dp.nnunet.augmenter import make_augmenter

NUM_BATCHES = 30


class TaggedLoader(SlimDataLoaderBase):
    """Batches {'worker', 'counter', 'size', 'global_draw'}; generating one sleeps ms_per_case * size (+ slow_ms on
    worker 0). Like nnUNetPoissonDataLoader, its generator is made lazily in the worker from OS entropy."""

    def __init__(self, *, ms_per_case: float = 1.0, max_size: int = 30, slow_ms: float = 0.0, fail_at: int = -1):
        super().__init__(None, 0)
        self.ms_per_case, self.max_size, self.slow_ms, self.fail_at = ms_per_case, max_size, slow_ms, fail_at
        self._rng, self._pid, self._counter = None, None, 0

    def generate_train_batch(self) -> dict:
        if self._pid != os.getpid():
            self._rng = np.random.default_rng([secrets.randbits(128), self.thread_id])
            self._pid, self._counter = os.getpid(), 0
        if self._counter == self.fail_at:
            raise ValueError("mock worker failure")
        size = int(self._rng.integers(0, self.max_size + 1))
        time.sleep((self.ms_per_case * size + (self.slow_ms if self.thread_id == 0 else 0.0)) / 1000)
        batch = {"worker": self.thread_id, "counter": self._counter, "size": size, "global_draw": np.random.random()}
        self._counter += 1
        return batch


def consume(augmenter, n: int) -> list[dict]:
    try:
        return [next(augmenter) for _ in range(n)]
    finally:
        if hasattr(augmenter, "_finish"):
            augmenter._finish()


def round_robin(n: int, processes: int) -> list[tuple[int, int]]:
    """The sequence fixed in advance: worker 0 batch 0, worker 1 batch 0, ..., worker 0 batch 1, ..."""
    return [(t % processes, t // processes) for t in range(n)]


def tags(batches: list[dict]) -> list[tuple[int, int]]:
    return [(b["worker"], b["counter"]) for b in batches]


@pytest.mark.parametrize("processes", [2, 3])
@pytest.mark.parametrize("slow_ms", [0.0, 40.0], ids=["size-dependent", "worker0-slow"])
def test_ordered_augmenter_consumes_round_robin(processes, slow_ms):
    """Delays grow with the random batch size (0-30 ms), optionally worker 0 is much slower: order stays fixed."""
    aug = make_augmenter(TaggedLoader(slow_ms=slow_ms), num_processes=processes, train=True, pin_memory=False)
    assert isinstance(aug, MultiThreadedAugmenter)
    batches = consume(aug, NUM_BATCHES)
    assert tags(batches) == round_robin(NUM_BATCHES, processes)
    sizes = {w: [b["size"] for b in batches if b["worker"] == w] for w in range(processes)}
    assert len({tuple(s) for s in sizes.values()}) == processes  # every worker draws its own batches
    draws = {w: [b["global_draw"] for b in batches if b["worker"] == w] for w in range(processes)}
    assert len({tuple(d) for d in draws.values()}) == processes  # the global numpy RNG differs per worker too


def test_nondet_augmenter_does_not_fix_the_order():
    """The check above can fail: nnU-Net's NonDet augmenter lets the fast worker's batches overtake."""
    aug = NonDetMultiThreadedAugmenter(TaggedLoader(slow_ms=40.0), None, num_processes=2, num_cached=6, seeds=None,
                                       pin_memory=False, wait_time=0.002)
    consumed = tags(consume(aug, NUM_BATCHES))
    assert consumed != round_robin(NUM_BATCHES, 2)
    assert sum(w == 1 for w, _ in consumed) > 2 * sum(w == 0 for w, _ in consumed)  # worker 1 took most steps


def test_worker_failure_raises_instead_of_hanging():
    aug = make_augmenter(TaggedLoader(ms_per_case=0.0, fail_at=2), num_processes=2, train=True, pin_memory=False)
    with pytest.raises(RuntimeError, match="no longer alive"):
        consume(aug, NUM_BATCHES)


def test_no_workers_runs_in_process_and_bad_counts_are_refused():
    aug = make_augmenter(TaggedLoader(ms_per_case=0.0), num_processes=0, train=False, pin_memory=False)
    assert isinstance(aug, SingleThreadedAugmenter)
    assert tags(consume(aug, 3)) == round_robin(3, 1)
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="num_processes"):
            make_augmenter(TaggedLoader(), num_processes=bad, train=True, pin_memory=False)


def test_poisson_loader_reseeds_torch_per_worker():
    """Forked workers inherit one torch RNG state; nnU-Net's transforms draw from it. Each worker's loader reseeds
    it from its own entropy, so two workers' augmentations differ (and a reproducible seed repeats them)."""
    import torch

    from nnunet_dp.nnunet.loader import nnUNetPoissonDataLoader

    def draws(seed, thread_id):
        loader = nnUNetPoissonDataLoader.__new__(nnUNetPoissonDataLoader)
        loader._seed, loader._seed_salt, loader._rng, loader._rng_pid, loader.thread_id = seed, 0, None, None, thread_id
        torch.manual_seed(0)  # the state every forked worker starts from
        loader._generator()
        return torch.rand(8)

    assert not torch.equal(draws(None, 0), draws(None, 1))
    assert not torch.equal(draws(5, 0), draws(5, 1))
    assert torch.equal(draws(5, 1), draws(5, 1))
