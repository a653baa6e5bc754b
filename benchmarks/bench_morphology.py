"""DP-Morph's opening/closing (method auto, and forced EDT) against scipy.ndimage.binary_opening/closing, side by side.

    python benchmarks/bench_morphology.py            # 160^3 volume, 30 % and 3 % foreground, radii 1 2 3 4 6 8
    python benchmarks/bench_morphology.py --quick    # 40^3 smoke test (CI runs only this, never as a timing test)
    python benchmarks/bench_morphology.py --calibrate   # refit morphology.SCIPY_VS_EDT (prints the table to paste)

For each volume and radius it prints scipy's time, the EDT path's, auto's (morphology's default: the path chosen per
call by the cost model), auto / min(scipy, EDT) and whether all outputs are identical. Each time is the best of
--repeats calls. Opening is compared with scipy's default call. Closing is compared with scipy's default call through
border="scipy"; our default closing (border="background", the image surrounded by background) differs from it only
near the image border, where scipy's erosion removes foreground: the benchmark counts those voxels and checks they all
lie within the radius of the border.
"""
from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
from nnunet_dp.postprocessing import morphology
from scipy import ndimage


def test_volume(side: int, seed: int, foreground: float = 0.3, ndim: int = 3, flips: float = 0.01) -> np.ndarray:
    """Smooth random blobs (the given share of foreground) with salt-and-pepper noise: holes, speckle, thin parts."""
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.standard_normal((side,) * ndim).astype(np.float32), sigma=side / 24)
    mask = smooth > np.quantile(smooth, 1 - foreground)
    flip = rng.random(mask.shape) < flips
    return mask ^ flip


REPEATS = 1


def timed(fn: Callable[[], np.ndarray]) -> tuple[np.ndarray, float]:
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best


def border_band(shape: Sequence[int], width: int) -> np.ndarray:
    inner = np.zeros(shape, dtype=bool)
    inner[tuple(slice(width, n - width) for n in shape)] = True
    return ~inner


def compare(mask: np.ndarray, radius: float) -> list[str]:
    ball = morphology.ball(radius, (1.0,) * mask.ndim)
    ref_open, t_ref_open = timed(lambda: ndimage.binary_opening(mask, ball))
    edt_open, t_edt_open = timed(lambda: morphology.opening(mask, radius, method="edt"))
    our_open, t_our_open = timed(lambda: morphology.opening(mask, radius))
    ref_close, t_ref_close = timed(lambda: ndimage.binary_closing(mask, ball))
    edt_close, t_edt_close = timed(lambda: morphology.closing(mask, radius, border="scipy", method="edt"))
    our_close, t_our_close = timed(lambda: morphology.closing(mask, radius, border="scipy"))
    default_close = morphology.closing(mask, radius)
    differ = default_close != ref_close
    extent = max(morphology.ball_extent(radius, (1.0,) * mask.ndim))
    in_band = bool(np.all(border_band(mask.shape, extent)[differ]))
    extensive = bool(np.all(default_close[mask]))
    rows = []
    for name, t_ref, t_edt, t_our, same in (
            ("opening", t_ref_open, t_edt_open, t_our_open,
             np.array_equal(our_open, ref_open) and np.array_equal(edt_open, ref_open)),
            ("closing", t_ref_close, t_edt_close, t_our_close,
             np.array_equal(our_close, ref_close) and np.array_equal(edt_close, ref_close))):
        rows.append(f"{name:8s} r={radius:<4g} scipy {t_ref:8.3f} s   EDT {t_edt:7.3f} s   auto {t_our:7.3f} s   "
                    f"auto/min {t_our / min(t_ref, t_edt):5.2f}   scipy/auto {t_ref / t_our:6.1f}   "
                    f"identical: {'yes' if same else 'NO'}")
    rows.append(f"         r={radius:<4g} default closing (border='background') differs from scipy's in "
                f"{int(differ.sum())} voxels; all within the radius of the border: {'yes' if in_band else 'NO'}; "
                f"contains the mask: {'yes' if extensive else 'NO'}")
    return rows


