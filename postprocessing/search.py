"""DP-Morph search (pure numpy): score every candidate refinement on each case, then choose globally or per class.

Dice convention: Dice = 2|P∩R| / (|P|+|R|) over voxels whose reference is not the ignore label, and 1 when both
masks are empty, so that every candidate is scored on the same cases and each case's Dice lies in [0, 1] (the
exponential mechanism's sensitivity 1/n relies on it). nnU-Net's own summary.json instead leaves empty/empty cases
out of its means.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
from nnunet_dp.postprocessing.errors import DPMorphError
from nnunet_dp.postprocessing.morphology import RadiusSweep
from nnunet_dp.postprocessing.privacy import exponential_mechanism
from nnunet_dp.postprocessing.refine import (
    OPERATIONS,
    PLANES,
    Operation,
    Plane,
    Step,
    apply_operation,
    combine,
    slice_axis_for,
)

Mode = Literal["global", "adaptive"]
MODES: tuple[Mode, ...] = ("global", "adaptive")


class Candidate(NamedTuple):
    operation: Operation
    radius: float
    plane: Plane


NONE = Candidate("none", 0.0, "volumetric")


def make_candidates(operations: Sequence[Operation], radii: Sequence[float],
                    planes: Sequence[Plane]) -> list[Candidate]:
    """"none" first, then every operation x radius x plane (validated, deterministic order)."""
    for op in operations:
        if op not in OPERATIONS or op == "none":
            raise DPMorphError("operations", op, f"one of {list(OPERATIONS[1:])} ('none' is always a candidate)")
    for plane in planes:
        if plane not in PLANES:
            raise DPMorphError("planes", plane, f"one of {list(PLANES)}")
    for r in radii:
        if isinstance(r, bool) or not isinstance(r, (int, float, np.integer)) or not (np.isfinite(r) and r > 0):
            raise DPMorphError("radii", r, "finite numbers > 0", "Give radii such as -radii 1 2 3.")
    if not (operations and radii and planes):
        raise DPMorphError("candidates", (list(operations), list(radii), list(planes)),
                           "at least one operation, one radius and one plane")
    cands = [Candidate(op, float(r), pl) for pl in dict.fromkeys(planes) for op in dict.fromkeys(operations)
             for r in sorted(set(radii))]
    return [NONE, *cands]


def dice(pred: np.ndarray, ref: np.ndarray, valid: np.ndarray | None = None) -> float:
    """Dice of two boolean masks (1.0 if both are empty), counting only voxels where `valid`."""
    if valid is not None:
        pred, ref = pred & valid, ref & valid
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(ref))
    return 1.0 if total == 0 else 2.0 * np.count_nonzero(pred & ref) / total


def _refined_masks(seg: np.ndarray, labels: Sequence[int], candidates: Sequence[Candidate],
                   spacing: Sequence[float] | None, slice_axis: int) -> Iterator[tuple[int, dict[int, np.ndarray]]]:
    """Yield (candidate index, {label: refined mask}) through refine.apply_operation, the code the pkl runs.

    One RadiusSweep per (plane, class): its first EDTs and its opening/closing per radius are computed once and
    shared by all radii and by the composed operations. Sweeps of a finished plane are dropped (memory).
    """
    max_radius = max([c.radius for c in candidates if c.operation != "none"], default=1.0)
    sweeps: dict[tuple[Plane, int], RadiusSweep] = {}
    for index, cand in enumerate(candidates):
        if cand.operation == "none":
            yield index, {label: seg == label for label in labels}
            continue
        sweeps = {key: sweep for key, sweep in sweeps.items() if key[0] == cand.plane}
        masks = {}
        for label in labels:
            if (cand.plane, label) not in sweeps:
                axis = slice_axis_for(cand.plane, slice_axis, seg.ndim)
                sweeps[(cand.plane, label)] = RadiusSweep(seg == label, max_radius, spacing, slice_axis=axis)
            masks[label] = apply_operation(sweeps[(cand.plane, label)], cand.operation, cand.radius)
        yield index, masks


def case_dice(seg: np.ndarray, ref: np.ndarray, labels: Sequence[int], candidates: Sequence[Candidate], *,
              spacing: Sequence[float] | None = None, slice_axis: int = 0,
              ignore_label: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Dice per (candidate, class) for one case, two ways (arrays of shape [n_candidates, n_labels]).

    alone: only that class refined (what the adaptive mode chooses from; exact for the final map unless two
    classes add the same background voxel); all: every class refined with the candidate and merged by
    refine.combine (what the global mode applies).
    """
    valid = None if ignore_label is None else ref != ignore_label
    alone = np.empty((len(candidates), len(labels)))
    every = np.empty_like(alone)
    refs = {label: ref == label for label in labels}
    own = {label: (seg == 0) | (seg == label) for label in labels}
    for index, masks in _refined_masks(seg, labels, candidates, spacing, slice_axis):
        merged = combine(seg, masks)
        for k, label in enumerate(labels):
            alone[index, k] = dice(masks[label] & own[label], refs[label], valid)
            every[index, k] = dice(merged == label, refs[label], valid)
    return alone, every


