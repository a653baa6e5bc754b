"""Synthetic nnU-Net raw datasets (no download): noisy images with a disk (label 1) and a ring (label 2).

Used by the demo and the tests. Deterministic for a given seed. By default 2D cases are stored as one-slice NIfTI
volumes with one channel; `file_ending=".png"` writes 2D cases as 8-bit PNG (nnU-Net's NaturalImage2DIO), one RGB
file per case with `channels=3`; NIfTI cases with several channels get one file per channel (_0000, _0001, ...).
Each extra channel shows the same objects with its own contrast and noise.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from os.path import join
from typing import Literal

import numpy as np
import SimpleITK as sitk


@dataclass(frozen=True)
class Appearance:
    """How a case looks: the objects' intensities (disk, ring) over a background of 0, the noise std, a constant
    intensity offset (a scanner/site shift) and the radius range's scale. The defaults are the easy task the demo and
    the tests use (intensity alone separates the classes); `HARD` needs shape: both objects equally bright, weak."""

    intensities: tuple[float, float] = (1.5, 2.5)
    noise: float = 0.6
    offset: float = 0.0
    radius_scale: float = 1.0


HARD = Appearance(intensities=(0.8, 0.8), noise=1.0)


def _case(rng: np.random.Generator, shape: tuple[int, ...],
          look: Appearance = Appearance()) -> tuple[np.ndarray, np.ndarray]:
    """One image/label pair: a filled disk/ball (1) and a ring/shell (2) at random places, plus noise."""
    grid = np.indices(shape, dtype=np.float32)
    seg = np.zeros(shape, dtype=np.uint8)
    size = min(shape[-2:])
    for label, (r_lo, r_hi), hollow in ((1, (0.12, 0.2), False), (2, (0.15, 0.22), True)):
        center = [rng.uniform(0.3 * s, 0.7 * s) if s > 1 else 0 for s in shape]
        r = rng.uniform(r_lo, r_hi) * size * look.radius_scale
        dist = np.sqrt(sum((g - c) ** 2 for g, c, s in zip(grid, center, shape) if s > 1))
        mask = (dist <= r) & (dist >= 0.6 * r) if hollow else dist <= r
        seg[mask & (seg == 0)] = label
    image = rng.normal(0.0, look.noise, shape).astype(np.float32)
    image += np.choose(seg, [0.0, *look.intensities]).astype(np.float32) + np.float32(look.offset)
    return image, seg


def _write(arr: np.ndarray, path: str, spacing: tuple[float, ...]) -> None:
    img = sitk.GetImageFromArray(arr if arr.ndim == 3 else arr[None])
    img.SetSpacing(tuple(float(s) for s in spacing[::-1]) if arr.ndim == 3 else (1.0, 1.0, 999.0))
    sitk.WriteImage(img, path)


FileEnding = Literal[".nii.gz", ".png"]
# per extra channel (1, 2, ...): the weight of the objects' contrast and the noise std (channel 0 is `_case`'s image)
_CHANNEL_CONTRAST = (1.0, -0.8, 0.5)


def _channels(rng: np.random.Generator, image: np.ndarray, seg: np.ndarray, channels: int) -> list[np.ndarray]:
    """`image` and channels - 1 more views of the same objects: other contrasts (one inverted), fresh noise."""
    out = [image]
    for c in range(1, channels):
        weight = _CHANNEL_CONTRAST[c % len(_CHANNEL_CONTRAST)] * (1 + 0.1 * (c // len(_CHANNEL_CONTRAST)))
        extra = rng.normal(0.0, 0.6, seg.shape).astype(np.float32)
        out.append(extra + weight * np.choose(seg, [0.0, 2.5, 1.2]).astype(np.float32))
    return out


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """Intensities (about -2.5 to 5.5) to 8 bits: 0 at -2.5, 255 at 5.5, clipped."""
    return np.clip((image + 2.5) * 32.0, 0, 255).astype(np.uint8)


def _write_case(images: list[np.ndarray], seg: np.ndarray, folder: str, split: str, case: str,
                file_ending: FileEnding, spacing: tuple[float, ...]) -> None:
    if file_ending == ".png":
        from skimage import io

        pixels = _to_uint8(np.stack(images, axis=-1)) if len(images) == 3 else _to_uint8(images[0])
        io.imsave(join(folder, f"images{split}", f"{case}_0000.png"), pixels, check_contrast=False)
        io.imsave(join(folder, f"labels{split}", f"{case}.png"), seg, check_contrast=False)
        return
    for c, image in enumerate(images):
        _write(image, join(folder, f"images{split}", f"{case}_{c:04d}.nii.gz"), spacing)
    _write(seg, join(folder, f"labels{split}", f"{case}.nii.gz"), spacing)


def _check_format(shape: tuple[int, ...], channels: int, file_ending: str) -> None:
    if file_ending not in (".nii.gz", ".png"):
        raise ValueError(f"file_ending = {file_ending!r}: expected '.nii.gz' or '.png'")
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels = {channels!r}: expected an integer >= 1")
    if file_ending == ".png" and (len(shape) != 2 or channels not in (1, 3)):
        raise ValueError(f"file_ending '.png' with shape {shape} and {channels} channels: PNG cases are 2D (a shape "
                         "of two sizes) with 1 (gray) or 3 (RGB) channels; use '.nii.gz' otherwise")


def make_dataset(raw_folder: str, *, dataset_id: int = 990, name: str = "DPDemo", num_train: int = 24,
                 num_test: int = 6, shape: tuple[int, ...] = (64, 64), seed: int = 0,
                 binary: bool = False, channels: int = 1, file_ending: FileEnding = ".nii.gz",
                 appearance: Appearance = Appearance(), first_case: int = 0) -> str:
    """Write Dataset{id}_{name} into `raw_folder` (imagesTr/labelsTr/imagesTs/labelsTs). Returns its path.

    channels: image channels per case; file_ending: ".nii.gz" (default) or ".png" (2D only; 1 or 3 channels, RGB in
    one file); appearance: the task's look (Appearance; HARD needs shape); first_case: the first case number (case ids
    of datasets drawn from one population stay distinct). The defaults write exactly what earlier versions wrote."""
    _check_format(tuple(shape), channels, file_ending)
    folder = join(raw_folder, f"Dataset{dataset_id:03d}_{name}")
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        os.makedirs(join(folder, sub), exist_ok=True)
    rng = np.random.default_rng(seed)
    spacing = (1.0,) * len(shape)
    for i in range(num_train + num_test):
        image, seg = _case(rng, shape, appearance)
        if binary:
            seg = (seg > 0).astype(np.uint8)
        split = "Tr" if i < num_train else "Ts"
        images = _channels(rng, image, seg, channels) if channels > 1 else [image]
        _write_case(images, seg, folder, split, f"case_{first_case + i:03d}", file_ending, spacing)
    labels = {"background": 0, "disk": 1} if binary else {"background": 0, "disk": 1, "ring": 2}
    names = {"0": "R", "1": "G", "2": "B"} if file_ending == ".png" and channels == 3 else \
        {str(c): "synthetic" if c == 0 else f"synthetic{c}" for c in range(channels)}
    with open(join(folder, "dataset.json"), "w") as f:
        json.dump({"channel_names": names, "labels": labels, "numTraining": num_train,
                   "file_ending": file_ending, "name": name,
                   "description": "synthetic disks and rings made by nnunet_dp.synthetic"}, f, indent=2)
    return folder
