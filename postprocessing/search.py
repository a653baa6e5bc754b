"""DP-Morph search (pure numpy): score every candidate refinement on each case, then choose globally or per class.

Dice convention: Dice = 2|P∩R| / (|P|+|R|) over voxels whose reference is not the ignore label, and 1 when both
masks are empty, so that every candidate is scored on the same cases and each case's Dice lies in [0, 1] (the
exponential mechanism's sensitivity 1/n relies on it). nnU-Net's own summary.json instead leaves empty/empty cases
out of its means.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
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
              spacing: Sequence[float] | None = None, slice_axis: int = 0, ignore_label: int | None = None,
              presence: bool = False) -> tuple[np.ndarray, ...]:
    """Dice per (candidate, class) for one case, two ways (arrays of shape [n_candidates, n_labels]).

    alone: only that class refined (what the adaptive mode chooses from; exact for the final map unless two
    classes add the same background voxel); all: every class refined with the candidate and merged by
    refine.combine (what the global mode applies). presence=True adds kept [n_candidates, n_labels] (the class
    still has a voxel in the all-refined map; row 0, "none", is the prediction itself) and in_ref [n_labels] (the
    reference has the class): what the global mode needs to see a candidate that erases a class (select).
    """
    valid = None if ignore_label is None else ref != ignore_label
    alone = np.empty((len(candidates), len(labels)))
    every = np.empty_like(alone)
    kept = np.zeros(alone.shape, dtype=bool)
    refs = {label: ref == label for label in labels}
    own = {label: (seg == 0) | (seg == label) for label in labels}
    for index, masks in _refined_masks(seg, labels, candidates, spacing, slice_axis):
        merged = combine(seg, masks)
        for k, label in enumerate(labels):
            alone[index, k] = dice(masks[label] & own[label], refs[label], valid)
            every[index, k] = dice(merged == label, refs[label], valid)
            kept[index, k] = bool(np.any(merged == label))
    if not presence:
        return alone, every
    return alone, every, kept, np.array([bool(np.any(refs[label])) for label in labels])


def erasures(kept: np.ndarray, in_ref: np.ndarray) -> np.ndarray:
    """[n_candidates, n_labels]: the candidate deletes every voxel of a class that the references contain.

    kept [n_cases, n_candidates, n_labels] and in_ref [n_cases, n_labels] from case_dice(presence=True); candidate 0
    is "none" (the predictions). True where some reference has the class, some prediction has it, and no case keeps
    a voxel of it after the candidate.
    """
    return in_ref.any(axis=0)[None, :] & kept[:, 0, :].any(axis=0)[None, :] & ~kept.any(axis=0)


def _private_global_utility(every: np.ndarray, kept: np.ndarray | None, in_ref: np.ndarray | None) -> np.ndarray:
    """Mean over cases of the case's mean Dice, where a case in which the candidate deletes a class that the case's
    reference and prediction both hold scores 0. Each case's utility stays in [0, 1] and depends on that case only,
    so the sensitivity stays 1/n: a hard exclusion would depend on the validation cases and void epsilon_select."""
    per_case = every.mean(axis=2)
    if kept is not None and in_ref is not None:
        erased = (in_ref[:, None, :] & kept[:, :1, :] & ~kept).any(axis=2)
        per_case = np.where(erased, 0.0, per_case)
    return per_case.mean(axis=0)


@dataclass(frozen=True)
class Selection:
    """The chosen steps and the scores they were chosen on (utilities are mean Dice over the cases)."""

    steps: list[Step]
    chosen: dict[str, int]  # class key ("1", "2", ... or "all") -> candidate index
    utilities: dict[str, list[float]]  # class key -> utility of every candidate
    excluded: list[int] = field(default_factory=list)  # global mode: candidates that erase a class (never chosen)


def _choose(utility: np.ndarray, margin: float, epsilon: float | None, sensitivity: float,
            rng: np.random.Generator | None, excluded: Sequence[int] = ()) -> int:
    """Best candidate if it beats "none" (index 0) by margin; privately: exponential mechanism on u - margin.
    Excluded candidates (never "none") are not chosen by the non-private argmax."""
    if epsilon is None:
        allowed = np.array(utility, dtype=float)
        allowed[list(excluded)] = -np.inf
        best = int(np.argmax(allowed))
        return best if allowed[best] > utility[0] + margin else 0
    penalised = utility - margin * (np.arange(len(utility)) != 0)
    return exponential_mechanism(penalised, epsilon=epsilon, sensitivity=sensitivity, rng=rng)


def _select_global(every: np.ndarray, labels: Sequence[int], candidates: Sequence[Candidate], margin: float,
                   epsilon_select: float | None, rng: np.random.Generator | None,
                   presence: tuple[np.ndarray, np.ndarray] | None) -> Selection:
    """One candidate for every class. Non-private: never one that deletes every voxel of a class that the references
    contain (erasures). Private: such a candidate scores 0 on the cases where it erases a class (see
    _private_global_utility); the choice stays epsilon_select-DP."""
    kept, in_ref = presence if presence is not None else (None, None)
    excluded = [] if kept is None or epsilon_select is not None else [int(i) for i in np.flatnonzero(erasures(kept, in_ref).any(axis=1)) if i != 0]
    if epsilon_select is None:
        utility = every.mean(axis=0).mean(axis=1)
    else:
        utility = _private_global_utility(every, kept, in_ref)
    index = _choose(utility, margin, epsilon_select, 1.0 / every.shape[0], rng, excluded)
    cand = candidates[index]
    steps = [Step(label, cand.operation, cand.radius, cand.plane) for label in labels]
    return Selection([s for s in steps if s.operation != "none"], {"all": index}, {"all": utility.tolist()}, excluded)


def select(alone: np.ndarray, every: np.ndarray, labels: Sequence[int], candidates: Sequence[Candidate], *,
           mode: Mode, margin: float = 0.0, epsilon_select: float | None = None,
           rng: np.random.Generator | None = None,
           presence: tuple[np.ndarray, np.ndarray] | None = None) -> Selection:
    """Choose from per-case Dice arrays of shape [n_cases, n_candidates, n_labels] (from case_dice).

    global: one candidate for every class, utility = mean over classes of the class mean Dice (all refined); with
    presence = (kept [n_cases, n_candidates, n_labels], in_ref [n_cases, n_labels]) from case_dice(presence=True),
    never a candidate that deletes every voxel of a class the references contain (_select_global).
    adaptive: per class, utility = that class's mean Dice with only it refined. Private: the exponential mechanism
    with sensitivity 1/n_cases; adaptive spends epsilon_select / n_labels per class (basic composition).
    """
    if mode not in MODES:
        raise DPMorphError("mode", mode, f"one of {list(MODES)}")
    sensitivity = 1.0 / alone.shape[0]
    if mode == "global":
        return _select_global(every, labels, candidates, margin, epsilon_select, rng, presence)
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
