"""Helpers of the DP-Morph tests: tiny constructed nnU-Net folders (a few 3D cases, written with SimpleITK as NIfTI).

Each case holds three classes far apart (more than twice the largest radius tested), each with a known best repair:
  1 "speckled": reference ball, prediction = ball + isolated salt voxels      -> opening repairs it
  2 "holey":    reference box,  prediction = box with isolated interior holes -> closing repairs it
  3 "blobs":    single voxels and pairs, prediction misses some              -> any opening destroys them: none
"""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

SHAPE = (12, 18, 54)
LABELS = {"background": 0, "speckled": 1, "holey": 2, "blobs": 3}


def _isolated_points(rng: np.random.Generator, region: np.ndarray, count: int) -> list[tuple[int, ...]]:
    """Random voxels of region, no two within Chebyshev distance 2 (so they stay isolated)."""
    taken: list[np.ndarray] = []
    candidates = np.argwhere(region)
    for index in rng.permutation(len(candidates)):
        p = candidates[index]
        if all(np.abs(p - q).max() > 2 for q in taken):
            taken.append(p)
        if len(taken) == count:
            break
    return [tuple(int(v) for v in p) for p in taken]


def make_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(reference, prediction) label maps of SHAPE, uint8."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(SHAPE)
    ref = np.zeros(SHAPE, dtype=np.uint8)
    centre = (6 + rng.integers(-1, 2), 9 + rng.integers(-1, 2), 8)
    ball = (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= 4.5 ** 2
    ref[ball] = 1
    ref[2:10, 4:14, 21:31] = 2
    for p in _isolated_points(rng, (x >= 40) & (x <= 51) & (z > 1) & (z < 10) & (y > 2) & (y < 15), 8):
        ref[p] = 3
        if rng.random() < 0.5 and p[2] + 1 < SHAPE[2]:
            ref[p[0], p[1], p[2] + 1] = 3
    pred = ref.copy()
    for p in _isolated_points(rng, (x < 17) & ~np.pad(ball, 1)[1:-1, 1:-1, 1:-1] & (ref == 0), 25):
        if not np.any(ball[max(p[0] - 1, 0):p[0] + 2, max(p[1] - 1, 0):p[1] + 2, max(p[2] - 1, 0):p[2] + 2]):
            pred[p] = 1
    interior = np.zeros(SHAPE, dtype=bool)
    interior[3:9, 5:13, 22:30] = True
    for p in _isolated_points(rng, interior, 12):
        pred[p] = 0
    blobs = np.argwhere(ref == 3)
    for p in blobs[rng.random(len(blobs)) < 0.2]:
        pred[tuple(p)] = 0
    return ref, pred


def write_label_map(array: np.ndarray, path: Path, spacing: tuple[float, ...] = (1.0, 1.0, 1.0)) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing[::-1])  # SimpleITK: x, y, z; the array: z, y, x
    sitk.WriteImage(image, str(path), True)


def plans_dict(spacing: tuple[float, ...] = (1.0, 1.0, 1.0)) -> dict:
    return {"dataset_name": "Dataset999_DPMorphTiny", "plans_name": "nnUNetPlans",
            "original_median_spacing_after_transp": list(spacing), "original_median_shape_after_transp": list(SHAPE),
            "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "label_manager": "LabelManager", "configurations": {}, "experiment_planner_used": "ExperimentPlanner"}


def write_model_folder(root: Path, cases: dict[str, tuple[np.ndarray, np.ndarray]],
                       labels: dict[str, int] | None = None) -> dict[str, Path]:
    """A trained-model-like layout: root/{plans.json, dataset.json, fold_0/validation/*.nii.gz}, root/gt/*.nii.gz."""
    validation, gt = root / "fold_0" / "validation", root / "gt"
    validation.mkdir(parents=True)
    gt.mkdir()
    (root / "plans.json").write_text(json.dumps(plans_dict()))
    dataset = {"channel_names": {"0": "MRI"}, "labels": labels or LABELS, "numTraining": len(cases),
               "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(dataset))
    for name, (ref, pred) in cases.items():
        write_label_map(ref, gt / f"{name}.nii.gz")
        write_label_map(pred, validation / f"{name}.nii.gz")
    return {"root": root, "validation": validation, "gt": gt}



def reference_ball(radius: float, spacing: tuple[float, ...]) -> np.ndarray:
    """{x in Z^d : sum (x_i s_i)^2 <= r^2 (1 + 1e-9)} by an explicit loop (ties inside, as documented)."""
    extent = [math.ceil(radius / s) + 1 for s in spacing]
    out = np.zeros([2 * e + 1 for e in extent], dtype=bool)
    for offset in itertools.product(*[range(-e, e + 1) for e in extent]):
        if sum((o * s) ** 2 for o, s in zip(offset, spacing)) <= radius**2 * (1 + 1e-9):
            out[tuple(o + e for o, e in zip(offset, extent))] = True
    return out


def pad_crop_closing(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """scipy closing of the mask surrounded by enough background, cropped back (the 'background' convention)."""
    half = [n // 2 for n in structure.shape]
    closed = ndimage.binary_closing(np.pad(mask, [(h, h) for h in half]), structure)
    return closed[tuple(slice(h, h + n) for h, n in zip(half, mask.shape))]
