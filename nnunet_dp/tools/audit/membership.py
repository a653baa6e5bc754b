"""nnUNetv2_dp_audit mia, the data path: which cases are members, and each case's loss and Dice under the model.

Members are the fold's training cases (splits_final.json of the preprocessed dataset, as nnU-Net's do_split reads
it); non-members the fold's validation cases, or the cases of --nonmembers. Each case is predicted whole, on the
preprocessed grid, by nnU-Net's own predictor (sliding window, Gaussian weighting, step 0.5; mirroring only with
--tta) from the fold's checkpoint, as nnUNetv2_predict builds the network (the run's plans.json and trainer class).
LOSS_DEFINITION and DICE_DEFINITION say what is computed per case.
"""
from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from os.path import isdir, isfile, join
from typing import Any

import numpy as np
import torch
from torch import nn

from nnunet_dp.audit.mia import mean_dice
from nnunet_dp.tools.audit.locate import AuditInputError, Fold, load_json

LOSS_DEFINITION = ("nnU-Net's Dice + CE loss as nnUNetTrainer._build_loss builds it (DC_and_CE_loss: soft Dice "
                   "without background, smooth 1e-5, + cross-entropy, weights 1 and 1; DC_and_BCE_loss for region "
                   "datasets; the dataset's ignore label) on the full-resolution output, evaluated on the whole "
                   "preprocessed case at once (one case: batch Dice = per-case Dice). The trainer averages the same "
                   "terms over patches and deep-supervision heads; a trainer with its own loss is not reproduced.")
DICE_DEFINITION = ("hard Dice of the predicted segmentation (argmax; sigmoid > 0.5 per region) against the "
                   "preprocessed reference, mean over foreground labels/regions, ignore-label voxels left out; a "
                   "class absent from both counts 1")


@dataclass(frozen=True)
class CaseSets:
    members: list[str]
    nonmembers: list[str]
    members_source: str
    nonmembers_source: str


def read_ids(path: str) -> list[str]:
    """Case ids from a JSON list or a text file with one id per line (blank lines and # comments skipped)."""
    if not isfile(path):
        raise AuditInputError(f"--nonmembers {path}: no such file; give a JSON list or a text file of case ids")
    if path.endswith(".json"):
        ids = load_json(path, "--nonmembers")
    else:
        with open(path) as f:
            ids = [line.split("#")[0].strip() for line in f]
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise AuditInputError(f"--nonmembers {path}: not a list of case ids (strings)")
    return [i for i in ids if i]


def case_sets(preprocessed: str, fold: int | str, available: list[str], nonmembers_file: str | None) -> CaseSets:
    """Members and non-members, each a sorted list of preprocessed case ids; every problem names its option."""
    if fold == "all":
        if nonmembers_file is None:
            raise AuditInputError("-f all: the model trained on every case; give held-out cases with --nonmembers "
                                  "FILE (preprocessed into the same folder after training)")
        nonmembers = read_ids(nonmembers_file)
        members = sorted(set(available) - set(nonmembers))
        sources = ("fold 'all': every preprocessed case not in --nonmembers", f"--nonmembers {nonmembers_file}")
    else:
        splits_file = join(preprocessed, "splits_final.json")
        splits = load_json(splits_file, "splits_final.json") if isfile(splits_file) else None
        if not isinstance(splits, list) or fold >= len(splits):
            n = len(splits) if isinstance(splits, list) else 0
            raise AuditInputError(f"-f {fold}: not among the {n} folds of {splits_file} (which nnU-Net writes when "
                                  "it trains the first fold)")
        members = sorted(splits[fold]["train"])
        nonmembers = read_ids(nonmembers_file) if nonmembers_file else sorted(splits[fold]["val"])
        sources = (f"splits_final.json fold {fold} 'train'",
                   f"--nonmembers {nonmembers_file}" if nonmembers_file else f"splits_final.json fold {fold} 'val'")
    overlap = sorted(set(members) & set(nonmembers))
    missing = sorted(set(members + nonmembers) - set(available))
    if overlap:
        raise AuditInputError(f"--nonmembers: {len(overlap)} case(s) are training cases of fold {fold}: "
                              f"{', '.join(overlap[:5])}")
    if missing:
        raise AuditInputError(f"{len(missing)} case(s) are not preprocessed: {', '.join(missing[:5])}; run "
                              "nnUNetv2_preprocess for them (or fix --nonmembers)")
    if not members or not nonmembers:
        raise AuditInputError(f"-f {fold}: {len(members)} members and {len(nonmembers)} non-members; the attack "
                              "needs at least one of each")
    return CaseSets(members, sorted(nonmembers), *sources)