def calibrate(seed: int) -> None:
    """Time scipy's erosion/dilation against one EDT over sizes, densities and radii; fit and print SCIPY_VS_EDT."""
    rows: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    where: dict[tuple[str, int], list[str]] = {}
    for ndim, side in ((3, 80), (3, 128), (2, 96), (2, 384)):
        for fg, flips in itertools.product((0.03, 0.1, 0.3, 0.6, 0.9), (0.0, 0.005)):
            # solid blobs (what a closing's erosion and an opening's dilation see) and speckled ones (raw predictions)
            mask = test_volume(side, seed, foreground=fg, ndim=ndim, flips=flips)
            sp = (1.0,) * ndim
            t_edt = {op: timed(partial(morphology.squared_edt, mask, sp, to=to))[1]
                     for op, to in (("erosion", "background"), ("dilation", "foreground"))}
            share = float(mask.mean())
            for radius in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8):
                ball = morphology.ball(radius, sp)
                for op, fn, kw in (("erosion", ndimage.binary_erosion, {"border_value": 0}),
                                   ("dilation", ndimage.binary_dilation, {})):
                    t_scipy = timed(partial(fn, mask, ball, **kw))[1]
                    examined = share if op == "erosion" else 1 - share
                    rows.setdefault((op, ndim), []).append((examined, float(ball.sum()), t_scipy / t_edt[op]))
                    where.setdefault((op, ndim), []).append(f"{side}^{ndim} fg {share:.0%} r={radius:g}: scipy "
                                                            f"{t_scipy * 1e3:.1f} ms, EDT {t_edt[op] * 1e3:.1f} ms")
            print(f"timed {ndim}D {side}, foreground {share:.1%}, salt-and-pepper {flips:.1%}", flush=True)
    print("SCIPY_VS_EDT = {  # (c0, c_f, c_B) of log(t_scipy / t_edt)")
    worst: list[str] = []
    for (op, ndim), data in sorted(rows.items()):
        f, size, ratio = (np.array(col) for col in zip(*data))
        design = np.c_[np.ones_like(f), np.log(f), np.log(size)]
        coef = np.linalg.lstsq(design, np.log(ratio), rcond=None)[0]
        chosen = np.where(design @ coef < 0, ratio, 1.0) / np.minimum(ratio, 1.0)
        print(f'    ("{op}", {ndim}): ({coef[0]:.3f}, {coef[1]:.3f}, {coef[2]:.3f}),  # {len(ratio)} pairs; '
              f"chosen/min: mean {chosen.mean():.3f}, worst {chosen.max():.2f}")
        worst.extend(f"  {op} {where[(op, ndim)][i]}: chosen/min {chosen[i]:.2f}" for i in np.argsort(chosen)[-2:])
    print("}\nworst choices:\n" + "\n".join(worst))


def main(argv: Sequence[str] | None = None) -> int:
    global REPEATS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 40^3 volume (smoke test)")
    parser.add_argument("--side", type=int, default=160, help="edge length of the cubic volume. Default: 160")
    parser.add_argument("--foreground", type=float, nargs="+", default=[0.3, 0.03],
                        help="foreground shares of the test volumes. Default: 0.3 0.03")
    parser.add_argument("--radii", type=float, nargs="+", default=[1.0, 2.0, 3.0, 4.0, 6.0, 8.0],
                        help="Default: 1 2 3 4 6 8")
    parser.add_argument("--repeats", type=int, default=3, help="each time is the best of this many calls. Default: 3")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calibrate", action="store_true", help="refit the auto path's cost model instead")
    args = parser.parse_args(argv)
    REPEATS = 1 if args.quick else args.repeats
    if args.calibrate:
        calibrate(args.seed + 1)
        return 0
    side = 40 if args.quick else args.side
    ok = True
    for foreground in args.foreground:
        mask = test_volume(side, args.seed, foreground=foreground)
        print(f"volume {side}^3, {mask.mean():.1%} foreground, ball {{x : |x| <= r}} (voxel units), single thread")
        for radius in args.radii:
            for row in compare(mask, radius):
                print(row, flush=True)
                ok &= "NO" not in row
    print("all outputs identical / as documented: " + ("yes" if ok else "NO"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
