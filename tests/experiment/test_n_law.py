"""benchmarks/n_law.py: the law's cells, ratios and s from made-up harness folders, checked against numpy, and the
fit written as the calibration the advisor reads."""
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from nnunet_dp import law

_SPEC = importlib.util.spec_from_file_location(
    "n_law", Path(__file__).resolve().parents[2] / "benchmarks" / "n_law.py")
nl = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(nl)


def _run(folder: Path, name: str, rule: str, eps: float | None, dice: float, d: int | None) -> None:
    run = folder / "runs" / name
    model = folder / "models" / name
    (model / "fold_0").mkdir(parents=True)
    if d is not None:
        (model / "fold_0" / "privacy.json").write_text(json.dumps({"noise": {"num_trained_parameters": d}}))
    run.mkdir(parents=True)
    (run / "result.json").write_text(json.dumps({"run": name, "rule": rule, "target_epsilon": eps, "levers": "defaults",
                                                 "scores": {"none": {"dice_mean": dice}}, "model_folder": str(model)}))


def _grid(root: Path, start: str, n: int, dice_by_eps: dict, reference: list[float], d: int = 10_000) -> None:
    folder = root / f"{start}_n{n}"
    folder.mkdir(parents=True)
    (folder / "budget.json").write_text(json.dumps({"num_training_cases": n, "start": {"from": start}}))
    for eps, values in dice_by_eps.items():
        for k, v in enumerate(values, 1):
            _run(folder, f"flat_eps{eps:g}_s{k}", "flat", eps, v, d)
    for k, v in enumerate(reference, 1):
        _run(folder, f"nonprivate_s{k}", "nonprivate", None, v, None)


@pytest.fixture()
def work(tmp_path):
    rng = np.random.default_rng(1)
    truth = {}
    for n in (40, 200, 1000):
        dice = {8.0: list(rng.uniform(0.1, 0.6, 3)), 1.0: list(rng.uniform(0.0, 0.2, 2))}
        ref = list(rng.uniform(0.6, 0.8, 2))
        _grid(tmp_path, "scratch", n, dice, ref)
        truth[n] = (dice, ref)
    return tmp_path, truth


def test_cells_ratios_and_s_against_numpy(work):
    root, truth = work
    rows = nl.law_rows(nl.read_cells([str(root)]))
    assert len(rows) == 6
    for r in rows:
        dice, ref = truth[r["n"]]
        assert r["dice"] == pytest.approx(np.mean(dice[r["epsilon"]]))
        assert r["nonprivate"] == pytest.approx(np.mean(ref))
        assert r["ratio"] == pytest.approx(np.mean(dice[r["epsilon"]]) / np.mean(ref))
        assert r["s"] == pytest.approx(r["n"] * r["epsilon"] / math.sqrt(10_000 * math.log(1e5)))
        if len(dice[r["epsilon"]]) > 1:
            assert float(r["sd"]) == pytest.approx(np.std(dice[r["epsilon"]], ddof=1), abs=5e-4)


def test_fit_writes_the_calibration_the_advisor_reads(work, capsys):
    root, _ = work
    calibration = root / "cal.json"
    nl.main(["fit", "-o", str(root), "--calibration", str(calibration)])
    laws = law.load(str(calibration))
    assert set(laws) == {"scratch"} and laws["scratch"].num_cells == 6
    out = capsys.readouterr().out
    inside = int(out.split("fitted: ")[-1].split(" of ")[0])
    assert inside >= 4  # the band holds 80 % of the fitted cells (5 of 6 here, up to ties)


def test_a_public_model_is_shared_only_between_folders_of_its_pretraining_batch(tmp_path):
    """The harness refuses a public model trained with another batch (its settings differ): N = 40 (batch 10) trains
    its own, N = 200 and 800 (batch 32) share one."""
    assert [nl.tiny_batch(n) for n in (40, 100, 128, 200, 800)] == [10, 25, 32, 32, 32]
    for name, batch in (("public_n40", 10), ("public_n200", 32), ("scratch_n800", 32)):
        (tmp_path / name / "public" / "nnUNet_results").mkdir(parents=True)
        (tmp_path / name / "public" / "settings.json").write_text(json.dumps({"batch_size": batch}))
    (tmp_path / "public_n100" / "public").mkdir(parents=True)  # not trained yet: no nnUNet_results
    (tmp_path / "public_n100" / "public" / "settings.json").write_text(json.dumps({"batch_size": 25}))
    assert nl.trained_public_model(str(tmp_path), "public", 32) == str(tmp_path / "public_n200")
    assert nl.trained_public_model(str(tmp_path), "public", 10) == str(tmp_path / "public_n40")
    assert nl.trained_public_model(str(tmp_path), "public", 25) is None
    assert nl.trained_public_model(str(tmp_path / "absent"), "public", 32) is None


def test_sharing_copies_the_public_model_and_public_dataset_but_never_the_private_subsample(tmp_path):
    """The private derived dataset holds only the first folder's N cases: another N must preprocess its own."""
    first, target = tmp_path / "public_n200", tmp_path / "public_n800"
    for sub in ("public/nnUNet_results", "nnUNet_raw/Dataset999_XPublic", "nnUNet_raw/Dataset998_XPrivate",
                "nnUNet_preprocessed/Dataset999_XPublic", "nnUNet_preprocessed/Dataset998_XPrivate"):
        (first / sub).mkdir(parents=True)
        (first / sub / "f.txt").write_text(sub)
    nl.share_public_model(str(first), str(target))
    assert sorted(p.name for p in (target / "nnUNet_raw").iterdir()) == ["Dataset999_XPublic"]
    assert sorted(p.name for p in (target / "nnUNet_preprocessed").iterdir()) == ["Dataset999_XPublic"]
    assert (target / "public" / "nnUNet_results" / "f.txt").read_text() == "public/nnUNet_results"


def test_fit_records_the_held_out_check_and_fits_only_the_starts_asked(work, capsys):
    """--check folders: the fitted law carries how many of their cells fell inside (and below) its interval, computed
    again here from the law itself; --starts scratch writes no public law."""
    root, _ = work
    held = root / "held"
    _grid(held, "scratch", 300, {8.0: [0.05, 0.07]}, [0.8])
    calibration = root / "cal.json"
    nl.main(["fit", "-o", *[str(p) for p in root.glob("scratch_n*")], "--check", str(held), "--starts", "scratch",
             "--calibration", str(calibration)])
    laws = law.load(str(calibration))
    assert set(laws) == {"scratch"}
    s = 300 * 8 / math.sqrt(10_000 * math.log(1e5))
    low, _ = laws["scratch"].interval(s)
    below = int(0.06 / 0.8 < low)
    assert laws["scratch"].held_out == (f"{1 - below} of 1 cells of held inside the interval, {below} below it "
                                        "(the law over-predicts there)")
