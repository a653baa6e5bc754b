"""Case-level Poisson sampling inside nnU-Net's data pipeline.

Every call draws a new batch: each training case (of this rank's shard) is included independently with
probability q, and yields K = augmentations_per_case patches (default 1). The batch is case-major: rows
[i*K, (i+1)*K) are case i's patches, and batch["keys"] repeats each sampled key K times (len(keys) // K cases).
nnU-Net's generate_train_batch loads each row on its own: every row gets its own random patch location (or 2D
slice), its own foreground-oversampling draw (probabilistic, so independent of the row's position) and its own
augmentation; each uses only that case (DESIGN.md invariant 2). The per-case gradient engine averages a case's K
patch gradients before scaling (nnunet_dp.per_sample.scaled_sum, group=K). The number of cases varies and may be 0,
in which case 'data' and 'target' are None.
"""
from __future__ import annotations

import os
import secrets

import numpy as np
import torch
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

from nnunet_dp.sampling import poisson_sample


class nnUNetPoissonDataLoader(nnUNetDataLoader):
    def __init__(self, data, patch_size, final_patch_size, label_manager, *, sampling_rate: float,
                 oversample_foreground_percent: float, transforms, seed: int | None, seed_salt: int = 0,
                 augmentations_per_case: int = 1) -> None:
        k = augmentations_per_case
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"augmentations_per_case {k!r}: an integer >= 1 (patches per sampled case)")
        super().__init__(data, 1, patch_size, final_patch_size, label_manager,
                         oversample_foreground_percent=oversample_foreground_percent, sampling_probabilities=None,
                         pad_sides=None, probabilistic_oversampling=True, transforms=transforms)
        self.sampling_rate = sampling_rate
        self.augmentations_per_case = k
        self._seed, self._seed_salt = seed, seed_salt
        self._rng: np.random.Generator | None = None
        self._rng_pid: int | None = None

    def _generator(self) -> np.random.Generator:
        """Made lazily in the process that samples (augmenter workers are forked: a generator made before the fork
        would give every worker the same batches). Seeded from the OS unless a seed is set."""
        if self._rng is None or self._rng_pid != os.getpid():
            entropy = self._seed if self._seed is not None else secrets.randbits(128)
            seq = np.random.SeedSequence([entropy, self._seed_salt, self.thread_id])
            self._rng, self._rng_pid = np.random.default_rng(seq), os.getpid()
            np.random.seed(seq.generate_state(1)[0])  # nnU-Net's patch placement uses the global numpy RNG
            # nnU-Net's transforms draw from torch's global RNG, which forked workers inherit identically: without
            # this, steps t and t+1 (two workers) would share their augmentation randomness
            torch.manual_seed(int(seq.generate_state(2, np.uint64)[1]) & (2**63 - 1))
        return self._rng

    def get_indices(self) -> list[str]:
        """The Poisson-sampled cases, each key repeated K times consecutively (case-major rows)."""
        cases = poisson_sample(list(self.indices), sampling_rate=self.sampling_rate, rng=self._generator())
        keys = [key for key in cases for _ in range(self.augmentations_per_case)]
        self.batch_size = len(keys)  # nnU-Net's generate_train_batch allocates the batch with this size
        return keys
