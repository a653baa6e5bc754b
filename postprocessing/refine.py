"""Class-wise morphological refinement of an integer label map (the function stored in postprocessing.pkl).

Multi-class semantics (docs/dp_morph.md), all classes computed from the same input map:
1. Each class c with a step is refined on its own binary mask (seg == c) with that step's operation, radius and
   plane; classes without a step are left as they are.
2. A voxel of class c that the refinement of c removes ("opened away") becomes background (0).
3. A refinement adds only voxels that were background in the input: closing never takes a voxel from another
   foreground class, even one that its own class removes in the same call.
4. A background voxel that several classes add goes to the class with the smallest label value, whatever the order
   of the steps, so the result does not depend on that order.
The input array is never modified; the output has its shape and dtype.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

import numpy as np
from nnunet_dp.postprocessing.errors import DPMorphError
from nnunet_dp.postprocessing.morphology import RadiusSweep

Operation = Literal["none", "opening", "closing", "opening_closing", "closing_opening"]
Plane = Literal["in_plane", "volumetric"]
OPERATIONS: tuple[Operation, ...] = get_args(Operation)
PLANES: tuple[Plane, ...] = get_args(Plane)


@dataclass(frozen=True)
class Step:
    """The refinement of one class: `operation` with a disk/ball of `radius` (in the units of `spacing`)."""

    label: int
    operation: Operation
    radius: float
    plane: Plane

    def to_kwargs(self) -> dict[str, Any]:
        return asdict(self)


def _check_choice(setting: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise DPMorphError(setting, value, f"one of {list(allowed)}")


def parse_step(step: Mapping[str, Any]) -> Step:
    """Validate one JSON step {label, operation, radius, plane}."""
    if not isinstance(step, Mapping) or set(step) != {"label", "operation", "radius", "plane"}:
        raise DPMorphError("steps[i]", step, "a dict with exactly the keys label, operation, radius, plane")
    label, radius = step["label"], step["radius"]
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or label <= 0:
        raise DPMorphError("label", label, "a foreground label value, an integer > 0")
    number = isinstance(radius, (int, float, np.integer)) and not isinstance(radius, bool)
    if not (number and np.isfinite(radius) and radius > 0):
        raise DPMorphError("radius", radius, "a finite number > 0")
    _check_choice("operation", step["operation"], OPERATIONS)
    _check_choice("plane", step["plane"], PLANES)
    return Step(int(label), step["operation"], float(radius), step["plane"])


def parse_steps(steps: Sequence[Mapping[str, Any]]) -> list[Step]:
    parsed = [parse_step(s) for s in steps]
    labels = [s.label for s in parsed]
    if len(set(labels)) != len(labels):
        raise DPMorphError("steps", labels, "each label at most once")
    return parsed


def slice_axis_for(plane: Plane, slice_axis: int, ndim: int) -> int | None:
    """The axis passed to the morphology: None for volumetric work or a 2D map (in-plane = the whole image)."""
    if plane == "volumetric" or ndim == 2:
        return None
    if not -ndim <= slice_axis < ndim:
        raise DPMorphError("slice_axis", slice_axis, f"an axis of the {ndim}D label map")
    return slice_axis % ndim


def apply_operation(sweep: RadiusSweep, operation: Operation, radius: float) -> np.ndarray:
    """The refined mask, cropped to the image (opening_closing = opening first, then closing)."""
    if operation == "none":
        return sweep.crop(sweep.mask)
    if operation == "opening":
        return sweep.crop(sweep.opened(radius))
    if operation == "closing":
        return sweep.crop(sweep.closed(radius))
    if operation == "opening_closing":
        return sweep.crop(sweep.closed(radius, sweep.opened(radius)))
    return sweep.crop(sweep.opened(radius, sweep.closed(radius)))


def combine(seg: np.ndarray, refined: Mapping[int, np.ndarray]) -> np.ndarray:
    """Merge refined class masks into a copy of seg by rules 2-4 of the module docstring."""
    out = seg.copy()
    background = seg == 0
    claimed = np.zeros(seg.shape, dtype=bool)
    for label in sorted(refined):
        mask = refined[label]
        out[(seg == label) & ~mask] = 0
        added = mask & background & ~claimed
        out[added] = label
        claimed |= added
    return out


def refine_label_map(seg: np.ndarray, steps: Sequence[Mapping[str, Any]], spacing: Sequence[float] | None = None,
                     slice_axis: int = 0) -> np.ndarray:
    """nnU-Net postprocessing function: refine each class of `seg` (2D or 3D label map) by its step.

    steps: [{"label": 1, "operation": "closing", "radius": 2.0, "plane": "volumetric"}, ...]; spacing: voxel
    spacing in the array's axis order (None: radius in voxels); slice_axis: the axis whose slices "in_plane" works on.
    """
    seg = np.asarray(seg)
    if seg.ndim not in (2, 3):
        raise DPMorphError("seg", f"array of shape {seg.shape}", "a 2D or 3D integer label map")
    refined = {}
    for step in parse_steps(steps):
        if step.operation == "none":
            continue
        axis = slice_axis_for(step.plane, slice_axis, seg.ndim)
        sweep = RadiusSweep(seg == step.label, step.radius, spacing, slice_axis=axis)
        refined[step.label] = apply_operation(sweep, step.operation, step.radius)
    return combine(seg, refined)
