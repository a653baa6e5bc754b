"""What a private DP-Morph choice keeps of the non-private one's gain: the expected test Dice over the exponential
mechanism's draw, computed exactly (sum over the candidates of P(candidate) x its test Dice), not sampled.

    python benchmarks/dpmorph_private_gain.py OUT/runs/flat_eps8 --epsilons 0.1 0.5 1 2 8

RUN_DIR is a run folder of nnUNetv2_dp_experiment (its fold's validation predictions choose, its test predictions
score). Per mode: every candidate is scored on the validation cases (the utilities, as determine_dp_morph scores them)
and on the test cases; the non-private choice is select()'s argmax, the private one a draw with probabilities
selection_probabilities(utility, epsilon, 1/n) (adaptive: epsilon / K per class). Test Dice in DP-Morph's convention
(mean over the cases, empty/empty = 1; adaptive: each class refined alone, exact unless two classes add one voxel).
"""
from __future__ import annotations

import argparse
import glob
import json
from collections.abc import Sequence
from os.path import dirname, join

import numpy as np
from nnunet_dp.postprocessing.determine import ALL_OPERATIONS, _score, geometry
from nnunet_dp.postprocessing.folders import load_dataset_info, pair_cases
from nnunet_dp.postprocessing.privacy import selection_probabilities
from nnunet_dp.postprocessing.search import _private_global_utility, make_candidates, select

MARGIN = 0.001  # determine_dp_morph's default


def run_folders(run_dir: str) -> dict[str, str]:
    """The folders of a harness run: validation predictions and references, test predictions and labels, model."""
    with open(join(run_dir, "result.json")) as f:
        result = json.load(f)
    model, out = result["model_folder"], dirname(dirname(run_dir.rstrip("/")))
    gt = glob.glob(join(out, "nnUNet_preprocessed", "*", "gt_segmentations"))[0]
    return {"validation": join(model, "fold_0", "validation"), "gt": gt, "test": join(run_dir, "test", "none"),
            "test_labels": join(out, "test_data", "labelsTs"), "model": model}


def scores(pred: str, ref: str, model: str, num_processes: int) -> tuple[list, tuple[np.ndarray, ...], list[int]]:
    info = load_dataset_info(join(model, "plans.json"), join(model, "dataset.json"))
    pairs = pair_cases(pred, ref, info.file_ending)
    slice_axis, planes = geometry(info, pairs[0][0], ("in_plane", "volumetric"))
    cands = make_candidates(ALL_OPERATIONS, (1, 2, 3), planes)
    return cands, _score(pairs, info, cands, None, slice_axis, num_processes), list(info.labels)


def expected(mode: str, val: tuple[np.ndarray, ...], test: tuple[np.ndarray, ...], eps: float | None,
             labels: Sequence[int], cands: list) -> tuple[float, float | None]:
    """(expected mean test Dice, P(the drawn choice scores below no refinement on test); the latter for one selection
    only: global mode, or one class). eps None: the non-private argmax choice, which is deterministic."""
    alone, every, kept, in_ref = val
    n = alone.shape[0]
    penalty = MARGIN * (np.arange(len(cands)) != 0)
    if eps is None:
        chosen = select(alone, every, labels, cands, mode=mode, margin=MARGIN, presence=(kept, in_ref)).chosen
        if mode == "global":
            return float(test[1][:, chosen["all"], :].mean()), None
        return float(np.mean([test[0][:, chosen[str(c)], k].mean() for k, c in enumerate(labels)])), None
    if mode == "global":
        p = selection_probabilities(_private_global_utility(every, kept, in_ref) - penalty, epsilon=eps,
                                    sensitivity=1 / n)
        dice = test[1].mean(axis=(0, 2))
        return float(p @ dice), float(p[dice < dice[0]].sum())
    per_class, worse = [], None
    for k in range(len(labels)):
        p = selection_probabilities(alone[:, :, k].mean(axis=0) - penalty, epsilon=eps / len(labels),
                                    sensitivity=1 / n)
        dice = test[0][:, :, k].mean(axis=0)
        per_class.append(p @ dice)
        worse = float(p[dice < dice[0]].sum()) if len(labels) == 1 else None
    return float(np.mean(per_class)), worse


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--epsilons", nargs="+", type=float, default=[0.1, 0.5, 1.0, 2.0, 4.0, 8.0])
    ap.add_argument("--modes", nargs="+", default=["global", "adaptive"])
    ap.add_argument("-np", type=int, default=1)
    args = ap.parse_args(argv)
    f = run_folders(args.run_dir)
    cands, val, labels = scores(f["validation"], f["gt"], f["model"], args.np)
    _, test, _ = scores(f["test"], f["test_labels"], f["model"], args.np)
    none = float(test[1][:, 0, :].mean())
    print(f"{len(cands)} candidates, {val[0].shape[0]} validation cases, {test[0].shape[0]} test cases; "
          f"test Dice without refinement {none:.4f}")
    print("| mode | ε_select | expected test Dice | gain over none | share of the non-private gain | P(below none) |")
    print("|---|---|---|---|---|---|")
    for mode in args.modes:
        best, _ = expected(mode, val, test, None, labels, cands)
        print(f"| {mode} | not private (argmax) | {best:.4f} | {best - none:+.4f} | 1 | – |")
        for eps in args.epsilons:
            e, worse = expected(mode, val, test, eps, labels, cands)
            share = (e - none) / (best - none) if best != none else float("nan")
            below = "–" if worse is None else f"{worse:.2f}"
            print(f"| {mode} | {eps:g} | {e:.4f} | {e - none:+.4f} | {share:.2f} | {below} |")


if __name__ == "__main__":
    main()
