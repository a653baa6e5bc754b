"""nnUNetv2_dp_experiment, the public model alone: the model of the public pretraining (--public-fraction), with no
training on the private cases at all, scored exactly as every run is: its predictions of the private validation cases
(fold 0) choose DP-Morph, its predictions of the test cases are refined with that choice and scored with nnU-Net's
evaluation. Its row says what the DP runs start from; their gain over it is what they learned from the private cases
(with an in-distribution public part, the public model alone can already be close to the non-private reference).

Without refinement it spends no privacy on the private cases: ε = 0 for them. Its DP-Morph choice reads the private
validation cases' labels, like every run's choice: with the private selection (the default) its refined rows carry
ε = ε_select alone (no training on the private cases), with --dpmorph-selection nonprivate they read "selection not
private". Predictions use nnU-Net's nnUNetv2_predict_from_modelfolder (default TTA, checkpoint_final), as
nnUNetv2_predict does for the runs.

When the public model's labels differ from the private dataset's (label shift, e.g. whole hippocampus -> anterior and
posterior), its predictions are scored with the private labels as they are: that is what a user without private
training has (a class it never predicts scores 0); no DP-Morph is chosen for it (a class-wise choice needs the
private classes), and its result says so in `labels`.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from os.path import dirname, join
from typing import Any

from nnunet_dp.experiment.aggregate import PUBLIC
from nnunet_dp.experiment.dpmorph import evaluate, refine_all, validation_dice
from nnunet_dp.experiment.plan import link_test_cases
from nnunet_dp.experiment.pretrain import PUBLIC_FOLD, PUBLIC_TRAINER, PublicPretraining
from nnunet_dp.experiment.run import RESULT_JSON, Context, predicted, run_command

PUBLIC_RULE = PUBLIC  # the `rule` of its result.json and results rows
PUBLIC_RUN = "public_alone"  # its folder under OUT/runs and its `run`
LABEL = "public model alone"


@dataclass(frozen=True)
class PublicAlone:
    """What the step needs besides the runs' Context: the public pretraining, the private validation cases (fold 0)
    and the dataset's file ending."""

    pretraining: PublicPretraining
    val_cases: tuple[str, ...]
    file_ending: str

    @property
    def model(self) -> str:
        """The public model's nnU-Net model folder (plans.json, dataset.json, fold_all)."""
        return dirname(dirname(self.pretraining.checkpoint))


def run_dir(ctx: Context) -> str:
    return join(ctx.out, "runs", PUBLIC_RUN)


def predict(ctx: Context, model: str, images: str, out: str, log: str) -> str:
    """nnUNetv2_predict_from_modelfolder -f all of the public model on `images` (skipped when `out` holds them)."""
    if not predicted(images, out):
        run_command(["nnUNetv2_predict_from_modelfolder", "-i", images, "-o", out, "-m", model, "-f", PUBLIC_FOLD,
                     "-device", ctx.device, "-npp", "1", "-nps", "1"], ctx.env, log)
    return out


def execute(ctx: Context, step: PublicAlone) -> dict[str, Any]:
    """Predict the validation and test cases with the public model, choose DP-Morph on validation, apply it to test,
    score; returns and writes result.json (its presence marks the step finished)."""
    out_dir, model, data = run_dir(ctx), step.model, step.pretraining.data
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    log = join(out_dir, "log.txt")
    images = join(out_dir, "validation_images")
    link_test_cases(join(data.raw, data.private), list(step.val_cases), step.file_ending, images,
                    join(out_dir, "validation_labels"))
    validation = predict(ctx, model, images, join(out_dir, "validation"), log)
    private_json = join(ctx.preprocessed, ctx.dataset, "dataset.json")
    ours, theirs = label_names(join(model, "dataset.json")), label_names(private_json)
    scoring = None if ours == theirs else private_json
    evaluate(validation, ctx.gt_segmentations, model, ctx.num_processes, scoring)  # validation/summary.json
    test_none = predict(ctx, model, ctx.test_images, join(out_dir, "test", "none"), log)
    scores = {"none": evaluate(test_none, ctx.test_labels, model, ctx.num_processes, scoring)}
    choices, selection = {}, {}
    if scoring is None:
        choices, refined, selection = refine_all(ctx, validation, model, test_none, join(out_dir, "test"), None,
                                                 "none")
        scores.update(refined)
    val_dice = validation_dice(validation, join(out_dir, "test"), tuple(scores))
    result = {"run": PUBLIC_RUN, "rule": PUBLIC_RULE, "target_epsilon": None, "trainer": PUBLIC_TRAINER,
              "cell": PUBLIC_RUN, "repeat": None, "levers": "n/a", "plans": "nnUNetPlans", "pretrained": None,
              "epsilon": None, "delta": None, "noise_multiplier": None, "steps": 0, "status": "no private training",
              "initial_lr": None, "lr_used": None, "scores": scores, "dpmorph_choice": choices,
              "dpmorph_selection": ctx.selection.record(), "selection": selection,
              "validation_dice_mean": val_dice["none"], "validation_dice": val_dice, "train_seconds": 0.0,
              "seconds": time.time() - t0, "model_folder": model, "checkpoint": step.pretraining.checkpoint,
              "labels": "same as the private dataset" if scoring is None else
              (f"public {ours}, private {theirs}: scored on the private labels as predicted (a class it never "
               "predicts scores 0), no DP-Morph")}
    with open(join(out_dir, RESULT_JSON), "w") as f:
        json.dump(result, f, indent=2)
    return result


def label_names(dataset_json_file: str) -> dict[str, Any]:
    """The `labels` of a dataset.json."""
    with open(dataset_json_file) as f:
        return json.load(f)["labels"]


def failed_result(reason: str, seconds: float, log: str) -> dict[str, Any]:
    """The result of a failed step: no scores, its reason and log (the report marks it, a rerun retries it)."""
    return {"run": PUBLIC_RUN, "rule": PUBLIC_RULE, "target_epsilon": None, "trainer": PUBLIC_TRAINER,
            "cell": PUBLIC_RUN, "repeat": None, "levers": "n/a", "status": "failed", "error": reason, "log": log,
            "epsilon": None, "noise_multiplier": None, "steps": 0, "initial_lr": None, "scores": {},
            "train_seconds": 0.0, "seconds": seconds}
