"""Accounting against opacus's own numbers; ledger round trip; errors on missing or mixed ledgers."""
import pytest
from opacus.accountants import RDPAccountant

from nnunet_dp.accounting import PrivacyLedger, calibrate_noise, epsilon_for, max_steps_within
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
