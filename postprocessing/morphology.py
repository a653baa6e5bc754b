"""Binary dilation, erosion, opening and closing by Euclidean distance transforms (EDT).

Structuring element (a disk in 2D, a ball in 3D) of radius r for voxel spacing s:
    B(r, s) = {x in Z^d : sum_i (x_i s_i)^2 <= r^2 (1 + TIE_TOLERANCE)}
(ties count as inside; the tiny tolerance only absorbs floating-point rounding). `ball` builds it explicitly.

With d(p, A) = min_{q in A} ||(p - q) s|| (the anisotropic EDT):
    dilation(M) = {p : d(p, M) <= r}                      outside the image holds no foreground
    erosion(M)  = {p : d(p, complement of M) > r}          outside the image is background
These are exactly scipy.ndimage.binary_dilation / binary_erosion with structure=B(r, s) and border_value=0, and the
cost of one EDT does not depend on r. The EDT (package `edt`, float32 squared distances) is compared with a
threshold placed halfway between the largest squared norm inside B and the smallest outside it, so float32 rounding
cannot move a voxel across the boundary; when those two values are too close for float32, the operation falls back
to scipy.ndimage with the explicit B (still exact, only slower).

Boundary convention (see docs/dp_morph.md):
- opening: identical to scipy.ndimage.binary_opening(mask, B) (its default border_value=0).
- closing, border="background" (default): the image is taken as surrounded by background, so closing never removes
  foreground (closing(M) contains M). Equal to scipy.ndimage.binary_closing on the mask zero-padded by the radius,
  then cropped.
- closing, border="scipy": scipy.ndimage.binary_closing(mask, B) itself. Its erosion sees background outside the
  image, so it removes foreground within r of the image border (closing(M) need not contain M).

In-plane operation (slice_axis=k): each slice along axis k is processed on its own with the 2D disk of the in-plane
spacing, which equals scipy with a structuring element of extent 1 along axis k.

Which path runs (method="auto", the default) is chosen per call, by cost; both give the same output. One EDT costs the
same at every radius; scipy.ndimage tests the structuring element at every voxel it must examine in full (foreground
voxels for an erosion, background voxels for a dilation), so it wins for small elements and loses for large ones.
`prefer_scipy` predicts log(t_scipy / t_edt) = c0 + c_f log f + c_B log |B| (f: the share of voxels scipy examines in
full, |B|: the element's voxel count), with coefficients fitted per (operation, element dimension) by
`python benchmarks/bench_morphology.py --calibrate`. method="edt" or "scipy" forces a path (tests, benchmarks).
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Literal

import edt
import numpy as np
from scipy import ndimage

Border = Literal["background", "scipy"]
Method = Literal["auto", "edt", "scipy"]
METHODS = ("auto", "edt", "scipy")
TIE_TOLERANCE = 1e-9
# Bound on the relative error of edt's float32 squared distances (about 80 float32 ulps; actual error is a few ulps).
_EDT_RELATIVE_ERROR = 1e-5


# (c0, c_f, c_B) of log(t_scipy / t_edt) per (operation, element dimension). Fitted with
# `python benchmarks/bench_morphology.py --calibrate --repeats 2` (2026-11-28, 2-core machine, one thread, beside a
# training: 2D 96^2 and 384^2, 3D 80^3 and 128^3, foreground 3-90 %, solid and speckled, radius 1-8; 180 timed pairs
# each). A wrong prediction costs speed only, never exactness.
SCIPY_VS_EDT: dict[tuple[str, int], tuple[float, float, float]] = {
    ("erosion", 2): (-1.388, 0.271, 0.483),
    ("erosion", 3): (-2.396, 0.339, 0.499),
    ("dilation", 2): (-1.746, 0.280, 0.577),
    ("dilation", 3): (-2.606, 0.614, 0.601),
}


def _spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    values = (1.0,) * ndim if spacing is None else tuple(float(v) for v in spacing)
    if len(values) != ndim or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing {spacing!r} must hold {ndim} finite values > 0 (one per array axis)")
    return values


def _check_radius(radius: float) -> float:
    if not (np.isfinite(radius) and radius > 0):
        raise ValueError(f"radius {radius!r} is not allowed: it must be a finite number > 0")
    return float(radius)


def _squared_norms(extent: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """sum_i (x_i s_i)^2 on the integer grid |x_i| <= extent_i (the one formula used for B and its threshold)."""
    axes = [(np.arange(-e, e + 1, dtype=np.float64) * s) ** 2 for e, s in zip(extent, spacing)]
    return sum(np.meshgrid(*axes, indexing="ij", sparse=True))


def ball_extent(radius: float, spacing: Sequence[float]) -> tuple[int, ...]:
    """Half-width of B(radius, spacing) along each axis (the padding a closing needs)."""
    limit = np.sqrt(radius**2 * (1 + TIE_TOLERANCE))
    return tuple(int(np.floor(limit / s)) for s in spacing)


def ball(radius: float, spacing: Sequence[float] | None = None, ndim: int = 3) -> np.ndarray:
    """The structuring element B(radius, spacing) as a boolean array of odd shape (2D disk or 3D ball)."""
    radius = _check_radius(radius)
    sp = _spacing(spacing, ndim if spacing is None else len(spacing))
    return _squared_norms(ball_extent(radius, sp), sp) <= radius**2 * (1 + TIE_TOLERANCE)


@lru_cache(maxsize=1024)
def squared_threshold(radius: float, spacing: tuple[float, ...]) -> float | None:
    """t with (q <= t) == (offset of squared norm q lies in B) for every attainable q, robust to float32 EDT error.

    Every EDT value is the squared norm of an integer offset. The smallest one outside B lies in the grid
    |x_i| <= extent_i + 1 (shrinking a component that alone exceeds r keeps the offset outside). None: the gap
    between the inside and outside values is below the EDT's float32 accuracy (use the explicit B instead).
    """
    limit = radius**2 * (1 + TIE_TOLERANCE)
    norms = _squared_norms([e + 1 for e in ball_extent(radius, spacing)], spacing)
    inside, outside = float(norms[norms <= limit].max()), float(norms[norms > limit].min())
    if outside - inside <= 2 * _EDT_RELATIVE_ERROR * outside:
        return None
    return (inside + outside) / 2


@lru_cache(maxsize=1024)
def element_size(radius: float, spacing: tuple[float, ...]) -> int:
    """|B(radius, spacing)|: the number of voxels in the structuring element."""
    return int(ball(radius, spacing).sum())


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not allowed: use one of {list(METHODS)}")


def prefer_scipy(operation: Literal["erosion", "dilation"], mask: np.ndarray, radius: float,
                 plane_spacing: tuple[float, ...]) -> bool:
    """True where scipy.ndimage is predicted faster than one EDT for this operation on this mask (SCIPY_VS_EDT)."""
    share = float(np.count_nonzero(mask)) / max(mask.size, 1)
    examined = share if operation == "erosion" else 1.0 - share
    if examined == 0.0:  # nothing to examine in full: scipy's early exits make it O(voxels) with a tiny constant
        return True
    c0, c_f, c_b = SCIPY_VS_EDT[(operation, min(max(len(plane_spacing), 2), 3))]
    return c0 + c_f * np.log(examined) + c_b * np.log(element_size(radius, plane_spacing)) < 0.0


def _use_scipy(operation: Literal["erosion", "dilation"], mask: np.ndarray, radius: float, plane: tuple[float, ...],
               method: str, precomputed: np.ndarray | None) -> bool:
    """scipy when forced, when float32 EDT thresholds cannot be exact, or (auto, no EDT at hand) when predicted faster."""
    _check_method(method)
    if method == "scipy" or squared_threshold(radius, plane) is None:
        return True
    if method == "edt" or precomputed is not None:
        return False
    return prefer_scipy(operation, mask, radius, plane)


def _plane_spacing(spacing: tuple[float, ...], slice_axis: int | None) -> tuple[float, ...]:
    return spacing if slice_axis is None else spacing[:slice_axis] + spacing[slice_axis + 1:]


def squared_edt(mask: np.ndarray, spacing: tuple[float, ...], *, to: Literal["foreground", "background"],
                slice_axis: int | None = None) -> np.ndarray:
    """Squared distance (float32) from each voxel to the nearest foreground / background voxel.

    Distances to background count the voxels just outside the image as background (edt's black_border); distances
    to foreground see none outside. With slice_axis, each slice along that axis is transformed on its own.
    """
    source = ~mask if to == "foreground" else mask
    black_border = to == "background"
    if slice_axis is None:
        return edt.edtsq(np.ascontiguousarray(source), anisotropy=spacing, black_border=black_border, parallel=1)
    moved = np.moveaxis(source, slice_axis, 0)
    plane = _plane_spacing(spacing, slice_axis)
    anisotropy = plane[0] if len(plane) == 1 else plane
    out = np.empty(moved.shape, dtype=np.float32)
    for k in range(moved.shape[0]):
        out[k] = edt.edtsq(np.ascontiguousarray(moved[k]), anisotropy=anisotropy, black_border=black_border,
                           parallel=1)
    return np.moveaxis(out, 0, slice_axis)


def structuring_element(radius: float, spacing: tuple[float, ...], slice_axis: int | None) -> np.ndarray:
    """B for the whole array (volumetric) or the in-plane disk with extent 1 along slice_axis."""
    element = ball(radius, _plane_spacing(spacing, slice_axis))
    return element if slice_axis is None else np.expand_dims(element, slice_axis)


def dilation(mask: np.ndarray, radius: float, spacing: Sequence[float] | None = None, *,
             slice_axis: int | None = None, sq_to_foreground: np.ndarray | None = None,
             method: Method = "auto") -> np.ndarray:
    """scipy.ndimage.binary_dilation(mask, B), by EDT or scipy (method); sq_to_foreground may pass a precomputed
    squared_edt (then the EDT path is used unless method="scipy")."""
    mask, sp = np.asarray(mask, dtype=bool), _spacing(spacing, np.ndim(mask))
    radius, plane = _check_radius(radius), _plane_spacing(sp, slice_axis)
    if _use_scipy("dilation", mask, radius, plane, method, sq_to_foreground):
        return ndimage.binary_dilation(mask, structuring_element(radius, sp, slice_axis))
    if sq_to_foreground is None:
        sq_to_foreground = squared_edt(mask, sp, to="foreground", slice_axis=slice_axis)
    return sq_to_foreground <= squared_threshold(radius, plane)


def erosion(mask: np.ndarray, radius: float, spacing: Sequence[float] | None = None, *,
            slice_axis: int | None = None, sq_to_background: np.ndarray | None = None,
            method: Method = "auto") -> np.ndarray:
    """scipy.ndimage.binary_erosion(mask, B) (border_value=0), by EDT or scipy (method); sq_to_background may be
    precomputed (then the EDT path is used unless method="scipy")."""
    mask, sp = np.asarray(mask, dtype=bool), _spacing(spacing, np.ndim(mask))
    radius, plane = _check_radius(radius), _plane_spacing(sp, slice_axis)
    if _use_scipy("erosion", mask, radius, plane, method, sq_to_background):
        return ndimage.binary_erosion(mask, structuring_element(radius, sp, slice_axis), border_value=0)
    if sq_to_background is None:
        sq_to_background = squared_edt(mask, sp, to="background", slice_axis=slice_axis)
    return sq_to_background > squared_threshold(radius, plane)


def opening(mask: np.ndarray, radius: float, spacing: Sequence[float] | None = None, *,
            slice_axis: int | None = None, method: Method = "auto") -> np.ndarray:
    """Erosion then dilation; identical to scipy.ndimage.binary_opening(mask, B)."""
    eroded = erosion(mask, radius, spacing, slice_axis=slice_axis, method=method)
    return dilation(eroded, radius, spacing, slice_axis=slice_axis, method=method)


def closing_pad_width(radius: float, spacing: Sequence[float], slice_axis: int | None) -> list[tuple[int, int]]:
    """Zero padding that makes a closing see the image as surrounded by background (none along slice_axis)."""
    extent = list(ball_extent(radius, _plane_spacing(tuple(spacing), slice_axis)))
    if slice_axis is not None:
        extent.insert(slice_axis, 0)
    return [(e, e) for e in extent]


def closing(mask: np.ndarray, radius: float, spacing: Sequence[float] | None = None, *,
            slice_axis: int | None = None, border: Border = "background", method: Method = "auto") -> np.ndarray:
    """Dilation then erosion. border="background": extensive (pads, closes, crops); "scipy": binary_closing's own."""
    mask, sp = np.asarray(mask, dtype=bool), _spacing(spacing, np.ndim(mask))
    if border not in ("background", "scipy"):
        raise ValueError(f"border {border!r} is not allowed: use 'background' or 'scipy'")
    pad = closing_pad_width(_check_radius(radius), sp, slice_axis) if border == "background" else None
    work = np.pad(mask, pad) if pad else mask
    kw = {"slice_axis": slice_axis, "method": method}
    closed = erosion(dilation(work, radius, sp, **kw), radius, sp, **kw)
    return closed[tuple(slice(lo, n - hi) for (lo, hi), n in zip(pad, closed.shape))] if pad else closed


class RadiusSweep:
    """Opening and closing of one mask at many radii (border="background"), reusing the first EDT of each.

    The mask is zero-padded once for the largest radius; results are padded arrays until `crop`. A closing result
    is cleared outside the image before it is used again, so composed operations equal the composition of the
    public `opening` / `closing` (each maps an image to an image of the same shape). With method="auto" the first
    operation of a radius takes the mask's EDT when it has been computed already (free) or when it is predicted faster
    than scipy; otherwise scipy.
    """

    def __init__(self, mask: np.ndarray, max_radius: float, spacing: Sequence[float] | None = None, *,
                 slice_axis: int | None = None, method: Method = "auto") -> None:
        mask = np.asarray(mask, dtype=bool)
        _check_method(method)
        self.spacing, self.slice_axis, self.method = _spacing(spacing, mask.ndim), slice_axis, method
        pad = closing_pad_width(_check_radius(max_radius), self.spacing, slice_axis)
        self.inner = tuple(slice(lo, lo + n) for (lo, _), n in zip(pad, mask.shape))
        self.mask = np.pad(mask, pad)
        self._sq: dict[str, np.ndarray] = {}
        self._cache: dict[tuple[str, float], np.ndarray] = {}

    def _first_edt(self, to: Literal["foreground", "background"], radius: float) -> np.ndarray | None:
        """The mask's EDT for the first operation at this radius: cached, computed where predicted faster than scipy,
        or None (scipy runs it)."""
        if to not in self._sq:
            operation = "erosion" if to == "background" else "dilation"
            plane = _plane_spacing(self.spacing, self.slice_axis)
            if _use_scipy(operation, self.mask, radius, plane, self.method, None):
                return None
            self._sq[to] = squared_edt(self.mask, self.spacing, to=to, slice_axis=self.slice_axis)
        return self._sq[to]

    def _clear_outside(self, padded: np.ndarray) -> np.ndarray:
        cleared = np.zeros_like(padded)
        cleared[self.inner] = padded[self.inner]
        return cleared

    def opened(self, radius: float, padded: np.ndarray | None = None) -> np.ndarray:
        """Opening of the mask (reusing its EDT, cached per radius) or of another padded result."""
        kw = {"slice_axis": self.slice_axis, "method": self.method}
        if padded is not None:
            return dilation(erosion(padded, radius, self.spacing, **kw), radius, self.spacing, **kw)
        if ("opening", radius) not in self._cache:
            first = self._first_edt("background", radius)
            eroded = erosion(self.mask, radius, self.spacing, sq_to_background=first, **kw)
            self._cache[("opening", radius)] = dilation(eroded, radius, self.spacing, **kw)
        return self._cache[("opening", radius)]

    def closed(self, radius: float, padded: np.ndarray | None = None) -> np.ndarray:
        """Closing of the mask (reusing its EDT, cached per radius) or of another padded result; cleared outside
        the image."""
        kw = {"slice_axis": self.slice_axis, "method": self.method}
        if padded is not None:
            dilated = dilation(padded, radius, self.spacing, **kw)
            return self._clear_outside(erosion(dilated, radius, self.spacing, **kw))
        if ("closing", radius) not in self._cache:
            first = self._first_edt("foreground", radius)
            dilated = dilation(self.mask, radius, self.spacing, sq_to_foreground=first, **kw)
            self._cache[("closing", radius)] = self._clear_outside(erosion(dilated, radius, self.spacing, **kw))
        return self._cache[("closing", radius)]

    def crop(self, padded: np.ndarray) -> np.ndarray:
        return padded[self.inner]
