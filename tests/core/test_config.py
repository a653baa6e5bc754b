"""Settings: defaults, JSON file from nnUNet_dp_config, and errors that name key, value and what is allowed."""
import json

import pytest

from nnunet_dp.config import DPConfig
from nnunet_dp.errors import DPConfigError


@pytest.mark.parametrize("key,value,allowed", [
    ("target_epsilon", 0, "> 0"), ("target_epsilon", -1.0, "> 0"), ("delta", 1.0, "(0, 1)"),
    ("clip_norm", 0, "> 0"), ("clip_norm", -2, "> 0"), ("sampling_rate", 1.5, "(0, 1]"),
    ("sampling_rate", 0.0, "(0, 1]"), ("accountant", "moments", "'rdp', 'prv'"),
    ("accountant", "gdp", "under-reports epsilon"), ("seed", 2**63, "[0, 2**63 - 1]"), ("seed", -1, "[0, 2**63 - 1]"),
    ("seed", True, "null (default"), ("seed", 1.5, "not private"),
    ("num_epochs", 0, "integer > 0"), ("num_epochs", 2.5, "integer > 0"), ("norm_conversion", "layer", "'all'"),
    ("noise_multiplier", float("nan"), "> 0"), ("psac_r", 0, "> 0"),
])
def test_bad_values_name_key_value_and_allowed(key, value, allowed):
    with pytest.raises(DPConfigError) as e:
        DPConfig.from_mapping({key: value})
    msg = str(e.value)
    assert f"'{key}'" in msg and repr(value) in msg and allowed in msg


def test_unknown_key_lists_known_keys():
    with pytest.raises(DPConfigError, match="unknown key; did you mean .target_epsilon.. known keys are .*target_epsilon"):
        DPConfig.from_mapping({"target_epsilion": 3})


def test_delta_must_be_below_one_over_n_and_q_at_most_one():
    cfg = DPConfig(delta=0.01)
    with pytest.raises(DPConfigError, match=r"'delta' = 0.01 .*1/N"):
        cfg.check_against_dataset(200, 2)
    with pytest.raises(DPConfigError, match="expected_batch_size"):
        DPConfig(expected_batch_size=30).check_against_dataset(20, 2)
    DPConfig(expected_batch_size=20).check_against_dataset(20, 2)  # q = 1 is allowed


def test_needs_epsilon_or_sigma():
    with pytest.raises(DPConfigError, match="noise_multiplier"):
        DPConfig(target_epsilon=None, noise_multiplier=None)


def test_env_file(tmp_path, monkeypatch):
    path = tmp_path / "dp.json"
    path.write_text(json.dumps({"target_epsilon": 2.5, "clip_norm": 0.3, "accountant": "prv"}))
    monkeypatch.setenv("nnUNet_dp_config", str(path))
    cfg = DPConfig.from_env(target_epsilon=1.0, num_epochs=7)
    assert (cfg.target_epsilon, cfg.clip_norm, cfg.accountant, cfg.num_epochs) == (2.5, 0.3, "prv", 7)
    path.write_text("{not json")
    with pytest.raises(DPConfigError, match="valid JSON"):
        DPConfig.from_env()
    monkeypatch.setenv("nnUNet_dp_config", str(tmp_path / "missing.json"))
    with pytest.raises(DPConfigError, match="existing JSON file"):
        DPConfig.from_env()


def test_sampling_rate_from_expected_batch_size():
    assert DPConfig().sampling_rate_for(100, 4) == pytest.approx(0.04)
    assert DPConfig(expected_batch_size=10).sampling_rate_for(100, 4) == pytest.approx(0.1)
    assert DPConfig(sampling_rate=0.2).sampling_rate_for(100, 4) == pytest.approx(0.2)


def test_seed_never_in_repr_or_release_dict():
    """debug.json (nnU-Net) stores str() of the trainer's attributes, dp_config.json and checkpoints the release
    dict: neither may hold the seed (docs/invariants.md, invariant 8)."""
    seeded = DPConfig(seed=918273645)
    assert "918273645" not in repr(seeded) and "918273645" not in str(seeded.release_dict())
    assert seeded.release_dict()["private_randomness"] is False and "seed" not in seeded.release_dict()
    assert DPConfig().release_dict()["private_randomness"] is True
    assert DPConfig(seed=2**63 - 1).seed == 2**63 - 1
    # dp_config.json read back (e.g. by --val) is accepted and carries no seed
    assert DPConfig.from_mapping(seeded.release_dict()).seed is None


def test_errors_name_the_settings_file_and_suggest_the_key(tmp_path, monkeypatch):
    path = tmp_path / "my_dp.json"
    path.write_text(json.dumps({"target_epsilom": 8}))
    monkeypatch.setenv("nnUNet_dp_config", str(path))
    with pytest.raises(DPConfigError, match="did you mean 'target_epsilon'") as e:
        DPConfig.from_env()
    assert str(path) in str(e.value)
    path.write_text(json.dumps({"clip_norm": -1}))
    with pytest.raises(DPConfigError, match="clip_norm") as e:
        DPConfig.from_env()
    assert str(path) in str(e.value) and "> 0" in str(e.value)
    path.write_text(json.dumps({"zzzz": 1}))
    with pytest.raises(DPConfigError) as e:
        DPConfig.from_env()
    assert "did you mean" not in str(e.value)
