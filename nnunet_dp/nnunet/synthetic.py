"""Synthetic nnU-Net raw datasets (no download): noisy images with a disk (label 1) and a ring (label 2).

Used by the demo and the tests. Deterministic for a given seed; 2D cases are stored as one-slice NIfTI volumes.
"""
from __future__ import annotations

import json
import os
from os.path import join

import numpy as np
import SimpleITK as sitk


def _case(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """One image/label pair: a filled disk/ball (1) and a ring/shell (2) at random places, plus noise."""
    grid = np.indices(shape, dtype=np.float32)
    seg = np.zeros(shape, dtype=np.uint8)
    size = min(shape[-2:])
    for label, (r_lo, r_hi), hollow in ((1, (0.12, 0.2), False), (2, (0.15, 0.22), True)):
        center = [rng.uniform(0.3 * s, 0.7 * s) if s > 1 else 0 for s in shape]
        r = rng.uniform(r_lo, r_hi) * size
        dist = np.sqrt(sum((g - c) ** 2 for g, c, s in zip(grid, center, shape) if s > 1))
        mask = (dist <= r) & (dist >= 0.6 * r) if hollow else dist <= r
        seg[mask & (seg == 0)] = label
    image = rng.normal(0.0, 0.6, shape).astype(np.float32)
    image += np.choose(seg, [0.0, 1.5, 2.5]).astype(np.float32)
    return image, seg


def _write(arr: np.ndarray, path: str, spacing: tuple[float, ...]) -> None:
    img = sitk.GetImageFromArray(arr if arr.ndim == 3 else arr[None])
    img.SetSpacing(tuple(float(s) for s in spacing[::-1]) if arr.ndim == 3 else (1.0, 1.0, 999.0))
    sitk.WriteImage(img, path)


def make_dataset(raw_folder: str, *, dataset_id: int = 990, name: str = "DPDemo", num_train: int = 24,
                 num_test: int = 6, shape: tuple[int, ...] = (64, 64), seed: int = 0,
                 binary: bool = False) -> str:
    """Write Dataset{id}_{name} into `raw_folder` (imagesTr/labelsTr/imagesTs/labelsTs). Returns its path."""
    folder = join(raw_folder, f"Dataset{dataset_id:03d}_{name}")
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        os.makedirs(join(folder, sub), exist_ok=True)
    rng = np.random.default_rng(seed)
    spacing = (1.0,) * len(shape)
    for i in range(num_train + num_test):
        image, seg = _case(rng, shape)
        if binary:
            seg = (seg > 0).astype(np.uint8)
        split = "Tr" if i < num_train else "Ts"
        _write(image, join(folder, f"images{split}", f"case_{i:03d}_0000.nii.gz"), spacing)
        _write(seg, join(folder, f"labels{split}", f"case_{i:03d}.nii.gz"), spacing)
    labels = {"background": 0, "disk": 1} if binary else {"background": 0, "disk": 1, "ring": 2}
    with open(join(folder, "dataset.json"), "w") as f:
        json.dump({"channel_names": {"0": "synthetic"}, "labels": labels, "numTraining": num_train,
                   "file_ending": ".nii.gz", "name": name,
                   "description": "synthetic disks and rings made by nnunet_dp.nnunet.synthetic"}, f, indent=2)
    return folder
