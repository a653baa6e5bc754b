"""EDT morphology against scipy.ndimage with an independently built structuring element."""
from __future__ import annotations

import numpy as np
import pytest
from dpmorph_helpers import pad_crop_closing, reference_ball
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from nnunet_dp.postprocessing import morphology as morph
from scipy import ndimage

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def cases(draw, ndim: int | None = None):
    ndim = draw(st.sampled_from([2, 3])) if ndim is None else ndim
    side = 12 if ndim == 2 else 8
    shape = draw(st.tuples(*[st.integers(2, side)] * ndim))
    mask = draw(arrays(bool, shape, elements=st.booleans()))
    spacing = draw(st.one_of(
        st.just((1.0,) * ndim),
        st.tuples(*[st.sampled_from([0.5, 0.8, 1.0, 1.25, 2.0, 3.0])] * ndim),
        st.tuples(*[st.floats(0.3, 3.0)] * ndim)))
    radius = draw(st.floats(0.2, 4.0))
    return mask, spacing, radius


METHOD = st.sampled_from(morph.METHODS)


@SETTINGS
@given(cases(), METHOD)
def test_dilation_and_erosion_equal_scipy(case, method):
    mask, spacing, radius = case
    structure = reference_ball(radius, spacing)
    kw = {"method": method}
    assert np.array_equal(morph.dilation(mask, radius, spacing, **kw), ndimage.binary_dilation(mask, structure))
    assert np.array_equal(morph.erosion(mask, radius, spacing, **kw), ndimage.binary_erosion(mask, structure))


@SETTINGS
@given(cases(), METHOD)
def test_opening_and_closing_equal_scipy(case, method):
    mask, spacing, radius = case
    structure = reference_ball(radius, spacing)
    kw = {"method": method}
    assert np.array_equal(morph.opening(mask, radius, spacing, **kw), ndimage.binary_opening(mask, structure))
    assert np.array_equal(morph.closing(mask, radius, spacing, border="scipy", **kw),
                          ndimage.binary_closing(mask, structure))
    assert np.array_equal(morph.closing(mask, radius, spacing, **kw), pad_crop_closing(mask, structure))


@SETTINGS
@given(cases(ndim=3), st.integers(0, 2), METHOD)
def test_in_plane_equals_scipy_with_a_flat_element(case, slice_axis, method):
    mask, spacing, radius = case
    disk = reference_ball(radius, spacing[:slice_axis] + spacing[slice_axis + 1:])
    flat = np.expand_dims(disk, slice_axis)
    kw = {"slice_axis": slice_axis, "method": method}
    assert np.array_equal(morph.opening(mask, radius, spacing, **kw), ndimage.binary_opening(mask, flat))
    assert np.array_equal(morph.closing(mask, radius, spacing, border="scipy", **kw),
                          ndimage.binary_closing(mask, flat))
    assert np.array_equal(morph.closing(mask, radius, spacing, **kw), pad_crop_closing(mask, flat))


@SETTINGS
@given(cases(), st.lists(st.floats(0.2, 3.0), min_size=1, max_size=3), METHOD)
def test_radius_sweep_equals_composed_public_operations(case, radii, method):
    mask, spacing, _ = case
    sweep = morph.RadiusSweep(mask, max(radii), spacing, method=method)
    for r in radii:
        opened, closed = morph.opening(mask, r, spacing), morph.closing(mask, r, spacing)
        assert np.array_equal(sweep.crop(sweep.opened(r)), opened)
        assert np.array_equal(sweep.crop(sweep.closed(r)), closed)
        assert np.array_equal(sweep.crop(sweep.closed(r, sweep.opened(r))), morph.closing(opened, r, spacing))
        assert np.array_equal(sweep.crop(sweep.opened(r, sweep.closed(r))), morph.opening(closed, r, spacing))


@SETTINGS
@given(st.floats(0.2, 6.0), st.tuples(*[st.floats(0.3, 3.0)] * 3))
def test_threshold_separates_inside_from_outside(radius, spacing):
    threshold = morph.squared_threshold(radius, spacing)
    ball = reference_ball(radius, spacing)
    grid = np.indices(ball.shape).reshape(3, -1).T - np.array(ball.shape) // 2
    norms = ((grid * np.array(spacing)) ** 2).sum(axis=1)
    if threshold is not None:
        assert np.array_equal(norms <= threshold, ball.reshape(-1))
    nonzero = np.argwhere(ball)
    trimmed = ball[tuple(slice(lo, hi + 1) for lo, hi in zip(nonzero.min(0), nonzero.max(0)))]
    assert np.array_equal(morph.ball(radius, spacing), trimmed)


def test_ball_has_the_documented_shape():
    assert morph.ball(1.0, (1.0, 1.0, 1.0)).sum() == 7  # the 6-neighbourhood cross
    assert morph.ball(1.5, (1.0, 1.0)).sum() == 9  # sqrt(2) <= 1.5: the 3x3 square
    assert morph.ball(2.0, (1.0, 2.0)).shape == (5, 3)


