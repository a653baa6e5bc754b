"""nnUNetv2_dp_privacy over several folds: the release's epsilon against opacus run directly (item 3).

Fake fold folders (privacy.json, plans.json in the model folder, splits_final.json): no training.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pytest
from nnunet_dp.postprocessing.report import privacy_record
from opacus.accountants import PRVAccountant, RDPAccountant

from nnunet_dp.commands.privacy import main as privacy_main

DELTA = 1e-5
CASES = [f"case_{i:02d}" for i in range(10)]
H1 = [(1.1, 0.2, 40)]
H2 = [(0.9, 0.25, 30), (1.3, 0.2, 20)]


def opacus_epsilon(history: list[tuple[float, float, int]], accountant: str = "rdp", delta: float = DELTA) -> float:
    """The reference: one opacus accountant stepped through the whole history."""
    return _opacus_epsilon(tuple(history), accountant, delta)


@functools.cache
def _opacus_epsilon(history: tuple[tuple[float, float, int], ...], accountant: str, delta: float) -> float:
    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    for sigma, q, n in history:
        for _ in range(n):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    return float(acc.get_epsilon(delta=delta))


def cv_splits(k: int = 5) -> list[dict[str, list[str]]]:
    """nnU-Net's k-fold CV layout: each case is validated in exactly one fold and trains the other k - 1."""
    return [{"train": [c for j, c in enumerate(CASES) if j % k != f], "val": [c for j, c in enumerate(CASES)
                                                                               if j % k == f]} for f in range(k)]


def write_fold(root: Path, fold: int | str, history: list[tuple[float, float, int]], *, n: int = 8,
               accountant: str = "rdp", delta: float = DELTA, dataset: str = "Dataset001_Fake",
               private_randomness: bool = True, trainer: str = "nnUNetTrainerDP__nnUNetPlans__2d") -> Path:
    model = root / dataset / trainer
    folder = model / f"fold_{fold}"
    folder.mkdir(parents=True)
    (model / "plans.json").write_text(json.dumps({"dataset_name": dataset}))
    sigma, q, _ = history[-1]
    report = {"epsilon": opacus_epsilon(history, accountant, delta), "delta": delta, "noise_multiplier": sigma,
              "sampling_rate": q, "expected_batch_size": q * n, "steps": sum(h[2] for h in history),
              "accountant": accountant, "rule": "flat", "clip_norm": 1.0, "sensitivity": 1.0,
              "num_training_cases": n, "status": "finished", "ledger_history": [list(h) for h in history],
              "private_randomness": private_randomness, "assumptions": [f"assumption of {dataset}"]}
    (folder / "privacy.json").write_text(json.dumps(report))
    return folder


