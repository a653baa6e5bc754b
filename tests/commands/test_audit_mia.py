"""Membership inference: the metrics (nnunet_dp.audit.mia) against sklearn and brute force, ties included, and
nnUNetv2_dp_audit mia end to end on one tiny DP training (one preprocessing, one training)."""
from __future__ import annotations

import csv
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from e2e import nnunet_env, prepare, run
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from nnunet_dp.audit.mia import (
    attack_metrics,
    balanced_accuracy,
    calibration_split,
    choose_threshold,
    mean_dice,
    roc_auc,
    roc_curve,
    threshold_attack,
    tpr_at_fpr,
)
from nnunet_dp.errors import DPConfigError


def _sample(seed: int, n: int, levels: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Scores (with many ties when `levels` is small) and membership with both groups present."""
    rng = np.random.default_rng(seed)
    member = rng.random(n) < 0.6
    member[:2] = [True, False]
    scores = rng.integers(0, levels, n).astype(float) if levels else rng.normal(size=n) + 0.7 * member
    return scores, member


def _brute_auc(s: np.ndarray, m: np.ndarray) -> float:
    pairs = [(a, b) for a in s[m] for b in s[~m]]
    return float(np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs]))


def _brute_points(s: np.ndarray, m: np.ndarray) -> list[tuple[float, float, float]]:
    """(threshold, fpr, tpr) for +inf and every distinct score, "member" iff score >= threshold."""
    return [(t, float((s[~m] >= t).mean()), float((s[m] >= t).mean())) for t in [np.inf, *np.unique(s)]]


# ---- metrics against independent references -----------------------------------------------------------------------
@pytest.mark.parametrize("seed,n,levels", [(0, 40, None), (1, 40, 3), (2, 7, 2), (3, 200, 10), (4, 13, 1)])
def test_roc_and_auc_match_sklearn_and_brute_force(seed: int, n: int, levels: int | None) -> None:
    s, m = _sample(seed, n, levels)
    fpr, tpr, thr = roc_curve(s, m)
    sk_fpr, sk_tpr, sk_thr = sk_roc_curve(m, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr, rtol=0, atol=1e-15)
    np.testing.assert_allclose(tpr, sk_tpr, rtol=0, atol=1e-15)
    assert thr[0] == np.inf and np.array_equal(thr[1:], sk_thr[1:])
    auc = roc_auc(s, m)
    assert auc == pytest.approx(roc_auc_score(m, s), abs=1e-12) and auc == pytest.approx(_brute_auc(s, m), abs=1e-12)
    if levels == 1:  # every score tied: no information
        assert auc == 0.5 and tpr_at_fpr(s, m, 0.01) == 0.0


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(-3, 3), st.booleans()), min_size=2, max_size=30), st.floats(0.0, 1.0))
def test_auc_and_tpr_at_fpr_brute_force_wide(pairs: list[tuple[int, bool]], max_fpr: float) -> None:
    s = np.array([p[0] for p in pairs], dtype=float)
    m = np.array([p[1] for p in pairs])
    if m.all() or not m.any():
        with pytest.raises(DPConfigError, match="at least one member and one non-member"):
            roc_auc(s, m)
        return
    assert roc_auc(s, m) == pytest.approx(_brute_auc(s, m), abs=1e-12)
    assert roc_auc(s, m) == pytest.approx(roc_auc_score(m, s), abs=1e-12)
    best = max(tpr for _, fpr, tpr in _brute_points(s, m) if fpr <= max_fpr + 1e-12)
    assert tpr_at_fpr(s, m, max_fpr) == pytest.approx(best, abs=1e-15)


@pytest.mark.parametrize("seed,n,levels", [(5, 30, None), (6, 30, 4), (7, 9, 2), (8, 60, None)])
def test_threshold_is_the_best_on_calibration_data(seed: int, n: int, levels: int | None) -> None:
    s, m = _sample(seed, n, levels)
    t = choose_threshold(s, m)
    got = balanced_accuracy(s >= t, m)
    points = _brute_points(s, m) + [(-np.inf, 1.0, 1.0)]
    best = max(0.5 * (tpr + 1 - fpr) for _, fpr, tpr in points)
    assert got == pytest.approx(best, abs=1e-12)
    first = next(th for th, fpr, tpr in points if 0.5 * (tpr + 1 - fpr) >= best - 1e-12)
    assert t == np.inf if first == np.inf else (t <= first and not np.any((s >= t) != (s >= first)))


def test_threshold_attack_and_split() -> None:
    ids = [f"case_{i:02d}" for i in range(20)]
    m = np.array([True] * 14 + [False] * 6)
    cal = calibration_split(ids, m, seed=3)
    assert cal[m].sum() == 7 and cal[~m].sum() == 3
    order = np.random.default_rng(0).permutation(20)  # the split depends on the ids, not on their order
    assert np.array_equal(calibration_split([ids[i] for i in order], m[order], seed=3), cal[order])
    assert not np.array_equal(calibration_split(ids, m, seed=4), cal)
    s = np.where(m, 1.0, 0.0) + np.linspace(0, 0.1, 20)  # separable
    r = threshold_attack(s, m, cal)
    assert r["balanced_accuracy"] == r["accuracy"] == 1.0 and 0.1 < r["threshold"] < 1.0
    assert r["num_calibration"] == 10 and r["num_evaluation"] == 10
    few = threshold_attack(s[:15], m[:15], cal[:15])  # one non-member: nothing to calibrate on
    assert few["threshold"] is None and "at least 2" in few["reason"]
    metrics = attack_metrics(s, m, cal)
    assert metrics["auc"] == 1.0 and metrics["tpr_at_1pct_fpr"] == metrics["tpr_at_0.1pct_fpr"] == 1.0
    assert metrics["fpr_resolution"] == pytest.approx(1 / 6) and len(metrics["roc"]["fpr"]) == 21
    json.dumps(metrics)


def test_mean_dice_closed_form() -> None:
    p = np.zeros((3, 4, 4), bool)
    r = np.zeros((3, 4, 4), bool)
    p[0, :2], r[0, 1:3] = True, True  # |P| = |R| = 8, overlap 4: 0.5
    p[1, 0, 0] = True  # class 2 predicted where nothing is: 0
    assert mean_dice(p, r) == pytest.approx((0.5 + 0.0 + 1.0) / 3)  # class 3 absent from both: 1
    valid = np.ones((4, 4), bool)
    valid[0, 0] = False
    assert mean_dice(p, r, valid) == pytest.approx((8 / 15 + 1.0 + 1.0) / 3)  # P of class 1 loses (0, 0)


def test_bad_inputs_name_the_argument() -> None:
    with pytest.raises(DPConfigError, match="'scores'"):
        roc_auc([0.1, np.nan], [True, False])
    with pytest.raises(DPConfigError, match="'is_member'"):
        roc_auc([0.1, 0.2], [1, 0])
    with pytest.raises(DPConfigError, match="'max_fpr'"):
        tpr_at_fpr([0.1, 0.2], [True, False], 1.5)



def test_metrics_are_core_code() -> None:
    code = ("import sys, nnunet_dp.audit.mia\n"
            "bad = [m for m in sys.modules if m.startswith(('nnunetv2', 'batchgenerators', 'dynamic_network'))]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)

def test_roc_plot_says_it_is_private(tmp_path: Path) -> None:
    from nnunet_dp.tools.audit.outputs import roc_figure, roc_plot

    s, m = _sample(0, 40, None)
    curves = {"loss": attack_metrics(s, m, calibration_split([str(i) for i in range(40)], m, seed=0))}
    fig = roc_figure(curves, title="fold 0", caption="private: statistics of the training cases")
    assert [t.get_text() for t in fig.texts] == ["private: statistics of the training cases"]
    roc_plot(str(tmp_path / "roc.png"), curves, title="fold 0", caption="private")
    assert (tmp_path / "roc.png").stat().st_size > 1000


def test_readme_lists_the_mia_json_and_plot_as_private() -> None:
    """The audit documentation says that audit_mia.json and its plot, not only the CSV, are private."""
    readme = (Path(__file__).resolve().parents[2] / "docs" / "privacy.md").read_text()
    start = readme.index("## Audits: `nnUNetv2_dp_audit`")
    section = " ".join(readme[start:readme.index("\n## ", start + 1)].split())
    at = section.index("`audit_mia.json` (")
    near = section[at:at + 900]
    assert "**All three are private: never release them.**" in near
    assert '`audit_mia.json` and `audit_mia_roc.png` hold no case id but are unnoised statistics' in near
    assert '`"release": "private: statistics of the training cases"`' in near


# ---- the command on a tiny trained DP model -----------------------------------------------------------------------
DS = 979
TRAINER = "nnUNetTrainerDP"
CFG = {"num_epochs": 1, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1, "expected_batch_size": 3,
       "target_epsilon": 8.0}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mia")
    prepare(root, dataset_id=DS, shape=(32, 32), configuration="2d")  # 12 cases: fold 0 trains on 9
    run(["nnUNetv2_train", str(DS), "2d", "0", "-tr", TRAINER, "-device", "cpu"], nnunet_env(root, CFG))
    return root


def test_mia_command_end_to_end(trained: Path) -> None:
    fold = trained / "res" / f"Dataset{DS}_Test{DS}" / f"{TRAINER}__nnUNetPlans__2d" / "fold_0"
    proc = run(["nnUNetv2_dp_audit", "mia", "-d", str(DS), "-c", "2d", "-f", "0", "-tr", TRAINER, "-device", "cpu"],
               nnunet_env(trained))
    assert "AUC" in proc.stdout and "do not release" in proc.stdout.lower()
    r = json.loads((fold / "audit_mia.json").read_text())
    assert r["release"] == "private: statistics of the training cases"  # unnoised statistics of member losses
    assert "audit_mia.json, audit_mia_cases.csv, audit_mia_roc.png: all three private: statistics of the training " \
           "cases" in proc.stdout
    splits = json.loads((trained / "pre" / f"Dataset{DS}_Test{DS}" / "splits_final.json").read_text())[0]
    assert r["num_members"] == len(splits["train"]) == 9 and r["num_nonmembers"] == len(splits["val"]) == 3
    for key in ("auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr"):
        assert 0.0 <= r[key] <= 1.0 and r[key] == r["scores"]["loss"][key]
    assert set(r["scores"]) == {"loss", "dice"} and "threshold_attack" in r
    assert r["threshold_attack"]["num_calibration"] == 4 + 1
    assert "Do not release it" in r["privacy_note"] and "audit_mia_cases.csv" in r["privacy_note"]
    with open(fold / "audit_mia_cases.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(row["case_id"] for row in rows if row["member"] == "1") == sorted(splits["train"])
    assert sorted(row["case_id"] for row in rows if row["member"] == "0") == sorted(splits["val"])
    losses = np.array([float(row["loss"]) for row in rows])
    dice = np.array([float(row["dice"]) for row in rows])
    assert np.all(np.isfinite(losses)) and np.all((dice >= 0) & (dice <= 1))
    member = np.array([row["member"] == "1" for row in rows])
    assert r["auc"] == pytest.approx(roc_auc_score(member, -losses), abs=1e-9)  # the CSV and the JSON agree
    assert (fold / "audit_mia_roc.png").stat().st_size > 1000
    assert not any(c in json.dumps(r) for c in splits["train"] + splits["val"])  # no case ids in the JSON


@pytest.mark.parametrize("args,message", [
    (["-f", "3"], "-f 3: no fold folder"),
    (["-tr", "nnUNetTrainerDP_Nope"], "-tr nnUNetTrainerDP_Nope -p nnUNetPlans -c 2d: no model folder"),
    (["-chk", "checkpoint_nope.pth"], "-chk checkpoint_nope.pth: not in"),
    (["--nonmembers", "NONMEMBERS"], "--nonmembers: 1 case(s) are training cases of fold 0"),
])
def test_mia_bad_inputs(trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str],
                        message: str) -> None:
    from nnunet_dp.commands.audit import main

    for key, value in nnunet_env(trained).items():
        if key.startswith("nnUNet"):
            monkeypatch.setenv(key, value)
    train = json.loads((trained / "pre" / f"Dataset{DS}_Test{DS}" / "splits_final.json").read_text())[0]["train"]
    (tmp_path / "ids.txt").write_text(f"# held out\n{train[0]}\n")
    args = [str(tmp_path / "ids.txt") if a == "NONMEMBERS" else a for a in args]
    full = dict(zip(["-f", "-tr"], ["0", TRAINER])) | dict(itertools.zip_longest(args[::2], args[1::2]))
    with pytest.raises(SystemExit) as e:
        main(["mia", "-d", str(DS), "-c", "2d", "-device", "cpu", *itertools.chain(*full.items())])
    assert message in str(e.value) and str(e.value).startswith("nnUNetv2_dp_audit mia: ")
