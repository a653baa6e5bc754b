"""Background augmenters whose consumed batch sequence is fixed in advance (invariant 1).

nnU-Net's `NonDetMultiThreadedAugmenter` puts every worker's batches into one shared queue, so the trainer receives
them in the order the workers finish them. Finish time depends on the batch's size and cases, so with Poisson
batches *which* batch becomes step t would depend on the data. batchgenerators' `MultiThreadedAugmenter` gives each
worker its own queue and reads the queues round-robin (batchgenerators 0.25.5, multi_threaded_augmenter.py,
`results_loop`: `current_queue = in_queues[queue_ctr % len(in_queues)]`, a blocking `get` on that queue only, then
`queue_ctr += 1`). Step t is therefore always batch t // P of worker t % P (P = num_processes), whatever the
timing: a slow batch delays the steps after it but never swaps places with them.

Seeds: we pass seeds=None. Each worker then calls `np.random.seed(None)` (fresh OS entropy) and
`set_thread_id(i)`; our Poisson loader makes its own generator lazily in the worker from OS entropy (or the explicit
reproducible seed), its salt and thread_id, so the workers draw different batches and no seed is made here.

Failure: a worker that raises sets the abort event; a worker that dies is noticed by the results thread (it checks
`is_alive` on every wait). Either way the next `next()` raises RuntimeError instead of hanging.
"""
from __future__ import annotations

from typing import Any

from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter

# The trainer's NonDetMultiThreadedAugmenter cached max(n, P) batches in its worker queue and as many again in its
# reader's queue: 2 * max(n, P) in all. MultiThreadedAugmenter caches `per_queue` per worker plus
# max(3, per_queue * P // 2) in its reader's queue; per_queue is chosen to hold about as many (at least 2 per worker).
# Deeper worker queues absorb a worker that falls behind for a while (a big Poisson batch, a busy core) before the
# round-robin reader stalls the others.
CACHED_BATCHES = {True: 6, False: 3}


def make_augmenter(loader: Any, *, num_processes: int, train: bool, pin_memory: bool,
                   wait_time: float = 0.02) -> MultiThreadedAugmenter | SingleThreadedAugmenter:
    """The augmenter for `loader` (a batchgenerators data loader that applies its own transforms).

    num_processes == 0 runs in the main process (SingleThreadedAugmenter); otherwise `num_processes` workers are
    read round-robin (MultiThreadedAugmenter), so the consumed sequence is fixed: step t is batch t // P of worker
    t % P. `train` only sets how many batches are cached; validation uses the same ordered augmenter.
    `wait_time` (seconds) is how often blocked waits re-check for a failed worker; it does not delay batches.
    """
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 0:
        raise ValueError(f"num_processes = {num_processes!r} is not allowed: an int >= 0 (0 = no background "
                         f"workers). Set nnUNet_n_proc_DA to a non-negative integer.")
    if not wait_time > 0:
        raise ValueError(f"wait_time = {wait_time!r} is not allowed: seconds > 0 (0 would busy-wait).")
    if num_processes == 0:
        return SingleThreadedAugmenter(loader, None)
    per_queue = max(2, round(4 * max(CACHED_BATCHES[train], num_processes) / (3 * num_processes)))
    return MultiThreadedAugmenter(loader, None, num_processes=num_processes, num_cached_per_queue=per_queue,
                                  seeds=None, pin_memory=pin_memory, wait_time=wait_time)