def test_tiny_gaps_fall_back_to_scipy_and_stay_exact():
    spacing, radius = (1.0, 1.0000001), 1.00000005  # squared norms 1 (inside) and 1.0000002 (outside)
    assert morph.squared_threshold(radius, spacing) is None
    mask = np.random.default_rng(0).random((9, 9)) < 0.6
    structure = reference_ball(radius, spacing)
    assert np.array_equal(morph.opening(mask, radius, spacing), ndimage.binary_opening(mask, structure))
    assert np.array_equal(morph.closing(mask, radius, spacing), pad_crop_closing(mask, structure))


def test_border_conventions_of_closing_differ_only_near_the_border():
    mask = np.ones((9, 10, 11), dtype=bool)
    mask[4, 5, 5] = False  # a hole in the middle
    ours, scipy_like = morph.closing(mask, 2.0), morph.closing(mask, 2.0, border="scipy")
    assert ours.all()  # extensive: the hole is filled and nothing at the border is removed
    assert np.array_equal(scipy_like, ndimage.binary_closing(mask, reference_ball(2.0, (1.0, 1.0, 1.0))))
    assert not scipy_like[0].all()  # scipy's erosion sees background outside the image
    assert scipy_like[2:-2, 2:-2, 2:-2].all()


@pytest.mark.parametrize("radius", [0, -1.0, float("nan"), float("inf")])
def test_bad_radius_is_rejected(radius):
    with pytest.raises(ValueError, match="radius"):
        morph.opening(np.ones((4, 4), bool), radius)


def test_auto_runs_the_path_the_cost_model_predicts(monkeypatch):
    """auto calls scipy where prefer_scipy says so and one EDT elsewhere (counted), with the same output."""
    calls = {"edt": 0, "scipy": 0}
    edtsq, erode, dilate = morph.edt.edtsq, ndimage.binary_erosion, ndimage.binary_dilation

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(morph.edt, "edtsq", counted("edt", edtsq))
    monkeypatch.setattr(morph.ndimage, "binary_erosion", counted("scipy", erode))
    monkeypatch.setattr(morph.ndimage, "binary_dilation", counted("scipy", dilate))
    rng = np.random.default_rng(3)
    sparse = rng.random((24, 24, 24)) < 0.03
    dense = ndimage.binary_dilation(rng.random((24, 24, 24)) < 0.05, iterations=2)
    for mask in (sparse, dense):
        for radius in (1.0, 2.0, 3.0, 5.0, 8.0):
            for operation, fn, ref in (("erosion", morph.erosion, erode), ("dilation", morph.dilation, dilate)):
                predicted = morph.prefer_scipy(operation, mask, radius, (1.0, 1.0, 1.0))
                calls.update(edt=0, scipy=0)
                out = fn(mask, radius)
                assert calls == ({"edt": 0, "scipy": 1} if predicted else {"edt": 1, "scipy": 0})
                structure = reference_ball(radius, (1.0, 1.0, 1.0))
                kw = {"border_value": 0} if operation == "erosion" else {}
                assert np.array_equal(out, ref(mask, structure, **kw))
    # the model itself: a 7-voxel cross always goes to scipy, the radius-8 ball (2109 voxels) to the EDT for erosion
    assert morph.prefer_scipy("erosion", dense, 1.0, (1.0, 1.0, 1.0))
    assert morph.prefer_scipy("dilation", sparse, 1.0, (1.0, 1.0, 1.0))
    assert not morph.prefer_scipy("erosion", dense, 8.0, (1.0, 1.0, 1.0))
    assert not morph.prefer_scipy("dilation", sparse, 8.0, (1.0, 1.0, 1.0))


def test_radius_sweep_computes_the_first_edt_once_and_only_where_it_pays(monkeypatch):
    calls = []
    edtsq = morph.edt.edtsq
    monkeypatch.setattr(morph.edt, "edtsq", lambda *a, **k: calls.append(1) or edtsq(*a, **k))
    mask = np.random.default_rng(4).random((20, 20, 20)) < 0.03
    sweep = morph.RadiusSweep(mask, 8.0)
    sweep.opened(1.0)  # erosion by a 7-voxel cross: scipy, no EDT
    assert calls == []
    for r in (6.0, 8.0):
        assert np.array_equal(sweep.crop(sweep.opened(r)), morph.opening(mask, r, method="scipy"))
    first = len(calls)
    sweep.opened(7.0)  # the mask's EDT to background is cached: only the dilation may need one more
    assert len(calls) - first <= 1


@pytest.mark.parametrize("method", ["EDT", "fast", None])
def test_bad_method_is_rejected(method):
    with pytest.raises(ValueError, match="method"):
        morph.opening(np.ones((4, 4), bool), 1.0, method=method)
    with pytest.raises(ValueError, match="method"):
        morph.RadiusSweep(np.ones((4, 4), bool), 1.0, method=method)


def test_bad_spacing_is_rejected():
    with pytest.raises(ValueError, match="spacing"):
        morph.closing(np.ones((4, 4), bool), 1.0, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        morph.dilation(np.ones((4, 4), bool), 1.0, (1.0, 0.0))