@dataclass(frozen=True)
class Selection:
    """The chosen steps and the scores they were chosen on (utilities are mean Dice over the cases)."""

    steps: list[Step]
    chosen: dict[str, int]  # class key ("1", "2", ... or "all") -> candidate index
    utilities: dict[str, list[float]]  # class key -> utility of every candidate


def _choose(utility: np.ndarray, margin: float, epsilon: float | None, sensitivity: float,
            rng: np.random.Generator | None) -> int:
    """Best candidate if it beats "none" (index 0) by margin; privately: exponential mechanism on u - margin."""
    if epsilon is None:
        best = int(np.argmax(utility))
        return best if utility[best] > utility[0] + margin else 0
    penalised = utility - margin * (np.arange(len(utility)) != 0)
    return exponential_mechanism(penalised, epsilon=epsilon, sensitivity=sensitivity, rng=rng)


def select(alone: np.ndarray, every: np.ndarray, labels: Sequence[int], candidates: Sequence[Candidate], *,
           mode: Mode, margin: float = 0.0, epsilon_select: float | None = None,
           rng: np.random.Generator | None = None) -> Selection:
    """Choose from per-case Dice arrays of shape [n_cases, n_candidates, n_labels] (from case_dice).

    global: one candidate for every class, utility = mean over classes of the class mean Dice (all refined).
    adaptive: per class, utility = that class's mean Dice with only it refined. Private: the exponential mechanism
    with sensitivity 1/n_cases; adaptive spends epsilon_select / n_labels per class (basic composition).
    """
    if mode not in MODES:
        raise DPMorphError("mode", mode, f"one of {list(MODES)}")
    sensitivity = 1.0 / alone.shape[0]
    if mode == "global":
        utility = every.mean(axis=0).mean(axis=1)
        index = _choose(utility, margin, epsilon_select, sensitivity, rng)
        cand = candidates[index]
        steps = [Step(label, cand.operation, cand.radius, cand.plane) for label in labels]
        return Selection([s for s in steps if s.operation != "none"], {"all": index}, {"all": utility.tolist()})
    eps = None if epsilon_select is None else epsilon_select / len(labels)
    steps, chosen, utilities = [], {}, {}
    for k, label in enumerate(labels):
        utility = alone[:, :, k].mean(axis=0)
        index = _choose(utility, margin, eps, sensitivity, rng)
        cand = candidates[index]
        chosen[str(label)], utilities[str(label)] = index, utility.tolist()
        if cand.operation != "none":
            steps.append(Step(label, cand.operation, cand.radius, cand.plane))
    return Selection(steps, chosen, utilities)
