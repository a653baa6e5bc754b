"""What of a trained DP model folder may leave it (nnUNetv2_dp_export): the files, cleaned copies, what stays.

Releasable (docs/invariants.md, invariant 7): per fold checkpoint_final.pth (checkpoint_best.pth on request), privacy.json and
dp_config.json; per model plans.json and dataset.json; a DP-Morph postprocessing.pkl and postprocessing.json. A
checkpoint that still holds nnU-Net's logger (written by an older nnunet-dp) and a postprocessing.json that lists
validation scores go into the zip as cleaned copies; the user's files are only read.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from typing import Any

from nnunet_dp.nnunet import checkpoints

FOLD_FILES: tuple[str, ...] = ("checkpoint_final.pth", "privacy.json", "dp_config.json")
BEST_FILE = "checkpoint_best.pth"
MODEL_FILES: tuple[str, ...] = ("plans.json", "dataset.json")
PP_FILES: tuple[str, ...] = ("postprocessing.pkl", "postprocessing.json")
# postprocessing.json: what a release keeps (nnU-Net's own summary and DP-Morph's Dice tables are validation scores)
PP_KEEP: tuple[str, ...] = ("dp_morph", "postprocessing_fns", "postprocessing_kwargs")
PP_SCORES: tuple[str, ...] = ("choice_utility", "dice_before", "dice_after", "candidate_dice", "excluded_candidates")


@dataclass(frozen=True)
class Entry:
    """One file of the zip: `data` (a cleaned copy of `source`, or a file made here) or else `source` as it is."""

    arcname: str
    source: str | None = None
    data: bytes | None = None
    note: str = ""


@dataclass(frozen=True)
class Model:
    """Where the chosen model lives: absolute folders and their names in the zip (relative to nnUNet_results)."""

    results: str
    model_dirs: tuple[str, ...]
    fold_dirs: tuple[str, ...]
    folds: tuple[int | str, ...]

    def arc(self, path: str) -> str:
        return os.path.relpath(path, self.results).replace(os.sep, "/")


def release_postprocessing_json(summary: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """postprocessing.json without validation scores: (the copy for the zip, the entries left out)."""
    out = {k: v for k, v in summary.items() if k in PP_KEEP}
    removed = [k for k, v in summary.items() if k not in PP_KEEP and v is not None]
    record = out.get("dp_morph")
    if isinstance(record, dict):
        out["dp_morph"] = {k: v for k, v in record.items() if k not in PP_SCORES}
        removed += [f"dp_morph.{k}" for k in PP_SCORES if k in record]
    return out, removed


def postprocessing_files(folder: str, arcdir: str) -> list[Entry]:
    """postprocessing.pkl as it is and postprocessing.json without scores (a non-private choice lists its Dice)."""
    out = []
    for name in PP_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if name == "postprocessing.pkl":
            out.append(Entry(f"{arcdir}/{name}", path))
            continue
        with open(path) as f:
            summary = json.load(f)
        clean, removed = release_postprocessing_json(summary if isinstance(summary, dict) else {})
        note = f"cleaned copy: left out {', '.join(removed)} (validation scores without noise)" if removed else ""
        out.append(Entry(f"{arcdir}/{name}", path, json.dumps(clean, indent=2).encode() if removed else None, note))
    return out


def checked_checkpoint(entry: Entry) -> Entry:
    """The checkpoint as it is, or a copy made by checkpoints.for_release when it holds unnoised statistics."""
    import torch

    ckpt = torch.load(entry.source, map_location="cpu", weights_only=False)
    problems = checkpoints.unreleasable(ckpt)
    if not problems:
        return entry
    buffer = io.BytesIO()
    torch.save(checkpoints.for_release(ckpt), buffer)
    return Entry(entry.arcname, entry.source, buffer.getvalue(),
                 f"cleaned copy (written by an older version): left out {', '.join(problems)}; {entry.source} unchanged")


def _left_out_key(parts: list[str], chosen_fold: bool) -> str:
    """A file of a model folder, or the folder that holds it: a fold not chosen, a chosen fold's validation/."""
    if len(parts) > 1 and not chosen_fold:
        return parts[0] + "/"
    return "/".join(parts[:2]) + "/" if len(parts) > 2 else "/".join(parts)


def left_out(model: Model, postprocessing: str | None, packed: set[str]) -> list[str]:
    """What the zip does not hold of the model folders and the postprocessing folder (folders summarised)."""
    counts: dict[str, int] = {}
    for root in model.model_dirs:
        for dirpath, _, names in os.walk(root):
            for path in (os.path.abspath(os.path.join(dirpath, n)) for n in names if n):
                parts = os.path.relpath(path, root).split(os.sep)
                if path not in packed:
                    key = f"{model.arc(root)}/{_left_out_key(parts, os.path.join(root, parts[0]) in model.fold_dirs)}"
                    counts[key] = counts.get(key, 0) + 1
    if postprocessing and not any(os.path.abspath(postprocessing).startswith(os.path.abspath(m) + os.sep)
                                  for m in model.model_dirs):
        for entry in sorted(os.scandir(postprocessing), key=lambda e: e.name):
            if entry.is_file() and os.path.abspath(entry.path) not in packed:
                counts[entry.path] = 1
    return [k + (f" ({n} files)" if k.endswith("/") else "") for k, n in counts.items()]
