"""DP-Morph hygiene (item 5): an earlier postprocessing.pkl is kept as a backup, and the global mode never
chooses an operation that deletes every voxel of a class that the validation references contain."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from batchgenerators.utilities.file_and_folder_operations import load_pickle
from dpmorph_helpers import reference_ball, write_model_folder
from nnunet_dp.postprocessing.determine import determine_dp_morph
from nnunet_dp.postprocessing.folders import backup_previous
from nnunet_dp.postprocessing.search import case_dice, erasures, make_candidates, select
from scipy import ndimage

LABELS = (1, 2)
SHAPE = (48, 48)
NUM_CASES = 20


# ---- (1) a new determination keeps the previous one ------------------------------------------------------------------
def _determine(validation: Path, gt: Path, **options: object) -> None:
    determine_dp_morph(str(validation), str(gt), num_processes=1, radii=[1], planes=["volumetric"], **options)


def test_second_determination_keeps_the_first_as_backup(tiny_model: dict[str, Path],
                                                        capsys: pytest.CaptureFixture) -> None:
    validation, gt = tiny_model["validation"], tiny_model["gt"]
    _determine(validation, gt, operations=["opening"])
    first = {name: (validation / name).read_bytes() for name in ("postprocessing.pkl", "postprocessing.json")}
    assert not list(validation.glob("*.bak-*"))
    capsys.readouterr()
    _determine(validation, gt, operations=["closing"], mode="global")
    backups = sorted(validation.glob("postprocessing.pkl.bak-*"))
    assert len(backups) == 1 and backups[0].read_bytes() == first["postprocessing.pkl"]
    json_backup = Path(str(backups[0]).replace("postprocessing.pkl", "postprocessing.json"))
    assert json_backup.read_bytes() == first["postprocessing.json"]
    assert json.loads((validation / "postprocessing.json").read_text())["dp_morph"]["mode"] == "global"
    assert f"kept the previous postprocessing.pkl as {backups[0]}" in capsys.readouterr().out
    _determine(validation, gt, operations=["opening"])  # a third one: the first backup is left as it was
    assert len(list(validation.glob("postprocessing.pkl.bak-*"))) == 2
    assert backups[0].read_bytes() == first["postprocessing.pkl"]


def test_backups_made_in_the_same_second_never_overwrite_each_other(tmp_path: Path) -> None:
    contents = [b"first", b"second", b"third"]
    for content in contents:
        (tmp_path / "postprocessing.pkl").write_bytes(content)
        assert len(backup_previous(str(tmp_path))) == 1
    assert sorted(p.read_bytes() for p in tmp_path.glob("postprocessing.pkl.bak-*")) == sorted(contents)
    assert backup_previous(str(tmp_path / "empty")) == []


def test_private_scores_of_an_earlier_choice_do_not_stay_beside_a_new_one(tiny_model: dict[str, Path]) -> None:
    validation, gt = tiny_model["validation"], tiny_model["gt"]
    _determine(validation, gt, operations=["opening"], epsilon_select=1.0)
    old_scores = (validation / "postprocessing_scores.json").read_bytes()
    _determine(validation, gt, operations=["opening"])
    assert not (validation / "postprocessing_scores.json").exists()
    assert [p.read_bytes() for p in validation.glob("postprocessing_scores.json.bak-*")] == [old_scores]


# ---- (2) the global mode never erases a class the references contain ------------------------------------------------
def constructed_case(index: int) -> tuple[np.ndarray, np.ndarray]:
    """(reference, prediction): class 1 a large rectangle whose prediction has twelve 3x3 false-positive blocks
    (opening with radius 2 removes them, radius 1 leaves a cross of each); class 2 a correct 3x3 block in case 0
    only (opening with radius 2 deletes it)."""
    ref = np.zeros(SHAPE, dtype=np.uint8)
    ref[4:30, 4:20] = 1
    if index == 0:
        ref[38:41, 6:9] = 2
    pred = ref.copy()
    for row in range(2, 36, 6):
        for col in (26, 34):
            pred[row:row + 3, col:col + 3] = 1
    return ref, pred


def scipy_utility(cases: list[tuple[np.ndarray, np.ndarray]], radius: float | None) -> tuple[float, bool]:
    """Independent reference: the global utility of opening every class with scipy.ndimage (None: no operation),
    and whether class 2 disappears from every prediction."""
    per_case, class2_left = [], False
    for ref, pred in cases:
        out = pred.copy()
        if radius is not None:
            for label in LABELS:
                mask = pred == label
                out[mask & ~ndimage.binary_opening(mask, reference_ball(radius, (1.0, 1.0)))] = 0
        class2_left |= bool(np.any(out == 2))
        scores = []
        for label in LABELS:
            p, r = out == label, ref == label
            total = p.sum() + r.sum()
            scores.append(1.0 if total == 0 else 2 * np.sum(p & r) / total)
        per_case.append(np.mean(scores))
    return float(np.mean(per_case)), not class2_left


@pytest.fixture(scope="module")
def constructed() -> tuple[list[tuple[np.ndarray, np.ndarray]], list, tuple[np.ndarray, ...]]:
    cases = [constructed_case(i) for i in range(NUM_CASES)]
    candidates = make_candidates(["opening"], [1, 2], ["volumetric"])
    scores = [case_dice(pred, ref, LABELS, candidates, presence=True) for ref, pred in cases]
    return cases, candidates, tuple(np.stack([s[i] for s in scores]) for i in range(4))


def test_the_eraser_would_score_best_and_is_never_chosen(constructed) -> None:
    cases, candidates, (alone, every, kept, in_ref) = constructed
    reference = [scipy_utility(cases, None if c.operation == "none" else c.radius) for c in candidates]
    utilities = [u for u, _ in reference]
    eraser = int(np.argmax(utilities))
    assert candidates[eraser].radius == 2 and reference[eraser][1]  # best by mean Dice, and erases class 2
    assert np.allclose(every.mean(axis=0).mean(axis=1), utilities)
    assert select(alone, every, LABELS, candidates, mode="global").chosen["all"] == eraser  # without the rule
    assert erasures(kept, in_ref).tolist() == [[False, False], [False, False], [False, True]]
    selection = select(alone, every, LABELS, candidates, mode="global", margin=0.001, presence=(kept, in_ref))
    allowed = [i for i, (_, erases) in enumerate(reference) if not erases]
    assert selection.chosen["all"] == max(allowed, key=lambda i: utilities[i]) != eraser
    assert selection.excluded == [eraser]


def test_a_private_global_choice_scores_the_eraser_down(constructed) -> None:
    _, candidates, (alone, every, kept, in_ref) = constructed
    rng = np.random.default_rng(0)
    picks = {select(alone, every, LABELS, candidates, mode="global", epsilon_select=1e9, rng=rng,
                    presence=(kept, in_ref)).chosen["all"] for _ in range(20)}
    assert picks == {1}  # radius 1: the best once a case where a candidate erases a class scores 0


def test_global_determination_on_folders_never_writes_the_eraser(tmp_path: Path) -> None:
    cases = {f"case_{i:03d}": tuple(a[None] for a in constructed_case(i)) for i in range(NUM_CASES)}
    paths = write_model_folder(tmp_path / "model", cases, labels={"background": 0, "big": 1, "small": 2})
    _, kwargs = determine_dp_morph(str(paths["validation"]), str(paths["gt"]), num_processes=1, mode="global",
                                   operations=["opening"], radii=[1, 2], planes=["in_plane"], margin=0.001)
    assert {s["radius"] for s in kwargs[0]["steps"]} == {1.0}
    _, stored = load_pickle(str(paths["validation"] / "postprocessing.pkl"))
    assert stored == kwargs
    record = json.loads((paths["validation"] / "postprocessing.json").read_text())["dp_morph"]
    assert record["excluded_candidates"]["candidates"] == [{"operation": "opening", "radius": 2.0,
                                                            "plane": "in_plane"}]
