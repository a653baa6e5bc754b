"""nnUNetv2_dp_audit one-run: the one-run canary audit (nnunet_dp.audit) at the mechanism settings of a DP fold.

The rule, clip norm, rule constant, sigma, q, steps, delta and accountant come from the fold's privacy.json (what the
run actually used and spent; the rule constant from the fold's dp_config.json where an older privacy.json lacks it);
m Dirac gradient canaries go through DPRun.private_step with them, each of the norm whose scaled norm reaches the
sensitivity under that rule and constant (nnunet_dp.audit.canaries.canary_norm). The audit runs no
nnU-Net code and reads no image: it checks the mechanism, not nnU-Net's data path (see COVERS / NOT_COVERED).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from os.path import join
from typing import Any

from tqdm import tqdm

from nnunet_dp.audit import run_one_run_audit
from nnunet_dp.errors import DPConfigError
from nnunet_dp.nnunet.report import CONFIG_JSON, write_json_atomic
from nnunet_dp.tools.audit.locate import AuditInputError, load_json, locate_fold, output_folder
from nnunet_dp.tools.audit.outputs import canary_histogram

AUDIT_JSON = "audit_one_run.json"
AUDIT_PNG = "audit_one_run.png"
COVERS = ("The product's DP-SGD mechanism at this run's settings: the per-case scaling rule (and its constant), the sum "
          "over cases, one Gaussian noise draw per step, the division by the expected batch size qN, Poisson sampling "
          "and the accountant at the run's sigma, q and number of steps (a canary-only run through "
          "DPRun.private_step).")
NOT_COVERED = ("nnU-Net's data path is NOT audited: how a case becomes a gradient (patches, augmentation, the "
               "per-case gradient engine on the real network, the loss), the trainer's hooks, checkpoints and "
               "everything privacy.json lists under 'assumptions'. A passing audit is evidence that the mechanism is "
               "not broken, not a proof of privacy; epsilon_lower_bound is a lower bound at the stated confidence "
               "and is expected to be far below epsilon (the audit is one run with m canaries).")
_FIELDS = ("rule", "clip_norm", "noise_multiplier", "sampling_rate", "steps", "delta", "accountant", "epsilon")
CONSTANT_KEYS = {"autos": "autos_gamma", "nsgd": "nsgd_r", "psac": "psac_r"}  # the settings' names (config.py)


def read_mechanism(fold_folder: str) -> tuple[str, dict[str, Any]]:
    """(path, privacy.json) of a DP fold; a fold without privacy.json (not a DP training) is refused."""
    path = join(fold_folder, "privacy.json")
    try:
        rep = load_json(path, "privacy.json")
    except AuditInputError:
        raise AuditInputError(f"no readable privacy.json in {fold_folder}: 'one-run' audits the mechanism of a DP "
                              "training (a fold folder of nnUNetTrainerDP or another DP trainer, which writes "
                              "privacy.json). For any model, DP or not, use 'nnUNetv2_dp_audit mia'") from None
    missing = [k for k in _FIELDS if k not in rep]
    if missing:
        raise AuditInputError(f"{path} lacks {', '.join(missing)}: it was not written by an nnunet-dp trainer")
    if not isinstance(rep["steps"], int) or rep["steps"] < 1:
        raise AuditInputError(f"{path}: steps = {rep['steps']!r}; the run took no private step, nothing to audit "
                              "(train first)")
    return path, {**rep, "rule_constant": rule_constant(rep, fold_folder)}


def rule_constant(rep: dict[str, Any], fold_folder: str) -> Any:
    """The constant the fold's rule ran with: privacy.json's rule_constant, else (an older privacy.json) the fold's
    dp_config.json setting of that rule (autos_gamma, nsgd_r, psac_r); never the rule's default, which may differ
    from what the run used. flat has none (a value there is refused later by the audit's own check)."""
    if rep.get("rule_constant") is not None or rep["rule"] not in CONSTANT_KEYS:
        return rep.get("rule_constant")
    key, config = CONSTANT_KEYS[rep["rule"]], join(fold_folder, CONFIG_JSON)
    settings = load_json(config, CONFIG_JSON) if os.path.isfile(config) else {}
    if settings.get(key) is None:
        raise AuditInputError(f"privacy.json in {fold_folder} has rule {rep['rule']} but no rule_constant, and "
                              f"{CONFIG_JSON} there has no {key}: the audit needs the constant the run used. Add "
                              f'"rule_constant": <the {key} of the training> to privacy.json')
    return settings[key]


def audit_fold(rep: dict[str, Any], *, num_canaries: int, confidence: float) -> dict[str, Any]:
    """run_one_run_audit at privacy.json's settings, with a progress bar over the steps."""
    kwargs = {"rule": rep["rule"], "clip_norm": rep["clip_norm"], "noise_multiplier": rep["noise_multiplier"],
              "sampling_rate": rep["sampling_rate"], "steps": rep["steps"], "delta": rep["delta"],
              "accountant": rep["accountant"], "rule_constant": rep.get("rule_constant")}
    with tqdm(total=rep["steps"], desc=f"one-run audit, {num_canaries} canaries", unit="step", file=sys.stdout) as bar:
        try:
            return run_one_run_audit(**kwargs, num_canaries=num_canaries, confidence=confidence, on_step=bar.update,
                                     return_scores=True)
        except DPConfigError as e:
            if e.key in kwargs:
                raise AuditInputError(f"privacy.json has {e.key} = {e.value!r}, which the audit cannot use: "
                                      f"{e.allowed}") from None
            raise AuditInputError(f"--{e.key.replace('num_', '')} = {e.value!r} is not allowed: {e.allowed}") from None


def summarise(result: dict[str, Any], rep: dict[str, Any], privacy_path: str) -> dict[str, Any]:
    """audit_one_run.json: the bound next to the accountant's epsilon, and what the audit covers."""
    claimed = rep["epsilon"]
    matches = isinstance(claimed, (int, float)) and math.isclose(result["epsilon"], claimed, rel_tol=1e-6,
                                                                  abs_tol=1e-9)
    kept = {k: v for k, v in result.items() if k not in ("scores", "included")}
    return {"audit": "one-run canary audit (Steinke, Nasr, Jagielski, NeurIPS 2023; white-box Dirac gradient "
                     "canaries, Appendix D estimator)",
            "epsilon_lower_bound": result["epsilon_lower_bound"], "epsilon": result["epsilon"],
            "delta": result["delta"], "num_canaries": result["num_canaries"], "num_guesses": result["num_guesses"],
            "num_correct": result["num_correct"], "confidence": result["confidence"],
            "consistent": result["epsilon_lower_bound"] <= result["epsilon"],
            "epsilon_privacy_json": claimed, "epsilon_matches_privacy_json": matches, **kept,
            "privacy_json": privacy_path, "covers": COVERS, "not_covered": NOT_COVERED,
            "private_data": "none: the canaries are synthetic; this file and the plot may be released"}


def render(s: dict[str, Any]) -> str:
    lines = [(f"one-run audit of {s['rule']} (C = {s['clip_norm']:g}), sigma = {s['noise_multiplier']:.4g}, "
             f"q = {s['sampling_rate']:.4g}, {s['steps']} steps, delta = {s['delta']:g} ({s['accountant']})"),
             (f"  canaries of norm {s['canary_norm']:.6g}: scaled norm {s['canary_scaled_norm']:.6g} of the "
              f"sensitivity {s['sensitivity']:g} under {s['rule']} (rule constant {s['rule_constant']})"),
             (f"  epsilon (accountant) = {s['epsilon']:.4f}   epsilon_lower_bound ({s['confidence']:.0%}) = "
             f"{s['epsilon_lower_bound']:.4f}   ({s['num_correct']} of {s['num_guesses']} guesses correct, "
             f"{s['num_canaries']} canaries)")]
    if not s["epsilon_matches_privacy_json"]:
        lines.append(f"  NOTE: privacy.json's epsilon is {s['epsilon_privacy_json']!r}, not the accountant's value "
                     "for these settings: the run's ledger has several segments (ledger_history) or was edited")
    lines.append("  consistent: epsilon_lower_bound <= epsilon" if s["consistent"] else
                 "  FAILED: epsilon_lower_bound > epsilon: the mechanism leaks more than its accountant claims "
                 "(or a 1-in-20 false alarm at 95 %: run it again)")
    lines += [f"  covers: {COVERS}", f"  NOT covered: {NOT_COVERED}"]
    return "\n".join(lines)


def run_one_run(args: argparse.Namespace) -> dict[str, Any]:
    fold = locate_fold(args.d, args.c, args.f, args.tr, args.p)
    privacy_path, rep = read_mechanism(fold.fold_folder)
    out = output_folder(args.o, fold.fold_folder)
    result = audit_fold(rep, num_canaries=args.canaries, confidence=args.confidence)
    where = os.path.relpath(privacy_path, os.path.dirname(os.path.dirname(fold.model_folder)))  # no local paths
    summary = {**summarise(result, rep, where), "files": [AUDIT_JSON, AUDIT_PNG]}
    canary_histogram(join(out, AUDIT_PNG), result["scores"], result["included"],
                     title=f"{fold.trainer} fold {fold.fold}: eps_lower = {summary['epsilon_lower_bound']:.3f}, "
                           f"eps = {summary['epsilon']:.3f}")
    write_json_atomic(join(out, AUDIT_JSON), summary)
    print(render(summary))
    print(f"Written to {out}: {AUDIT_JSON}, {AUDIT_PNG}")
    return summary
