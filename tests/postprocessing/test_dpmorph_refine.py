"""Multi-class semantics of refine_label_map against a voxel-by-voxel reference built on scipy.ndimage."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from dpmorph_helpers import pad_crop_closing, reference_ball
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from nnunet_dp.postprocessing.refine import refine_label_map
from nnunetv2.postprocessing.remove_connected_components import apply_postprocessing
from scipy import ndimage

from nnunet_dp.errors import DPError

OPS = ["none", "opening", "closing", "opening_closing", "closing_opening"]


def scipy_refine(mask: np.ndarray, operation: str, radius: float, spacing, plane: str) -> np.ndarray:
    """One class's refined mask with scipy (closing with the image surrounded by background)."""
    axis = 0 if plane == "in_plane" and mask.ndim == 3 else None
    sp = tuple(spacing) if spacing is not None else (1.0,) * mask.ndim
    structure = reference_ball(radius, sp) if axis is None else np.expand_dims(reference_ball(radius, sp[1:]), 0)
    def opened(m):
        return ndimage.binary_opening(m, structure)

    def closed(m):
        return pad_crop_closing(m, structure)
    return {"none": lambda m: m, "opening": opened, "closing": closed,
            "opening_closing": lambda m: closed(opened(m)), "closing_opening": lambda m: opened(closed(m))}[
        operation](mask)


def reference_refine(seg: np.ndarray, steps: list[dict], spacing) -> np.ndarray:
    """The documented rules, voxel by voxel."""
    refined = {s["label"]: scipy_refine(seg == s["label"], s["operation"], s["radius"], spacing, s["plane"])
               for s in steps}
    out = seg.copy()
    for index in np.ndindex(seg.shape):
        value = seg[index]
        if value != 0 and value in refined and not refined[value][index]:
            out[index] = 0
        elif value == 0:
            adders = sorted(label for label, mask in refined.items() if mask[index])
            out[index] = adders[0] if adders else 0
    return out


@st.composite
def label_maps_and_steps(draw):
    ndim = draw(st.sampled_from([2, 3]))
    shape = draw(st.tuples(*[st.integers(3, 9 if ndim == 3 else 14)] * ndim))
    seg = draw(arrays(np.uint8, shape, elements=st.integers(0, 3)))
    labels = draw(st.lists(st.integers(1, 3), unique=True, max_size=3))
    steps = [{"label": label, "operation": draw(st.sampled_from(OPS)), "radius": draw(st.floats(0.5, 2.5)),
              "plane": draw(st.sampled_from(["in_plane", "volumetric"]))} for label in labels]
    spacing = draw(st.one_of(st.none(), st.tuples(*[st.sampled_from([0.7, 1.0, 1.5])] * ndim)))
    return seg, steps, spacing


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(label_maps_and_steps())
def test_refine_matches_the_documented_rules(case):
    seg, steps, spacing = case
    before = seg.copy()
    out = refine_label_map(seg, steps, list(spacing) if spacing else None, 0)
    assert np.array_equal(seg, before)  # the input is never modified
    assert out.dtype == seg.dtype and out.shape == seg.shape
    assert np.array_equal(out, reference_refine(seg, steps, spacing))
    assert np.array_equal(out, refine_label_map(seg, steps[::-1], list(spacing) if spacing else None, 0))


def test_closing_never_takes_a_voxel_of_another_class():
    seg = np.zeros((7, 7), dtype=np.uint8)
    seg[1:6, 1:6] = 1
    seg[3, 3] = 2  # class 2 inside class 1's square: closing of class 1 must not take it
    seg[3, 1] = 0  # a notch that closing fills
    out = refine_label_map(seg, [{"label": 1, "operation": "closing", "radius": 1.5, "plane": "volumetric"}])
    assert out[3, 3] == 2 and out[3, 1] == 1


def test_opened_away_voxels_become_background_and_ties_go_to_the_smaller_label():
    seg = np.zeros((7, 9), dtype=np.int16)
    seg[2, 1] = seg[2, 3] = 3
    seg[1, 2] = seg[3, 2] = 1  # closing (3x3 square) of class 1 and of class 3 both add (2, 2): class 1 wins
    seg[5, 7] = 2  # an isolated voxel of class 2: opening removes it
    steps = [{"label": 3, "operation": "closing", "radius": 1.5, "plane": "in_plane"},
             {"label": 2, "operation": "opening", "radius": 1.0, "plane": "in_plane"},
             {"label": 1, "operation": "closing", "radius": 1.5, "plane": "in_plane"}]
    alone = [refine_label_map(seg, [s]) for s in (steps[0], steps[2])]
    assert alone[0][2, 2] == 3 and alone[1][2, 2] == 1  # each closing alone adds the voxel
    out = refine_label_map(seg, steps)
    assert out[2, 2] == 1
    assert out[5, 7] == 0


def test_the_pickled_function_runs_unchanged_in_nnunet_apply_postprocessing():
    seg = np.random.default_rng(3).integers(0, 3, size=(6, 10, 10)).astype(np.uint8)
    kwargs = json.loads(json.dumps({"steps": [{"label": 1, "operation": "opening_closing", "radius": 1.5,
                                               "plane": "volumetric"},
                                              {"label": 2, "operation": "closing", "radius": 2.0, "plane": "in_plane"}],
                                    "spacing": [2.0, 1.0, 1.0], "slice_axis": 0}))
    fns, kws = pickle.loads(pickle.dumps(([refine_label_map], [kwargs])))
    assert b"nnunet_dp.postprocessing.refine" in pickle.dumps(refine_label_map)
    assert np.array_equal(apply_postprocessing(seg, fns, kws), refine_label_map(seg, **kwargs))
    assert np.array_equal(apply_postprocessing(seg, fns, kws), reference_refine(seg, kwargs["steps"], (2.0, 1.0, 1.0)))


@pytest.mark.parametrize("step, what", [
    ({"label": 1, "operation": "dilate", "radius": 1.0, "plane": "volumetric"}, "operation"),
    ({"label": 1, "operation": "opening", "radius": 0.0, "plane": "volumetric"}, "radius"),
    ({"label": 1, "operation": "opening", "radius": -2, "plane": "volumetric"}, "radius"),
    ({"label": 0, "operation": "opening", "radius": 1.0, "plane": "volumetric"}, "label"),
    ({"label": 1, "operation": "opening", "radius": 1.0, "plane": "axial"}, "plane"),
    ({"label": 1, "operation": "opening", "radius": 1.0}, "steps"),
])
def test_bad_steps_name_the_setting(step, what):
    with pytest.raises(DPError, match=what):
        refine_label_map(np.zeros((4, 4), np.uint8), [step])


def test_duplicate_labels_are_rejected():
    step = {"label": 1, "operation": "opening", "radius": 1.0, "plane": "volumetric"}
    with pytest.raises(DPError, match="each label at most once"):
        refine_label_map(np.zeros((4, 4), np.uint8), [step, step])