def load_predictor(fold: Fold, checkpoint: str, device: torch.device, tta: bool) -> Any:
    """nnU-Net's predictor for this one fold, as nnUNetv2_predict builds it (the DP trainers made visible)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_dp.locations import trainer_folder

    if not isfile(join(fold.fold_folder, checkpoint)):
        have = sorted(f for f in os.listdir(fold.fold_folder) if f.endswith(".pth"))
        raise AuditInputError(f"-chk {checkpoint}: not in {fold.fold_folder}; checkpoints there: "
                              f"{', '.join(have) or 'none (training not finished?)'}")
    paths = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    os.environ["nnUNet_extTrainer"] = os.pathsep.join([trainer_folder(), *[p for p in paths if p != trainer_folder()]])
    with contextlib.redirect_stdout(io.StringIO()):
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=tta,
                                    perform_everything_on_device=device.type == "cuda", device=device,
                                    allow_tqdm=False)
        try:
            predictor.initialize_from_trained_model_folder(fold.model_folder, (fold.fold,), checkpoint)
        except RuntimeError as e:
            raise AuditInputError(f"-tr {fold.trainer}: the model cannot be rebuilt ({str(e).splitlines()[0]}); "
                                  "a custom trainer must be visible through nnUNet_extTrainer") from None
    if predictor.configuration_manager.previous_stage_name is not None:
        raise AuditInputError(f"-c {fold.configuration}: a cascade stage (it needs the previous stage's "
                              "predictions); audit the stages that read images only")
    return predictor


def data_folder(preprocessed: str, predictor: Any) -> str:
    folder = join(preprocessed, predictor.configuration_manager.data_identifier)
    if not isdir(folder):
        raise AuditInputError(f"no preprocessed data {folder}; run nnUNetv2_preprocess for this configuration")
    return folder


def make_loss(label_manager: Any) -> nn.Module:
    """nnUNetTrainer._build_loss without deep supervision, DDP or compile (batch Dice off: one case at a time)."""
    from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    if label_manager.has_regions:
        return DC_and_BCE_loss({}, {"batch_dice": False, "do_bg": True, "smooth": 1e-5, "ddp": False},
                               use_ignore_label=label_manager.ignore_label is not None,
                               dice_class=MemoryEfficientSoftDiceLoss)
    return DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=label_manager.ignore_label, dice_class=MemoryEfficientSoftDiceLoss)


def _region_masks(seg: torch.Tensor, regions: list) -> torch.Tensor:
    return torch.stack([torch.isin(seg, torch.as_tensor(r, dtype=seg.dtype).flatten()) for r in regions])


def case_loss_and_dice(logits: torch.Tensor, seg: torch.Tensor, label_manager: Any, loss: nn.Module
                       ) -> tuple[float, float]:
    """Loss and Dice of one case: logits (K, *spatial), seg (*spatial) with -1 (outside the crop) already 0."""
    lm, logits = label_manager, logits.float()
    ignore = lm.ignore_label
    if lm.has_regions:
        target = _region_masks(seg, lm.foreground_regions)
        if ignore is not None:
            target = torch.cat([target, (seg == ignore)[None]])
        pred, ref = torch.sigmoid(logits) > 0.5, _region_masks(seg, lm.foreground_regions)
    else:
        target = seg[None]
        labels = [int(v) for v in lm.foreground_labels]
        pred = torch.stack([logits.argmax(0) == v for v in labels])
        ref = torch.stack([seg == v for v in labels])
    value = float(loss(logits[None], target[None].to(logits.dtype if lm.has_regions else torch.long)))
    valid = None if ignore is None else (seg != ignore).numpy()
    return value, mean_dice(pred.numpy(), ref.numpy(), valid)


def score_case(predictor: Any, dataset: Any, case_id: str, loss: nn.Module) -> tuple[float, float]:
    """Predict one preprocessed case and return its (loss, dice)."""
    data, seg, _, _ = dataset.load_case(case_id)
    image = torch.from_numpy(np.asarray(data[:], dtype=np.float32))
    seg = torch.from_numpy(np.asarray(seg[:]).astype(np.int64))[0]
    seg[seg < 0] = 0  # nnU-Net's RemoveLabelTansform(-1, 0), as in training
    with torch.no_grad():
        logits = predictor.predict_logits_from_preprocessed_data(image).cpu()
        return case_loss_and_dice(logits, seg, predictor.label_manager, loss)