def write_splits(path: Path, splits: list[dict[str, list[str]]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(splits))
    return path


def write_selection(folder: Path, epsilon_select: float | None, *, seeded: bool = False) -> Path:
    """postprocessing.json as DP-Morph's report module records the choice (only the parts the release reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "postprocessing.pkl").write_bytes(b"not read")
    privacy = privacy_record(epsilon_select, 10, 1, False, seeded=seeded)
    (folder / "postprocessing.json").write_text(json.dumps({"dp_morph": {"privacy": privacy},
                                                            "nnunet_connected_components": None}))
    return folder


def release(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "out" / "release_privacy.json"
    out.parent.mkdir(exist_ok=True)
    privacy_main([*args, "-o", str(out)])
    return json.loads(out.read_text())


def test_one_fold_equals_its_privacy_json(tmp_path: Path) -> None:
    fold = write_fold(tmp_path, 0, H2)
    splits = write_splits(tmp_path / "splits_final.json", cv_splits())
    rep = release(tmp_path, str(fold), "--splits", str(splits))
    own = json.loads((fold / "privacy.json").read_text())
    assert rep["epsilon"] == pytest.approx(own["epsilon"], rel=1e-12)
    assert rep["delta"] == own["delta"] and rep["covered"]
    assert [e["kind"] for e in rep["breakdown"]] == ["fold_run"]


@pytest.mark.parametrize("with_splits", [True, False], ids=["splits-every-case", "no-splits-upper-bound"])
def test_k_identical_folds_with_every_case_are_one_run_repeated(tmp_path: Path, with_splits: bool) -> None:
    k = 3
    folds = [write_fold(tmp_path, f, H1, n=len(CASES)) for f in range(k)]
    args = [str(f) for f in folds]
    if with_splits:
        args += ["--splits", str(write_splits(tmp_path / "s.json", [{"train": CASES, "val": []}] * k))]
    rep = release(tmp_path, *args)
    assert rep["epsilon"] == pytest.approx(opacus_epsilon(H1 * k), rel=1e-9)
    assert rep["epsilon"] > opacus_epsilon(H1 * (k - 1))
    if not with_splits:
        assert all("every case" in e["membership"] for e in rep["breakdown"])


def test_five_fold_cv_composes_the_four_folds_that_hold_a_case(tmp_path: Path) -> None:
    folds = [write_fold(tmp_path, f, H1) for f in range(5)]
    splits = write_splits(tmp_path / "splits_final.json", cv_splits())
    rep = release(tmp_path, *map(str, folds), "--splits", str(splits))
    assert rep["epsilon"] == pytest.approx(opacus_epsilon(H1 * 4), rel=1e-9)
    assert rep["epsilon"] < opacus_epsilon(H1 * 5) - 1e-6
    groups = rep["composition"]["training"]["groups"]
    assert len(groups) == 5 and all(len(g["folds"]) == 4 and g["num_cases"] == 2 for g in groups)


def test_different_folds_take_the_worst_case(tmp_path: Path) -> None:
    histories = [H1, H2, H1, [(2.0, 0.2, 10)], H2]
    folds = [write_fold(tmp_path, f, h) for f, h in enumerate(histories)]
    splits = cv_splits()
    path = write_splits(tmp_path / "splits_final.json", splits)
    rep = release(tmp_path, *map(str, folds), "--splits", str(path))
    per_case = [opacus_epsilon([h for f, hist in enumerate(histories) if case in splits[f]["train"] for h in hist])
                for case in CASES]
    assert rep["epsilon"] == pytest.approx(max(per_case), rel=1e-9)


def test_splits_found_through_debug_json(tmp_path: Path) -> None:
    folds = [write_fold(tmp_path, f, H1) for f in range(5)]
    pre = tmp_path / "preprocessed" / "Dataset001_Fake"
    write_splits(pre / "splits_final.json", cv_splits())
    for fold in folds:
        (fold / "debug.json").write_text(json.dumps({"preprocessed_dataset_folder_base": str(pre), "fold": "0"}))
    rep = release(tmp_path, *map(str, folds))
    assert rep["epsilon"] == pytest.approx(opacus_epsilon(H1 * 4), rel=1e-9)


def test_journal_with_more_steps_than_privacy_json_counts(tmp_path: Path) -> None:
    fold = write_fold(tmp_path, 0, [(1.1, 0.2, 3)])
    (fold / "dp_journal.txt").write_text('{"session": "x", "noise_multiplier": 1.1, "sampling_rate": 0.2}\n'
                                         + "s\n" * 5 + "s")  # a crashed run: 6 steps, the last line cut short
    rep = release(tmp_path, str(fold))
    assert rep["epsilon"] == pytest.approx(opacus_epsilon([(1.1, 0.2, 6)]), rel=1e-9)
    assert rep["breakdown"][0]["history_source"] == "dp_journal.txt"


def test_epsilon_select_is_added(tmp_path: Path) -> None:
    folds = [write_fold(tmp_path, f, H1) for f in range(5)]
    splits = write_splits(tmp_path / "splits_final.json", cv_splits())
    pp = write_selection(tmp_path / "crossval", 0.5)
    rep = release(tmp_path, *map(str, folds), "--splits", str(splits), "--postprocessing", str(pp))
    assert rep["covered"] and rep["epsilon_select"] == 0.5
    assert rep["epsilon"] == pytest.approx(opacus_epsilon(H1 * 4) + 0.5, rel=1e-9)
    assert rep["delta"] == DELTA
    selection = [e for e in rep["breakdown"] if e["kind"] == "selection"]
    assert len(selection) == 1 and "basic composition" in selection[0]["composition"]
    assert selection[0]["delta"] == 0.0


@pytest.mark.parametrize("case", ["selection-not-private", "selection-seeded", "run-seeded", "nnunet-own-pp"])
def test_not_covered_is_said_never_counted_as_zero(tmp_path: Path, capsys: pytest.CaptureFixture, case: str) -> None:
    fold = write_fold(tmp_path, 0, H1, private_randomness=case != "run-seeded")
    pp = tmp_path / "pp"
    if case == "nnunet-own-pp":
        pp.mkdir()
        (pp / "postprocessing.pkl").write_bytes(b"x")
        (pp / "postprocessing.json").write_text(json.dumps({"dice_per_class_or_region": {}}))
    else:
        write_selection(pp, None if case == "selection-not-private" else 1.0, seeded=case == "selection-seeded")
    rep = release(tmp_path, str(fold), "--postprocessing", str(pp))
    assert rep["covered"] is False and rep["epsilon"] is None and rep["not_covered"]
    assert rep["epsilon_training"] == pytest.approx(opacus_epsilon(H1), rel=1e-9)
    assert "NOT covered" in capsys.readouterr().out


def test_prv_runs_compose_with_prv(tmp_path: Path) -> None:
    folds = [write_fold(tmp_path, f, [(1.0, 0.2, 20)], n=len(CASES), accountant="prv") for f in range(2)]
    rep = release(tmp_path, *map(str, folds))
    assert rep["accountant"] == "prv"
    assert rep["epsilon"] == pytest.approx(opacus_epsilon([(1.0, 0.2, 40)], "prv"), rel=1e-6)


def test_cli_writes_release_privacy_json_in_the_current_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture) -> None:
    folds = [write_fold(tmp_path, f, H1) for f in range(5)]
    splits = write_splits(tmp_path / "splits_final.json", cv_splits())
    pp = write_selection(tmp_path / "crossval", 1.0)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    privacy_main([*map(str, folds), "--splits", str(splits), "--postprocessing", str(pp)])
    rep = json.loads((work / "release_privacy.json").read_text())
    assert {"epsilon", "delta", "breakdown"} <= set(rep)
    assert [e["kind"] for e in rep["breakdown"]] == ["fold_run"] * 5 + ["selection"]
    out = capsys.readouterr().out
    assert f"Release: epsilon = {rep['epsilon']:.4f} at delta = 1e-05" in out


def _exit_message(args: list[str], capsys: pytest.CaptureFixture) -> str:
    before = set(os.listdir("."))
    with pytest.raises(SystemExit) as e:
        privacy_main(args)
    assert e.value.code not in (0, None)
    assert set(os.listdir(".")) == before  # nothing written
    return e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err


def _bad(tmp_path: Path, case: str) -> tuple[list[str], list[str]]:
    if case == "missing-folder":
        return [str(tmp_path / "nowhere" / "fold_0")], ["does not exist", "nowhere/fold_0"]
    if case == "non-dp-folder":
        (tmp_path / "plain" / "fold_0").mkdir(parents=True)
        return [str(tmp_path / "plain" / "fold_0")], ["plain/fold_0", "DP trainer"]
    if case == "privacy-json-without-history-keys":
        folder = tmp_path / "fold_0"
        folder.mkdir()
        (folder / "privacy.json").write_text(json.dumps({"epsilon": 1.0}))
        return [str(folder)], ["fold_0/privacy.json", "accountant", "nnunet-dp trainer"]
    if case == "mixed-accountants":
        a, b = write_fold(tmp_path, 0, H1), write_fold(tmp_path, 1, H1, accountant="prv")
        return [str(a), str(b)], ["accountant of", str(b), "'prv'", "'rdp'", "same 'accountant'"]
    if case == "mixed-datasets":
        a, b = write_fold(tmp_path, 0, H1), write_fold(tmp_path, 1, H1, dataset="Dataset002_Other")
        return [str(a), str(b)], ["dataset of", str(b), "Dataset002_Other", "Dataset001_Fake"]
    if case == "splits-of-another-run":
        folder = write_fold(tmp_path, 0, H1, n=5)
        splits = write_splits(tmp_path / "s.json", cv_splits())
        return [str(folder), "--splits", str(splits)], ["s.json", "num_training_cases = 5", "--splits"]
    folder = write_fold(tmp_path, 0, H1)
    return [str(folder), str(folder)], ["fold_0", "each fold folder once"]


@pytest.mark.parametrize("case", ["missing-folder", "non-dp-folder", "privacy-json-without-history-keys",
                                  "mixed-accountants", "mixed-datasets", "splits-of-another-run", "same-folder-twice"])
def test_bad_inputs_stop_with_a_clear_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture, case: str) -> None:
    monkeypatch.chdir(tmp_path)
    args, fragments = _bad(tmp_path, case)
    message = _exit_message(args, capsys)
    missing = [f for f in fragments if f.lower() not in message.lower()]
    assert not missing, f"message lacks {missing}:\n{message}"


def test_a_journal_that_was_ever_seeded_is_not_covered(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The review's reproduction: 100 seeded + 20 unseeded steps in the journal, privacy.json rewritten by the
    unseeded resume (private_randomness true): the release is NOT covered."""
    fold = write_fold(tmp_path, 0, [(1.1, 0.2, 120)])
    (fold / "dp_journal.txt").write_text(
        '{"session": "a", "noise_multiplier": 1.1, "sampling_rate": 0.2, "private_randomness": false}\n' + "s\n" * 100
        + '{"session": "b", "noise_multiplier": 1.1, "sampling_rate": 0.2, "private_randomness": true}\n' + "s\n" * 20)
    rep = release(tmp_path, str(fold))
    assert rep["covered"] is False and rep["epsilon"] is None
    assert rep["epsilon_training"] == pytest.approx(opacus_epsilon([(1.1, 0.2, 120)]), rel=1e-9)
    assert any("private_randomness = False" in p for p in rep["not_covered"])


@pytest.mark.parametrize("delta", [1 / 8, 0.2])
def test_delta_of_at_least_one_over_n_is_refused_as_the_trainer_does(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      delta: float) -> None:
    monkeypatch.chdir(tmp_path)
    from nnunet_dp.config import DPConfig
    from nnunet_dp.errors import DPConfigError

    fold = write_fold(tmp_path, 0, H1, n=8)
    with pytest.raises(DPConfigError) as trainer_error:
        DPConfig(delta=delta).check_against_dataset(8, 2)
    message = _exit_message([str(fold), "--delta", str(delta)], capsys)
    assert trainer_error.value.allowed in message and "--delta" in message


def test_model_folder_names_its_folds_and_output_is_not_overwritten(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    folds = [write_fold(tmp_path, f, H1) for f in range(2)]
    message = _exit_message([str(folds[0].parent)], capsys)
    assert "pick one or more of" in message and str(folds[0]) in message and str(folds[1]) in message
    assert "does not exist" in _exit_message([str(tmp_path / "nowhere")], capsys)
    privacy_main([str(folds[0])])
    first = (tmp_path / "release_privacy.json").read_text()
    message = _exit_message([str(folds[1])], capsys)
    assert "--overwrite" in message and (tmp_path / "release_privacy.json").read_text() == first
    privacy_main([str(folds[1]), "--overwrite"])
    assert (tmp_path / "release_privacy.json").read_text() != first
