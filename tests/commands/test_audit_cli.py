"""nnUNetv2_dp_audit one-run on a hand-written DP fold folder: the core audit at privacy.json's settings, its JSON and
plot, epsilon equal to opacus' for those settings, and the refusals (a non-DP folder, bad options)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from scipy.optimize import brentq

from nnunet_dp.accounting import epsilon_for
from nnunet_dp.commands.audit import main

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the")  # opacus RDP order-range notice
DS, NAME = 981, "Dataset981_Fake"
SETTINGS = {"rule": "psac", "rule_constant": 0.2, "clip_norm": 0.5, "noise_multiplier": 1.2, "sampling_rate": 0.05,
            "steps": 50, "delta": 1e-5, "accountant": "rdp"}
KEYS = {"epsilon_lower_bound", "epsilon", "delta", "num_canaries", "num_guesses", "num_correct", "confidence",
        "covers", "not_covered", "consistent", "epsilon_privacy_json", "epsilon_matches_privacy_json"}


def fold_folder(root: Path, trainer: str) -> Path:
    return root / NAME / f"{trainer}__nnUNetPlans__2d" / "fold_0"


@pytest.fixture
def results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = fold_folder(tmp_path, "nnUNetTrainerDP_PSAC")
    folder.mkdir(parents=True)
    epsilon = epsilon_for(noise_multiplier=1.2, sampling_rate=0.05, steps=50, delta=1e-5)
    (folder / "privacy.json").write_text(json.dumps({**SETTINGS, "epsilon": epsilon, "assumptions": []}))
    fold_folder(tmp_path, "nnUNetTrainer").mkdir(parents=True)  # an ordinary nnU-Net fold: no privacy.json
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    return tmp_path


def audit(*args: str) -> None:
    main(["one-run", "-d", str(DS), "-c", "2d", "-f", "0", *args])


def test_one_run_writes_the_bound_next_to_the_accountants_epsilon(results: Path, capsys: pytest.CaptureFixture) -> None:
    audit("-tr", "nnUNetTrainerDP_PSAC", "--canaries", "200")
    folder = fold_folder(results, "nnUNetTrainerDP_PSAC")
    r = json.loads((folder / "audit_one_run.json").read_text())
    assert KEYS <= set(r) and (folder / "audit_one_run.png").stat().st_size > 1000
    assert r["epsilon"] == pytest.approx(epsilon_for(noise_multiplier=1.2, sampling_rate=0.05, steps=50, delta=1e-5),
                                         rel=1e-9)
    assert r["epsilon_matches_privacy_json"] and r["consistent"]
    assert 0.0 <= r["epsilon_lower_bound"] <= r["epsilon"]
    assert r["num_canaries"] == 200 and 0 < r["num_correct"] <= r["num_guesses"] <= 200
    assert r["delta"] == 1e-5 and r["confidence"] == 0.95
    for key, value in SETTINGS.items():  # the run's own mechanism, rule constant included
        assert r[key] == value, key
    assert "scores" not in r and "seed" not in r  # nothing but the summary; no randomness published
    assert r["privacy_json"] == f"{NAME}/nnUNetTrainerDP_PSAC__nnUNetPlans__2d/fold_0/privacy.json"  # no local path
    out = capsys.readouterr().out
    assert "epsilon_lower_bound" in out and "NOT covered" in out and "nnU-Net's data path" in out
    # canaries at the fold's rule and constant (PSAC, r = 0.2, C = 0.5) reach the sensitivity after its scaling
    assert r["sensitivity"] == 0.5 and 0.999 * 0.5 <= r["canary_scaled_norm"] <= 0.5
    assert r["canary_norm"] == pytest.approx(brentq(lambda n: 0.5 * n / (n + 0.2 / (n + 0.2)) - (1 - 1e-6) * 0.5,
                                                    0.5, 1e6, xtol=1e-12), rel=1e-7)
    assert f"canaries of norm {r['canary_norm']:.6g}: scaled norm" in out


@pytest.mark.parametrize("config,expected", [({"psac_r": 0.3, "nsgd_r": 0.7}, 0.3), ({"nsgd_r": 0.7}, None),
                                             (None, None)])
def test_rule_constant_from_dp_config_when_privacy_json_lacks_it(results: Path, capsys: pytest.CaptureFixture,
                                                                  config: dict | None, expected: float | None) -> None:
    """An older privacy.json without rule_constant: the fold's dp_config.json gives the rule's constant; without it
    the audit stops (never the rule's default, which need not be what the run used)."""
    folder = fold_folder(results, "nnUNetTrainerDP_PSAC")
    rep = {k: v for k, v in json.loads((folder / "privacy.json").read_text()).items() if k != "rule_constant"}
    (folder / "privacy.json").write_text(json.dumps(rep))
    if config is not None:
        (folder / "dp_config.json").write_text(json.dumps(config))
    if expected is None:
        with pytest.raises(SystemExit) as e:
            audit("-tr", "nnUNetTrainerDP_PSAC", "--canaries", "20")
        assert "has rule psac but no rule_constant, and dp_config.json there has no psac_r" in str(e.value)
        return
    audit("-tr", "nnUNetTrainerDP_PSAC", "--canaries", "20")
    r = json.loads((folder / "audit_one_run.json").read_text())
    assert r["rule_constant"] == expected and 0.999 * 0.5 <= r["canary_scaled_norm"] <= 0.5


def test_one_run_accepts_nnunets_device_option(results: Path, capsys: pytest.CaptureFixture) -> None:
    """-device (typed out of nnU-Net habit) is not read as -d 'evice' followed by a stray 'cpu'."""
    audit("-tr", "nnUNetTrainerDP_PSAC", "--canaries", "20", "-device", "cpu")
    assert json.loads((fold_folder(results, "nnUNetTrainerDP_PSAC") / "audit_one_run.json").read_text())[
        "num_canaries"] == 20
    audit("-tr", "nnUNetTrainerDP_PSAC", "--canaries", "20", "-device", "cuda")
    assert "-device cuda ignored" in capsys.readouterr().out


def test_one_run_into_another_folder_and_a_mismatching_epsilon(results: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    privacy = fold_folder(results, "nnUNetTrainerDP_PSAC") / "privacy.json"
    rep = json.loads(privacy.read_text())
    privacy.write_text(json.dumps({**rep, "epsilon": rep["epsilon"] + 1.0}))
    out = tmp_path / "audit_out"
    audit("-tr", "nnUNetTrainerDP_PSAC", "--canaries", "50", "-o", str(out))
    r = json.loads((out / "audit_one_run.json").read_text())
    assert not r["epsilon_matches_privacy_json"] and math.isclose(r["epsilon_privacy_json"], rep["epsilon"] + 1.0)
    assert "NOTE: privacy.json's epsilon" in capsys.readouterr().out
    assert not (fold_folder(results, "nnUNetTrainerDP_PSAC") / "audit_one_run.json").exists()


@pytest.mark.parametrize("args,message", [
    (["-tr", "nnUNetTrainer"], "no readable privacy.json"),
    (["-tr", "nnUNetTrainerNope"], "-tr nnUNetTrainerNope -p nnUNetPlans -c 2d: no model folder"),
    (["-tr", "nnUNetTrainerDP_PSAC", "-p", "OtherPlans"], "trained models of Dataset981_Fake: nnUNetTrainerDP_PSAC__"),
])
def test_refusals_name_the_option(results: Path, capsys: pytest.CaptureFixture, args: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as e:
        audit(*args)
    assert message in str(e.value) and str(e.value).startswith("nnUNetv2_dp_audit one-run: ")
    if args[1] == "nnUNetTrainer":
        assert "use 'nnUNetv2_dp_audit mia'" in str(e.value)


def test_bad_option_values(results: Path, capsys: pytest.CaptureFixture) -> None:
    for args, message in ((["--canaries", "0"], "--canaries: '0' is not allowed: an integer >= 1"),
                          (["--confidence", "1.5"], "'1.5' is not allowed: a number in (0, 1)"),
                          (["-f", "x"], "'x' is not allowed: an integer >= 0 (e.g. 0) or 'all'")):
        with pytest.raises(SystemExit):
            main(["one-run", "-d", str(DS), "-c", "2d", "-f", "0", "-tr", "nnUNetTrainerDP_PSAC", *args])
        assert message in capsys.readouterr().err
    privacy = fold_folder(results, "nnUNetTrainerDP_PSAC") / "privacy.json"
    privacy.write_text(json.dumps({**json.loads(privacy.read_text()), "rule": "flat", "rule_constant": 0.3}))
    with pytest.raises(SystemExit) as e:
        audit("-tr", "nnUNetTrainerDP_PSAC")
    assert "privacy.json has rule_constant = 0.3, which the audit cannot use: None for rule flat" in str(e.value)
    privacy.write_text(json.dumps({**json.loads(privacy.read_text()), "steps": 0}))
    with pytest.raises(SystemExit) as e:
        audit("-tr", "nnUNetTrainerDP_PSAC")
    assert "steps = 0" in str(e.value)
    with pytest.raises(SystemExit) as e:
        main(["one-run", "-d", "982", "-c", "2d", "-f", "0", "-tr", "nnUNetTrainerDP_PSAC"])
    assert "-d 982: no such dataset" in str(e.value)
