"""The search picks the known right repair on constructed cases; its scores equal refine_label_map + nnU-Net's
own confusion counts."""
from __future__ import annotations

import numpy as np
import pytest
from dpmorph_helpers import make_case
from nnunet_dp.postprocessing.refine import refine_label_map
from nnunet_dp.postprocessing.search import NONE, case_dice, make_candidates, select
from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn

from nnunet_dp.errors import DPError

LABELS = (1, 2, 3)


@pytest.fixture(scope="module")
def constructed():
    return [make_case(seed) for seed in range(4)]


def score(cases, candidates):
    scores = [case_dice(pred, ref, LABELS, candidates) for ref, pred in cases]
    return np.stack([s[0] for s in scores]), np.stack([s[1] for s in scores])


def nnunet_dice(pred: np.ndarray, ref: np.ndarray) -> float:
    tp, fp, fn, _ = compute_tp_fp_fn_tn(ref, pred)
    return 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def test_adaptive_picks_opening_for_speckle_closing_for_holes_and_none_for_small_blobs(constructed):
    candidates = make_candidates(["opening", "closing"], [1, 2], ["volumetric"])
    alone, every = score(constructed, candidates)
    selection = select(alone, every, LABELS, candidates, mode="adaptive", margin=0.001)
    chosen = {key: candidates[index].operation for key, index in selection.chosen.items()}
    assert chosen == {"1": "opening", "2": "closing", "3": "none"}
    assert [s.label for s in selection.steps] == [1, 2]


def test_global_mode_maximises_the_mean_dice_of_the_refined_maps(constructed):
    candidates = make_candidates(["opening", "closing", "opening_closing"], [1, 2], ["in_plane", "volumetric"])
    alone, every = score(constructed, candidates)
    brute = np.zeros(len(candidates))
    for index, cand in enumerate(candidates):
        steps = [] if cand == NONE else [{"label": label, "operation": cand.operation, "radius": cand.radius,
                                          "plane": cand.plane} for label in LABELS]
        per_case = []
        for ref, pred in constructed:
            out = refine_label_map(pred, steps)
            per_case.append([nnunet_dice(out == label, ref == label) for label in LABELS])
        assert np.allclose(every[:, index], per_case)
        brute[index] = np.mean(per_case)
    selection = select(alone, every, LABELS, candidates, mode="global", margin=0.0)
    assert selection.chosen["all"] == int(np.argmax(brute))
    assert all(s.operation == candidates[selection.chosen["all"]].operation for s in selection.steps)


def test_margin_keeps_none_when_the_gain_is_smaller(constructed):
    candidates = make_candidates(["opening", "closing"], [1, 2], ["volumetric"])
    alone, every = score(constructed, candidates)
    gains = alone.mean(axis=0).max(axis=0) - alone.mean(axis=0)[0]
    selection = select(alone, every, LABELS, candidates, mode="adaptive", margin=float(gains.max()) + 1e-9)
    assert selection.steps == [] and set(selection.chosen.values()) == {0}


def test_private_selection_with_a_huge_epsilon_equals_the_argmax(constructed):
    candidates = make_candidates(["opening", "closing"], [1, 2], ["volumetric"])
    alone, every = score(constructed, candidates)
    plain = select(alone, every, LABELS, candidates, mode="adaptive", margin=0.001)
    rng = np.random.default_rng(0)
    private = select(alone, every, LABELS, candidates, mode="adaptive", margin=0.001, epsilon_select=1e9, rng=rng)
    assert private.chosen == plain.chosen


def test_alone_scores_refine_one_class_without_touching_the_others(constructed):
    candidates = make_candidates(["closing"], [2], ["volumetric"])
    ref, pred = constructed[0]
    alone, _ = case_dice(pred, ref, LABELS, candidates)
    for k, label in enumerate(LABELS):
        out = refine_label_map(pred, [{"label": label, "operation": "closing", "radius": 2.0, "plane": "volumetric"}])
        assert alone[1, k] == pytest.approx(nnunet_dice(out == label, ref == label))


def test_ignore_label_voxels_do_not_count():
    ref = np.zeros((4, 6, 6), np.uint8)
    ref[1:3, 1:4, 1:4] = 1
    ref[:, :, 5] = 4  # ignore label
    pred = np.where(ref == 4, 1, ref).astype(np.uint8)  # wrong only where the reference is ignored
    alone, _ = case_dice(pred, ref, (1,), [NONE], ignore_label=4)
    assert alone[0, 0] == 1.0


@pytest.mark.parametrize("args, setting", [
    ((["erode"], [1], ["volumetric"]), "operations"),
    ((["opening"], [0], ["volumetric"]), "radii"),
    ((["opening"], [-1.5], ["volumetric"]), "radii"),
    ((["opening"], [1], ["sagittal"]), "planes"),
    ((["opening"], [], ["volumetric"]), "candidates"),
])
def test_bad_candidates_name_the_setting(args, setting):
    with pytest.raises(DPError, match=setting):
        make_candidates(*args)
