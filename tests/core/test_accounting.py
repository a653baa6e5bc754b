"""Accounting against opacus's own numbers; ledger round trip; errors on missing or mixed ledgers."""
import pytest
from opacus.accountants import RDPAccountant

from nnunet_dp.accounting import PrivacyLedger, calibrate_noise, epsilon_for, epsilon_of, max_steps_within
from nnunet_dp.errors import DPLedgerError


def test_rdp_epsilon_matches_opacus_value():
    eps = epsilon_for(noise_multiplier=1.5, sampling_rate=0.04, steps=2250, delta=1e-5)
    assert eps == pytest.approx(7.329, abs=5e-4)
    acc = RDPAccountant()
    for _ in range(2250):
        acc.step(noise_multiplier=1.5, sample_rate=0.04)
    assert eps == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-12)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize("target", [1.0, 8.0])
def test_calibrated_sigma_meets_target(accountant, target):
    sigma = calibrate_noise(target_epsilon=target, delta=1e-5, sampling_rate=0.05, steps=500, accountant=accountant)
    eps = epsilon_for(noise_multiplier=sigma, sampling_rate=0.05, steps=500, delta=1e-5, accountant=accountant)
    assert eps <= target
    assert eps > target - 0.05 * target  # not wastefully over-noised


def test_max_steps_is_the_last_step_within_budget():
    m = max_steps_within(target_epsilon=3.0, noise_multiplier=1.0, sampling_rate=0.1, delta=1e-5)
    assert epsilon_for(noise_multiplier=1.0, sampling_rate=0.1, steps=m, delta=1e-5) <= 3.0
    assert epsilon_for(noise_multiplier=1.0, sampling_rate=0.1, steps=m + 1, delta=1e-5) > 3.0


def test_ledger_round_trip_equals_uninterrupted():
    straight = PrivacyLedger(accountant="rdp", delta=1e-5)
    first = PrivacyLedger(accountant="rdp", delta=1e-5)
    for _ in range(30):
        straight.step(noise_multiplier=1.1, sampling_rate=0.2)
    for _ in range(12):
        first.step(noise_multiplier=1.1, sampling_rate=0.2)
    resumed = PrivacyLedger.from_state_dict(first.state_dict(), accountant="rdp", delta=1e-5)
    for _ in range(18):
        resumed.step(noise_multiplier=1.1, sampling_rate=0.2)
    assert resumed.steps == 30 and resumed.epsilon() == straight.epsilon()


def test_missing_or_mismatched_ledger_is_an_error():
    with pytest.raises(DPLedgerError, match="no privacy ledger"):
        PrivacyLedger.from_state_dict(None, accountant="rdp", delta=1e-5)
    state = PrivacyLedger(accountant="rdp", delta=1e-5).state_dict()
    with pytest.raises(DPLedgerError, match="accountant"):
        PrivacyLedger.from_state_dict(state, accountant="prv", delta=1e-5)


@pytest.mark.parametrize("sigma", [0.7, 1.0, 2.0])
@pytest.mark.parametrize("q,steps", [(0.01, 100), (0.1, 50), (0.3, 20)])
def test_every_offered_accountant_reports_at_least_prvs_upper_bound(sigma, q, steps):
    """Only upper bounds are offered (docs/invariants.md, invariant 6): each accountant's epsilon >= opacus PRV's eps_upper."""
    from opacus.accountants import PRVAccountant

    from nnunet_dp.config import ACCOUNTANTS
    prv = PRVAccountant()
    prv.history = [(sigma, q, steps)]
    dprv = prv._get_dprv(eps_error=0.01, delta_error=1e-8)
    _, _, upper = dprv.compute_epsilon(1e-5, 1e-8, 0.01)  # PRV's (lower, estimate, upper): the upper bound
    for name in ACCOUNTANTS:
        assert epsilon_for(noise_multiplier=sigma, sampling_rate=q, steps=steps, delta=1e-5,
                           accountant=name) >= upper - 1e-9, name


def test_gdp_is_not_offered_and_under_reports():
    """The issue's measurement: GDP 4.01 < PRV 5.16 < RDP 5.88 at delta 1e-5, sigma 1, q 0.1, 50 steps."""
    from opacus.accountants import GaussianAccountant

    from nnunet_dp.config import ACCOUNTANTS, DPConfig
    from nnunet_dp.errors import DPConfigError
    gdp = GaussianAccountant()
    gdp.history = [(1.0, 0.1, 50)]
    prv = epsilon_for(noise_multiplier=1.0, sampling_rate=0.1, steps=50, delta=1e-5, accountant="prv")
    assert gdp.get_epsilon(delta=1e-5) < prv - 0.5
    assert "gdp" not in ACCOUNTANTS
    with pytest.raises(DPConfigError, match="under-reports"):
        DPConfig(accountant="gdp")


def test_max_steps_after_a_prior_history():
    prior = [(2.0, 0.1, 40)]
    m = max_steps_within(target_epsilon=3.0, noise_multiplier=1.0, sampling_rate=0.1, delta=1e-5, prior=prior)
    assert epsilon_of([*prior, (1.0, 0.1, m)], delta=1e-5) <= 3.0 < epsilon_of([*prior, (1.0, 0.1, m + 1)],
                                                                              delta=1e-5)
    assert max_steps_within(target_epsilon=0.1, noise_multiplier=1.0, sampling_rate=0.1, delta=1e-5,
                            prior=prior) == 0
