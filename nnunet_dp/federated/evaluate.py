"""Dice of a global model on held-out test cases (experiments only): nnU-Net's own predictor loads the model folder
the server wrote (so it is checked to be a working nnU-Net model) and predicts each preprocessed test case with its
sliding window; Dice per foreground label against the preprocessed label map, averaged over labels and cases.
The test cases belong to no site; this measurement never enters a federation."""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence

import numpy as np
import torch


def dice(pred: np.ndarray, ref: np.ndarray, labels: Sequence[int]) -> float:
    """Mean over `labels` of 2|P∩R| / (|P| + |R|) (1 when both are empty)."""
    scores = []
    for label in labels:
        p, r = pred == label, ref == label
        denom = p.sum() + r.sum()
        scores.append(1.0 if denom == 0 else 2.0 * float((p & r).sum()) / float(denom))
    return float(np.mean(scores))


def held_out_dice(model_folder: str, preprocessed_data: str, cases: Sequence[str], device: str = "cpu") -> float:
    """Mean Dice of the model in `model_folder` (fold 'all') over `cases` of the preprocessed data folder."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    with contextlib.redirect_stdout(sys.stderr):
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                    device=torch.device(device), verbose=False, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(model_folder, use_folds=("all",),
                                                       checkpoint_name="checkpoint_final.pth")
    labels = list(predictor.label_manager.foreground_labels)
    dataset = infer_dataset_class(preprocessed_data)(preprocessed_data, list(cases))
    scores = []
    for case in cases:
        data, seg, _, _ = dataset.load_case(case)
        with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
            logits = predictor.predict_sliding_window_return_logits(torch.from_numpy(np.asarray(data)).float())
        pred = logits.argmax(0).cpu().numpy()
        scores.append(dice(pred, np.asarray(seg)[0], labels))
    return float(np.mean(scores)) if scores else float("nan")
