"""Membership-inference metrics (pure numpy/scipy): ROC curve, AUC, TPR at a low FPR, and the threshold attack.

Convention: a higher score means "member". The loss-threshold attack of the seed paper scores a case by -loss (members
were fitted, so their loss is lower); the per-case score attack by its Dice. References:
- ROC curve: one point per distinct score (descending), predicted "member" when score >= threshold, starting at
  (0, 0) with threshold +inf; identical to sklearn.metrics.roc_curve(..., drop_intermediate=False).
- AUC: the Mann-Whitney statistic P[s_member > s_nonmember] + P[s_member = s_nonmember] / 2, from average ranks
  (ties count one half), identical to sklearn.metrics.roc_auc_score.
- TPR at FPR: the largest TPR of an ROC point whose FPR is at most the target (Carlini et al., "Membership inference
  attacks from first principles", S&P 2022: the low-FPR regime), no interpolation. With n non-members the smallest
  non-zero FPR is 1/n: below it the value is the TPR at FPR 0.
- Threshold attack: the threshold is chosen on a calibration split (half of each group, a seeded split of the case
  ids: the attacker's randomness, not private) to maximise balanced accuracy (TPR + TNR) / 2, which is 0.5 for a
  guess whatever the group sizes, and evaluated on the other half.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import rankdata

from nnunet_dp.errors import DPConfigError

_SOURCE = "the membership-inference metrics' arguments"
LOW_FPRS: dict[str, float] = {"tpr_at_1pct_fpr": 0.01, "tpr_at_0.1pct_fpr": 0.001}


def check_scores(scores: Any, is_member: Any) -> tuple[np.ndarray, np.ndarray]:
    """Scores as a finite float64 vector and membership as a bool vector of the same length, both groups present."""
    s = np.asarray(scores, dtype=np.float64)
    m = np.asarray(is_member)
    if s.ndim != 1 or not np.all(np.isfinite(s)):
        raise DPConfigError("scores", f"array of shape {s.shape}", "a 1-D array of finite numbers", source=_SOURCE)
    if m.shape != s.shape or m.dtype != np.bool_:
        raise DPConfigError("is_member", f"{m.dtype} array of shape {m.shape}",
                            f"a boolean array of the scores' shape {s.shape}", source=_SOURCE)
    if m.all() or not m.any():
        raise DPConfigError("is_member", f"{int(m.sum())} members of {m.size}",
                            "at least one member and one non-member", source=_SOURCE)
    return s, m


def roc_curve(scores: Any, is_member: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds): one point per distinct score, descending, after a first point (0, 0) at +inf."""
    s, m = check_scores(scores, is_member)
    order = np.argsort(-s, kind="stable")
    s, m = s[order], m[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # the last index of each run of equal scores
    tps = np.cumsum(m)[last]
    fps = last + 1 - tps
    fpr = np.r_[0.0, fps / (~m).sum()]
    tpr = np.r_[0.0, tps / m.sum()]
    return fpr, tpr, np.r_[np.inf, s[last]]


def roc_auc(scores: Any, is_member: Any) -> float:
    """Mann-Whitney AUC with ties counted one half: (rank sum of members - n1 (n1 + 1) / 2) / (n1 n0)."""
    s, m = check_scores(scores, is_member)
    n1, n0 = int(m.sum()), int((~m).sum())
    return float((rankdata(s)[m].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def tpr_at_fpr(scores: Any, is_member: Any, max_fpr: float) -> float:
    """The largest TPR among ROC points with FPR <= max_fpr (at least the TPR at FPR 0)."""
    if not isinstance(max_fpr, (int, float)) or isinstance(max_fpr, bool) or not 0 <= max_fpr <= 1:
        raise DPConfigError("max_fpr", max_fpr, "a number in [0, 1]", source=_SOURCE)
    fpr, tpr, _ = roc_curve(scores, is_member)
    return float(tpr[fpr <= max_fpr + 1e-12].max())


def balanced_accuracy(predicted: np.ndarray, is_member: np.ndarray) -> float:
    """(TPR + TNR) / 2 of boolean guesses."""
    return 0.5 * (float(predicted[is_member].mean()) + float((~predicted[~is_member]).mean()))


def choose_threshold(scores: Any, is_member: Any) -> float:
    """The threshold t ("member" iff score >= t) of highest balanced accuracy on these (calibration) scores: +inf,
    a midpoint between two consecutive distinct scores, or -inf; ties go to the higher threshold."""
    fpr, tpr, thresholds = roc_curve(scores, is_member)
    best = int(np.argmax(tpr - fpr))  # balanced accuracy = (1 + tpr - fpr) / 2; argmax keeps the first maximum
    if best == 0:
        return math.inf
    lower = thresholds[best + 1] if best + 1 < thresholds.size else -math.inf
    return float(0.5 * (thresholds[best] + lower)) if math.isfinite(lower) else -math.inf


def calibration_split(case_ids: Sequence[str], is_member: Any, *, seed: int) -> np.ndarray:
    """A boolean mask: floor(n/2) cases of each group (members, non-members) for calibration, chosen by a seeded
    permutation of the group's sorted case ids (so the split depends on the ids, not on their order here)."""
    ids = [str(c) for c in case_ids]
    m = np.asarray(is_member, dtype=bool)
    if len(ids) != m.size:
        raise DPConfigError("case_ids", f"{len(ids)} ids", f"one per score ({m.size})", source=_SOURCE)
    rng = np.random.default_rng(seed)
    mask = np.zeros(m.size, dtype=bool)
    for group in (True, False):
        idx = sorted(np.flatnonzero(m == group), key=lambda i: ids[i])
        chosen = rng.permutation(len(idx))[:len(idx) // 2]
        mask[[idx[i] for i in chosen]] = True
    return mask


def threshold_attack(scores: Any, is_member: Any, calibration: np.ndarray) -> dict[str, Any]:
    """Threshold chosen on the calibration cases, evaluated on the others; None-valued metrics with a reason when a
    group has fewer than 2 cases (no case of it left on one side)."""
    s, m = check_scores(scores, is_member)
    cal = np.asarray(calibration, dtype=bool)
    ev = ~cal
    counts = {"num_calibration": int(cal.sum()), "num_evaluation": int(ev.sum())}
    if not (m[cal].any() and (~m[cal]).any() and m[ev].any() and (~m[ev]).any()):
        return {"threshold": None, "accuracy": None, "balanced_accuracy": None, "tpr": None, "fpr": None, **counts,
                "reason": "needs at least 2 members and 2 non-members (one of each per half)"}
    t = choose_threshold(s[cal], m[cal])
    guess = s[ev] >= t
    return {"threshold": t if math.isfinite(t) else str(t), "accuracy": float((guess == m[ev]).mean()),
            "balanced_accuracy": balanced_accuracy(guess, m[ev]), "tpr": float(guess[m[ev]].mean()),
            "fpr": float(guess[~m[ev]].mean()), **counts}


def attack_metrics(scores: Any, is_member: Any, calibration: np.ndarray) -> dict[str, Any]:
    """AUC, TPR at 1 % and 0.1 % FPR, the ROC points and the threshold attack of one score."""
    s, m = check_scores(scores, is_member)
    fpr, tpr, _ = roc_curve(s, m)
    return {"auc": roc_auc(s, m), **{k: tpr_at_fpr(s, m, v) for k, v in LOW_FPRS.items()},
            "fpr_resolution": 1.0 / int((~m).sum()), "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
            "threshold_attack": threshold_attack(s, m, calibration)}


def mean_dice(predicted: np.ndarray, reference: np.ndarray, valid: np.ndarray | None = None) -> float:
    """Mean over classes (axis 0 of the boolean masks) of the hard Dice 2|P∩R| / (|P| + |R|), voxels outside `valid`
    ignored; a class absent from both counts 1 (nothing to find, nothing found)."""
    p, r = np.asarray(predicted, dtype=bool), np.asarray(reference, dtype=bool)
    if valid is not None:
        p, r = p & valid, r & valid
    axes = tuple(range(1, p.ndim))
    inter, total = (p & r).sum(axes), p.sum(axes) + r.sum(axes)
    return float(np.mean(np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)))
