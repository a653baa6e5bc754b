"""nnUNetv2_dp_audit: evidence for a trained fold's privacy. Two subcommands:

  mia      membership inference on any trained nnU-Net fold (DP or not): the seed paper's loss-threshold attack and a
           per-case Dice attack, training cases (members) against held-out cases (non-members). Its files (JSON,
           CSV, plot) are private: unnoised statistics of the training cases.
  one-run  the one-run canary audit (Steinke, Nasr, Jagielski, NeurIPS 2023) of a DP fold's mechanism at the
           settings in its privacy.json: a lower bound on epsilon to hold against the accountant's epsilon.
"""

from __future__ import annotations

import argparse
import sys
from os.path import isdir, join
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from nnunet_dp.audit.mia import attack_metrics, calibration_split
from nnunet_dp.nnunet.report import write_json_atomic
from nnunet_dp.tools.audit.locate import AuditInputError, env_folder, locate_fold, output_folder
from nnunet_dp.tools.audit.outputs import roc_plot, write_cases_csv

MIA_JSON, MIA_CSV, MIA_PNG = "audit_mia.json", "audit_mia_cases.csv", "audit_mia_roc.png"


RELEASE = "private: statistics of the training cases"  # the JSON's "release" field, the plot's caption


PRIVACY_NOTE = (f"{MIA_CSV} names the training cases (members) of this fold and their losses: it is private (it "
                f"reveals membership outright). Do not release it. {MIA_JSON} and {MIA_PNG} hold no case id but are "
                "unnoised statistics of the members' losses and Dice (ROC curves, AUC, mean losses, thresholds): "
                "private too, not covered by the run's epsilon. Do not release them either.")


def score_all(args: argparse.Namespace, fold: Any, preprocessed: str) -> tuple[list[dict[str, Any]], Any]:
    """Every member's and non-member's loss and Dice, with a progress bar over cases."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from nnunet_dp.tools.audit import membership as mb

    if args.device == "cuda" and not torch.cuda.is_available():
        raise AuditInputError("-device cuda: CUDA is not available here; use -device cpu")
    predictor = mb.load_predictor(fold, args.chk, torch.device(args.device), args.tta)
    folder = mb.data_folder(preprocessed, predictor)
    cases = mb.case_sets(preprocessed, args.f, infer_dataset_class(folder).get_identifiers(folder), args.nonmembers)
    dataset = infer_dataset_class(folder)(folder, cases.members + cases.nonmembers)
    loss = mb.make_loss(predictor.label_manager)
    rows = []
    labelled = [(c, True) for c in cases.members] + [(c, False) for c in cases.nonmembers]
    for case_id, member in tqdm(labelled, desc="mia: cases", unit="case", file=sys.stdout):
        value, dice = mb.score_case(predictor, dataset, case_id, loss)
        rows.append({"case_id": case_id, "member": member, "loss": value, "dice": dice})
    return rows, cases


def mia_report(args: argparse.Namespace, fold: Any, rows: list[dict[str, Any]], cases: Any) -> dict[str, Any]:
    from nnunet_dp.tools.audit.membership import DICE_DEFINITION, LOSS_DEFINITION

    ids = [r["case_id"] for r in rows]
    member = np.array([r["member"] for r in rows], dtype=bool)
    calibration = calibration_split(ids, member, seed=args.seed)
    scores = {"loss": attack_metrics([-r["loss"] for r in rows], member, calibration),
              "dice": attack_metrics([r["dice"] for r in rows], member, calibration)}
    top = {k: scores["loss"][k] for k in ("auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr", "fpr_resolution",
                                          "threshold_attack")}
    return {"release": RELEASE,
            "attack": "membership inference: loss threshold (score -loss, the seed paper's attack) and per-case Dice "
                      "(score dice); higher score = guessed member",
            "num_members": int(member.sum()), "num_nonmembers": int((~member).sum()), **top,
            "scores": scores, "members_source": cases.members_source, "nonmembers_source": cases.nonmembers_source,
            "dataset": fold.dataset, "configuration": fold.configuration, "trainer": fold.trainer,
            "plans": fold.plans, "fold": fold.fold, "checkpoint": args.chk, "mirroring": args.tta,
            "calibration_seed": args.seed, "loss_definition": LOSS_DEFINITION, "dice_definition": DICE_DEFINITION,
            "mean_loss": {"members": float(np.mean([r["loss"] for r in rows if r["member"]])),
                          "nonmembers": float(np.mean([r["loss"] for r in rows if not r["member"]]))},
            "privacy_note": PRIVACY_NOTE, "files": [MIA_JSON, MIA_CSV, MIA_PNG]}


def render_mia(r: dict[str, Any]) -> str:
    lines = [(f"membership inference on {r['dataset']} {r['configuration']} {r['trainer']} fold {r['fold']} "
             f"({r['checkpoint']}): {r['num_members']} members, {r['num_nonmembers']} non-members")]
    for name, s in r["scores"].items():
        t = s["threshold_attack"]
        attack = (f"threshold attack balanced accuracy {t['balanced_accuracy']:.3f} (accuracy {t['accuracy']:.3f})"
                  if t["balanced_accuracy"] is not None else f"threshold attack: {t['reason']}")
        lines.append(f"  {name:5}: AUC {s['auc']:.3f}, TPR@1%FPR {s['tpr_at_1pct_fpr']:.3f}, TPR@0.1%FPR "
                     f"{s['tpr_at_0.1pct_fpr']:.3f}; {attack}")
    if r["fpr_resolution"] > 0.001:
        lines.append(f"  (with {r['num_nonmembers']} non-members the smallest non-zero FPR is "
                     f"{r['fpr_resolution']:.3g}: TPR at a lower FPR is the TPR at FPR 0)")
    lines.append(f"  AUC 0.5 = no evidence of membership. {PRIVACY_NOTE}")
    return "\n".join(lines)


def run_mia(args: argparse.Namespace) -> dict[str, Any]:
    preprocessed = env_folder("nnUNet_preprocessed")
    fold = locate_fold(args.d, args.c, args.f, args.tr, args.p)
    if not isdir(join(preprocessed, fold.dataset)):
        raise AuditInputError(f"-d {args.d}: {fold.dataset} is not in nnUNet_preprocessed = {preprocessed}; the attack "
                              "reads the preprocessed cases (nnUNetv2_plan_and_preprocess)")
    out = output_folder(args.o, fold.fold_folder)
    rows, cases = score_all(args, fold, join(preprocessed, fold.dataset))
    report = mia_report(args, fold, rows, cases)
    write_cases_csv(join(out, MIA_CSV), rows)
    roc_plot(join(out, MIA_PNG), report["scores"], title=f"{fold.trainer} fold {fold.fold}",
             caption=f"{RELEASE} (unnoised member losses; not covered by epsilon): do not release")
    write_json_atomic(join(out, MIA_JSON), report)
    print(render_mia(report))
    print(f"Written to {out}: {MIA_JSON}, {MIA_CSV}, {MIA_PNG}: all three {RELEASE}, do not release them")
    return report
