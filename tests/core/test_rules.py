"""Each rule against its closed form (docs/how_it_works.md, the trainers table), and ||s g|| <= Delta for every norm."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nnunet_dp.rules import make_rule

C = 1.7
NORMS = [0.0, 1e-12, 1.0, 1e6]


def closed_form(name: str, n: float, const: float | None) -> float:
    if name == "flat":
        return 1.0 if n == 0 else min(1.0, C / n)
    if name == "autos":
        return C / (n + const)
    if name == "nsgd":
        return C / (n + const)
    return C / (n + const / (n + const))


@pytest.mark.parametrize("name,const", [("flat", None), ("autos", 0.01), ("nsgd", 0.3), ("psac", 0.1)])
@pytest.mark.parametrize("n", NORMS)
def test_scale_matches_closed_form(name, const, n):
    kwargs = {"autos": {"autos_gamma": const}, "nsgd": {"nsgd_r": const}, "psac": {"psac_r": const}}.get(name, {})
    rule = make_rule(name, clip_norm=C, **kwargs)
    got = rule.scale(torch.tensor([n], dtype=torch.float64)).item()
    assert math.isclose(got, closed_form(name, n, const), rel_tol=1e-12)
    assert rule.sensitivity == C


def test_known_values():
    # hand-computed: PSAC at ||g||=1, r=0.1, C=1: 1/(1 + 0.1/1.1) = 1.1/1.2
    assert math.isclose(make_rule("psac", clip_norm=1.0, psac_r=0.1).scale(torch.tensor(1.0, dtype=torch.float64)).item(), 1.1 / 1.2)
    assert math.isclose(make_rule("flat", clip_norm=1.0).scale(torch.tensor(4.0, dtype=torch.float64)).item(), 0.25)
    assert math.isclose(make_rule("autos", clip_norm=1.0).scale(torch.tensor(0.0, dtype=torch.float64)).item(), 100.0)


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(["flat", "autos", "nsgd", "psac"]),
       n=st.floats(min_value=0, max_value=1e12, allow_nan=False), c=st.floats(min_value=1e-3, max_value=1e3),
       const=st.floats(min_value=1e-4, max_value=10))
def test_scaled_norm_never_exceeds_sensitivity(name, n, c, const):
    rule = make_rule(name, clip_norm=c, autos_gamma=const, nsgd_r=const, psac_r=const)
    norm = torch.tensor([n], dtype=torch.float64)
    assert (rule.scale(norm) * norm).item() <= rule.sensitivity * (1 + 1e-12)


def test_unknown_rule():
    with pytest.raises(ValueError, match="known rules: flat, autos, nsgd, psac"):
        make_rule("clip", clip_norm=1.0)
