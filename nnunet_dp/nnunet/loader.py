"""Case-level Poisson sampling inside nnU-Net's data pipeline.

Every call draws a new batch: each training case (of this rank's shard) is included independently with
probability q, and yields K = augmentations_per_case patches (default 1). The batch is case-major: rows
[i*K, (i+1)*K) are case i's patches, and batch["keys"] repeats each sampled key K times (len(keys) // K cases).
nnU-Net's generate_train_batch loads each row on its own: every row gets its own random patch location (or 2D
slice), its own foreground-oversampling draw (probabilistic, so independent of the row's position) and its own
augmentation; each uses only that case (docs/invariants.md, invariant 2). The per-case gradient engine averages a case's K
patch gradients before scaling (nnunet_dp.per_sample.scaled_sum, group=K). The number of cases varies and may be 0,
in which case 'data' and 'target' are None.
"""
from __future__ import annotations

import os
import secrets
from typing import Any

import numpy as np
import torch
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from torch import distributed as dist

from nnunet_dp.nnunet.augmenter import make_augmenter
from nnunet_dp.sampling import poisson_sample, shard


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


def dp_dataloaders(trainer: Any) -> tuple[Any, Any]:
    """nnUNetTrainer.get_dataloaders with the DP training loader: Poisson sampling of the cases of this rank's
    disjoint shard (each case is sampled by exactly one rank, with probability q), K patches per case, nnU-Net's
    transforms; validation as nnU-Net does it. Both through the ordered augmenter (nnunet_dp.nnunet.augmenter)."""
    run = trainer._dp_setup()
    rot, dummy_2d, initial_patch_size, mirror_axes = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    ds_scales = trainer._get_deep_supervision_scales()
    lm, conf = trainer.label_manager, trainer.configuration_manager
    label_kwargs = {"is_cascaded": trainer.is_cascaded, "foreground_labels": lm.foreground_labels,
                    "regions": lm.foreground_regions if lm.has_regions else None, "ignore_label": lm.ignore_label}
    tr_transforms = trainer.get_training_transforms(conf.patch_size, rot, ds_scales, mirror_axes, dummy_2d,
                                                    use_mask_for_norm=conf.use_mask_for_norm, **label_kwargs)
    val_transforms = trainer.get_validation_transforms(ds_scales, **label_kwargs)
    dataset_tr, dataset_val = trainer.get_tr_and_val_datasets()
    if trainer.is_ddp:
        dataset_tr.identifiers = shard(sorted(dataset_tr.identifiers), rank=dist.get_rank(),
                                       world_size=dist.get_world_size())
    cfg = trainer.dp_config
    dl_tr = nnUNetPoissonDataLoader(
        dataset_tr, initial_patch_size, conf.patch_size, lm, sampling_rate=run.plan.sampling_rate,
        oversample_foreground_percent=trainer.oversample_foreground_percent, transforms=tr_transforms, seed=cfg.seed,
        seed_salt=trainer.current_epoch * 1000 + trainer.local_rank, augmentations_per_case=cfg.augmentations_per_case)
    dl_val = nnUNetDataLoader(dataset_val, trainer.batch_size, conf.patch_size, conf.patch_size, lm,
                              oversample_foreground_percent=trainer.oversample_foreground_percent,
                              transforms=val_transforms)
    n = get_allowed_n_proc_DA()
    pin = trainer.device.type == "cuda"
    # workers read round-robin: which Poisson batch is step t is fixed in advance (docs/invariants.md, invariant 1)
    return (make_augmenter(dl_tr, num_processes=n, train=True, pin_memory=pin),
            make_augmenter(dl_val, num_processes=n if n == 0 else max(1, n // 2), train=False, pin_memory=pin))
