"""The utility-vs-N law (nnunet_dp.law): the fit recovers a known curve, the interval covers its share of the cells,
and the inversions (s for a ratio, N for a ratio) are the closed forms."""
import math

import numpy as np
import pytest

from nnunet_dp import law


def test_signal_to_noise_closed_form():
    assert law.signal_to_noise(num_cases=150, epsilon=8, dimensions=10_000, delta=1e-5) == pytest.approx(
        150 * 8 / math.sqrt(10_000 * math.log(1e5)))
    with pytest.raises(ValueError):
        law.signal_to_noise(num_cases=150, epsilon=8, dimensions=0, delta=1e-5)


def test_fit_recovers_a_known_curve_and_covers_its_share():
    rng = np.random.default_rng(0)
    s = np.exp(rng.uniform(-2, 4, 60))
    true = law.Law("scratch", slope=1.7, midpoint=1.2, floor=0.0, half_width=0, num_cells=0, source="")
    r = np.array([true.mean(x) for x in s]) + rng.normal(0, 0.03, s.size)
    fitted = law.fit(list(zip(s, r)), start="scratch", source="test")
    assert fitted.slope == pytest.approx(1.7, rel=0.15) and fitted.midpoint == pytest.approx(1.2, abs=0.15)
    inside = [lo <= y <= hi for x, y in zip(s, np.clip(r, 0, 1)) for lo, hi in [fitted.interval(x)]]
    assert np.mean(inside) >= law.COVERAGE - 0.02
    assert 0.03 < fitted.half_width < 0.08  # the noise's 80 % quantile of |N(0, 0.03)| is 0.038


def test_inversions_are_closed_forms(tmp_path):
    curve = law.Law("public", slope=2.0, midpoint=0.5, floor=0.4, half_width=0.1, num_cells=9, source="x")
    s = curve.s_for(0.7)
    assert curve.mean(s) == pytest.approx(0.7)
    assert curve.s_for(0.3) is None and curve.s_for(1.0) is None
    n = law.cases_for(curve, 0.7, epsilon=8, dimensions=1000, delta=1e-5)
    assert n == math.ceil(s * math.sqrt(1000 * math.log(1e5)) / 8)
    law.save([curve], str(tmp_path / "cal.json"))
    assert law.load(str(tmp_path / "cal.json")) == {"public": curve}
    assert law.load(str(tmp_path / "none.json")) == {}
