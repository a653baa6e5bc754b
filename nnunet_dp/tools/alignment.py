"""nnUNetv2_dp_alignment: gradient alignment of every scaling rule on a trained (or freshly initialised) DP fold.

Draws Poisson batches of training cases through the trainer's own data pipeline (patches, augmentation, foreground
oversampling as in training), takes each case's gradient, and writes alignment.csv (one row per step and rule),
alignment_cases.csv (one row per case), summary.json and PNG plots. The output is computed from unnoised per-case
gradients: it is not covered by epsilon (see docs/alignment.md).

Longer than ~300 lines: the command's whole pipeline (locating the fold, rebuilding the trainer, drawing batches,
analysing each checkpoint, writing the outputs) in the order it runs; the metrics themselves are in the core
(nnunet_dp.alignment, nnunet_dp.alignment_report).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import sys
from dataclasses import dataclass, replace
from os.path import isdir, isfile, join
from typing import Any

import torch
from tqdm import tqdm

from nnunet_dp.alignment import all_rules, analyse_batch, case_gradient_matrix
from nnunet_dp.alignment_report import (
    ALIGNMENT_CSV,
    CASES_CSV,
    PRIVACY_NOTE,
    STEP_FIELDS,
    append_csv,
    case_fields,
    case_rows,
    format_summary,
    read_csv,
    step_rows,
    summarise,
)
from nnunet_dp.config import ENV_VAR
from nnunet_dp.errors import DPError
from nnunet_dp.nnunet.report import CONFIG_JSON, write_json_atomic
from nnunet_dp.plots import save_plots

NONE_CHECKPOINT = "none"


class AlignmentCLIError(DPError):
    """Bad input to nnUNetv2_dp_alignment (missing dataset, fold, checkpoint, ...)."""


@dataclass(frozen=True)
class Target:
    dataset: str
    preprocessed: str  # $nnUNet_preprocessed/DatasetXXX_Name
    fold_folder: str
    plans_file: str


def locate(args: argparse.Namespace) -> Target:
    """Find the preprocessed dataset, the plans and the fold folder, with errors that say how to fix them."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    if args.device == "cuda" and not torch.cuda.is_available():
        raise AlignmentCLIError("-device cuda, but CUDA is not available here; use -device cpu")
    for var in ("nnUNet_preprocessed", "nnUNet_results"):
        if not os.environ.get(var):
            raise AlignmentCLIError(f"environment variable {var} is not set; set it as for nnUNetv2_train")
    try:
        name = maybe_convert_to_dataset_name(args.d)
    except (RuntimeError, ValueError) as e:
        raise AlignmentCLIError(f"dataset {args.d!r} not found: {str(e).splitlines()[0]}") from None
    pre = join(os.environ["nnUNet_preprocessed"], name)
    plans_file = join(pre, f"{args.p}.json")
    if not isfile(plans_file):
        raise AlignmentCLIError(f"no plans {plans_file}; run nnUNetv2_plan_and_preprocess -d {args.d} -c {args.c}")
    with open(plans_file) as f:
        configurations = json.load(f)["configurations"]
    if args.c not in configurations:
        raise AlignmentCLIError(f"configuration {args.c!r} is not in {plans_file}; known: {', '.join(configurations)}")
    fold_folder = join(os.environ["nnUNet_results"], name, f"{args.tr}__{args.p}__{args.c}", f"fold_{args.f}")
    return Target(dataset=name, preprocessed=pre, fold_folder=fold_folder, plans_file=plans_file)


def read_checkpoint(path: str) -> dict:
    """An nnU-Net checkpoint (a DP trainer's, or another trainer's such as the public model a DP run fine-tunes
    from); a file that torch cannot read, or one without network weights, stops with its path and what is wrong."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError, AttributeError, ImportError, pickle.UnpicklingError) as e:
        first = (str(e).splitlines() or [""])[0]
        raise AlignmentCLIError(f"checkpoint {path} cannot be read ({type(e).__name__}: {first}); it is truncated "
                                "or not a checkpoint. Use another one (-chk) or train again") from None
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt:
        raise AlignmentCLIError(f"checkpoint {path} is not an nnU-Net checkpoint (no 'network_weights')")
    return ckpt


SETTINGS_KEYS = ("dp_config", "dp_state", "trainer_name")  # what dp_settings and analyse read of a checkpoint


def dp_settings(checkpoints: dict[str, dict], fold_folder: str) -> tuple[dict, str]:
    """The checkpoint whose DP settings (dp_config) rebuild the network, q and sigma for every checkpoint analysed:
    the first DP trainer's. Checkpoints of other trainers (e.g. the public model at the start of a fine-tuning) hold
    none; alone they are analysed with the settings the DP trainer reads itself (nnUNet_dp_config, else the fold
    folder's dp_config.json), as for -chk none. Returns it ({} then) and where the settings come from, in words."""
    for path, ckpt in checkpoints.items():
        if "dp_config" in ckpt:
            return ckpt, f"DP settings: from {path}"
    if os.environ.get(ENV_VAR):
        return {}, f"DP settings: from {ENV_VAR}={os.environ[ENV_VAR]} (no DP trainer's checkpoint among -chk)"
    if isfile(join(fold_folder, CONFIG_JSON)):
        return {}, f"DP settings: from {join(fold_folder, CONFIG_JSON)} (no DP trainer's checkpoint among -chk)"
    path, ckpt = next(iter(checkpoints.items()))
    raise AlignmentCLIError(f"checkpoint {path} was written by trainer {ckpt.get('trainer_name')!r}, not by a DP "
                            "trainer: it holds no DP settings (dp_config) to rebuild its network, q and sigma, and "
                            f"there is no {CONFIG_JSON} in {fold_folder}. Point -d/-c/-f/-tr/-p at the DP run that "
                            f"fine-tuned from it (its {CONFIG_JSON} is used), give the settings as for nnUNetv2_train "
                            f"({ENV_VAR}=FILE), add a DP trainer's checkpoint to -chk (its settings then serve every "
                            "checkpoint), or use -chk none")


def checkpoint_paths(names: list[str], fold_folder: str) -> dict[str, str | None]:
    """Label -> path (None for a fresh network). Missing files stop with what the fold folder holds."""
    out: dict[str, str | None] = {}
    for name in names:
        if name.lower() == NONE_CHECKPOINT:
            out["init"] = None
            continue
        path = name if os.path.isabs(name) or isfile(name) and not isfile(join(fold_folder, name)) \
            else join(fold_folder, name)
        if not isfile(path):
            have = sorted(f for f in os.listdir(fold_folder) if f.endswith(".pth")) if isdir(fold_folder) else None
            where = (f"the fold folder {fold_folder} holds: {', '.join(have) or 'no checkpoints'}" if have is not None
                     else f"there is no fold folder {fold_folder} (train it first, or use -chk none)")
            raise AlignmentCLIError(f"checkpoint {name!r} not found; {where}")
        label = checkpoint_label(path, fold_folder)
        out[path if label in out else label] = path
    return out


def checkpoint_label(path: str, fold_folder: str) -> str:
    """A checkpoint's name in the CSVs, summary and plots: its file name for one of the fold folder, else its folder
    and file name (a public model's checkpoint_final.pth is then `fold_all/checkpoint_final`, not mistaken for the
    fold's own)."""
    name, folder = os.path.basename(path).removesuffix(".pth"), os.path.dirname(os.path.abspath(path))
    return name if folder == os.path.abspath(fold_folder) else f"{os.path.basename(folder)}/{name}"


def build_trainer(args: argparse.Namespace, target: Target, dp_config: dict | None, out: str) -> Any:
    """Instantiate the trainer class by name as nnU-Net does (nnUNet_extTrainer included), with the checkpoint's DP
    settings when there is one, log into the output folder, and initialise network and loss."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunet_dp.nnunet.trainer import nnUNetTrainerDP

    try:
        cls = recursive_find_trainer_class_by_name(args.tr)
    except RuntimeError:
        raise AlignmentCLIError(f"trainer {args.tr!r} not found; make the DP trainers visible with "
                                f"eval \"$(nnUNetv2_dp_env)\"") from None
    if not issubclass(cls, nnUNetTrainerDP):
        raise AlignmentCLIError(f"trainer {args.tr!r} is not a DP trainer (a subclass of nnUNetTrainerDP)")
    if dp_config is not None:  # the network (GroupNorm), q and sigma must be the checkpoint's
        path = join(out, "dp_config_used.json")
        write_json_atomic(path, dp_config)
        os.environ[ENV_VAR] = path
    with open(target.plans_file) as f:
        plans = json.load(f)
    with open(join(target.preprocessed, "dataset.json")) as f:
        dataset_json = json.load(f)
    plans["continue_training"] = False
    existing = set(os.listdir(target.fold_folder)) if isdir(target.fold_folder) else set()
    trainer = cls(plans=plans, configuration=args.c, fold=args.f, dataset_json=dataset_json,
                  device=torch.device(args.device))
    if os.path.basename(trainer.log_file) not in existing and isfile(trainer.log_file):
        os.replace(trainer.log_file, join(out, "alignment_log.txt"))  # not a training log of this fold
    trainer.log_file = join(out, "alignment_log.txt")
    trainer.dp_config = replace(trainer.dp_config, seed=args.seed)  # reproducible batches
    torch.manual_seed(args.seed)
    trainer.initialize()
    return trainer


def load_weights(network: torch.nn.Module, path: str | None, init_state: dict) -> dict:
    """Load a checkpoint's weights (or the fresh initialisation); returns the checkpoint dict ({} for none)."""
    if path is None:
        network.load_state_dict(init_state)
        return {}
    ckpt = read_checkpoint(path)
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in ckpt["network_weights"].items()}
    try:
        network.load_state_dict(state)
    except RuntimeError as e:
        raise AlignmentCLIError(f"checkpoint {path} does not fit the network built from the plans and its DP "
                                f"settings (dp_config): {str(e).splitlines()[0]}") from None
    return ckpt


def check_batch(batch: dict, labels: list[int]) -> None:
    """Stop, naming the cases, on NaN/inf image voxels or label values outside dataset.json's labels: either would
    give NaN alignment or a bare torch error (training would drop such a case without a word)."""
    data, target = batch["data"], batch["target"]
    keys = [str(k) for k in batch["keys"]]
    bad = [k for k, ok in zip(keys, torch.isfinite(data).flatten(1).all(1).tolist()) if not ok]
    if bad:
        raise AlignmentCLIError(f"case(s) {bad} have NaN or inf voxels in their preprocessed image; fix the raw "
                                "images and preprocess again")
    seg = target[0] if isinstance(target, list) else target
    for key, case in zip(keys, seg):
        values = sorted(set(torch.unique(case).tolist()) - set(labels))
        unknown = [int(v) if float(v).is_integer() else v for v in values]
        if unknown:
            raise AlignmentCLIError(f"case {key!r} has label values {unknown} outside dataset.json's labels {labels}; "
                                    "fix its label file and preprocess again")


def check_gradients(G: torch.Tensor, keys: list) -> None:
    """Non-finite per-case gradients (a diverged checkpoint) would make every alignment metric NaN."""
    bad = [str(k) for k, ok in zip(keys, torch.isfinite(G).all(1).tolist()) if not ok]
    if bad:
        raise AlignmentCLIError(f"the gradients of case(s) {bad} are not finite (NaN/inf): the checkpoint's weights "
                                "or these cases' data are broken")


def allowed_labels(trainer: Any) -> list[int]:
    """Values a training target may hold: dataset.json's labels (0/1 per channel for regions) and the ignore label."""
    lm = trainer.label_manager
    labels = {0, 1} if lm.has_regions else {0, *(int(v) for v in lm.all_labels)}
    return sorted(labels | ({int(lm.ignore_label)} if lm.has_ignore_label else set()))


def to_device(batch: dict, device: torch.device) -> tuple[torch.Tensor | None, Any]:
    data, target = batch["data"], batch["target"]
    if data is None:
        return None, None
    target = [t.to(device) for t in target] if isinstance(target, list) else target.to(device)
    return data.to(device), target


def draw_batches(loader: Any, n: int, desc: str) -> Any:
    """n batches from the trainer's Poisson loader, with a progress bar."""
    for _ in tqdm(range(n), desc=desc, unit="batch", file=sys.stdout):
        yield next(loader)


def dataset_reference(trainer: Any, loader: Any, steps: int) -> tuple[torch.Tensor, int]:
    """Training-set mean gradient, estimated as the mean of the per-case gradients of `steps` Poisson batches."""
    network, total, count = trainer._plain_network(), None, 0
    for batch in draw_batches(loader, steps, "reference g_bar"):
        data, target = to_device(batch, trainer.device)
        if data is None:
            continue
        check_batch(batch, allowed_labels(trainer))
        G = case_gradient_matrix(network, trainer.loss, data, target, autocast=trainer._autocast())
        check_gradients(G, list(batch["keys"]))
        total = G.double().sum(0) if total is None else total + G.double().sum(0)
        count += G.shape[0]
    if count == 0:
        raise AlignmentCLIError(f"all {steps} reference batches were empty; raise -ref_steps")
    return total / count, count


def analyse_checkpoint(trainer: Any, loader: Any, args: argparse.Namespace, label: str, sigma: float,
                       rules: dict, out: str) -> int:
    """Analyse -n Poisson batches with the loaded weights; appends rows to the CSV files; returns empty batches."""
    reference = None
    if args.ref == "dataset":
        ref_steps = args.ref_steps or math.ceil(1 / trainer.dp_run.plan.sampling_rate)
        reference, n_ref = dataset_reference(trainer, loader, ref_steps)
        print(f"{label}: reference g_bar from {n_ref} case gradients ({ref_steps} batches)")
    generator = torch.Generator(device=trainer.device)
    generator.manual_seed(args.seed)
    sens = {n: r.sensitivity for n, r in rules.items()}
    empty = 0
    for step, batch in enumerate(draw_batches(loader, args.n, label)):
        data, target = to_device(batch, trainer.device)
        if data is None:
            empty += 1
            continue
        check_batch(batch, allowed_labels(trainer))
        G = case_gradient_matrix(trainer._plain_network(), trainer.loss, data, target, autocast=trainer._autocast())
        check_gradients(G, list(batch["keys"]))
        result = analyse_batch(G, rules, noise_multiplier=sigma, reference=reference, mc_draws=args.mc,
                               generator=generator)
        del G
        append_csv(join(out, ALIGNMENT_CSV), STEP_FIELDS, step_rows(result, source=label, step=step, sensitivities=sens))
        append_csv(join(out, CASES_CSV), case_fields(list(rules)),
                   case_rows(result, source=label, step=step, keys=[str(k) for k in batch["keys"]]))
    return empty


RESULTS = (ALIGNMENT_CSV, CASES_CSV, "summary.json")  # what a finished analysis leaves in -o (and the plots)


def remove_results(out: str) -> None:
    for name in RESULTS:
        if isfile(join(out, name)):
            os.remove(join(out, name))


def run(args: argparse.Namespace) -> dict:
    """The analysis; on any error the output folder holds no results (no partial CSV, no older summary)."""
    target = locate(args)
    checkpoints = checkpoint_paths(args.chk, target.fold_folder)
    # every checkpoint checked before any output (one in memory at a time: only what the settings need is kept);
    # the first DP trainer's settings rebuild the network
    loaded = {path: {k: v for k, v in read_checkpoint(path).items() if k in SETTINGS_KEYS}
              for path in checkpoints.values() if path is not None}
    saved, source = dp_settings(loaded, target.fold_folder) if loaded else ({}, "")
    if source:
        print(source)
    out = args.o or join(target.fold_folder, "alignment")
    os.makedirs(out, exist_ok=True)
    remove_results(out)  # a fresh analysis, never appended to an older one
    try:
        return analyse(args, target, checkpoints, saved, out)
    except BaseException:
        remove_results(out)
        raise


def analyse(args: argparse.Namespace, target: Target, checkpoints: dict[str, str | None], saved: dict,
            out: str) -> dict:
    old_env = os.environ.get(ENV_VAR)
    try:
        trainer = build_trainer(args, target, saved.get("dp_config"), out)
    finally:
        if old_env is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = old_env
    network = trainer._plain_network()
    network.train()
    init_state = {k: v.detach().clone() for k, v in network.state_dict().items()}
    loader, val_loader = trainer.get_dataloaders()
    try:
        plan = trainer.dp_run.plan
        sigma = float(saved.get("dp_state", {}).get("plan", {}).get("noise_multiplier", plan.noise_multiplier))
        cfg = trainer.dp_config
        rules = all_rules(clip_norm=cfg.clip_norm, autos_gamma=cfg.autos_gamma, nsgd_r=cfg.nsgd_r, psac_r=cfg.psac_r)
        empty = {}
        for label, path in checkpoints.items():
            load_weights(network, path, init_state)
            empty[label] = analyse_checkpoint(trainer, loader, args, label, sigma, rules, out)
    finally:
        for aug in (loader, val_loader):
            if hasattr(aug, "_finish"):
                aug._finish()
    return finish(args, target, out, rules, sigma, plan, empty)


def finish(args: argparse.Namespace, target: Target, out: str, rules: dict, sigma: float, plan: Any,
           empty: dict[str, int]) -> dict:
    """summary.json and the plots (also of the training-time alignment.csv of the fold, when there is one)."""
    if not isfile(join(out, ALIGNMENT_CSV)):
        raise AlignmentCLIError(f"every one of the {args.n} batches was empty (q = {plan.sampling_rate:.4g}); "
                                "raise -n")
    steps, cases = read_csv(join(out, ALIGNMENT_CSV)), read_csv(join(out, CASES_CSV))
    per_source = summarise(steps, cases)
    for label, n_empty in empty.items():
        if label in per_source:
            per_source[label]["empty_batches"] = n_empty
    summary = {
        "dataset": target.dataset, "configuration": args.c, "fold": args.f, "trainer": args.tr, "plans": args.p,
        "checkpoints": args.chk, "steps_per_checkpoint": args.n, "reference": args.ref, "monte_carlo_draws": args.mc,
        "seed": args.seed, "noise_multiplier": sigma, "sampling_rate": plan.sampling_rate,
        "expected_batch_size": plan.expected_batch_size, "num_training_cases": plan.num_training_cases,
        "rules": {n: {"clip_norm": r.clip_norm, "constant": r.constant, "sensitivity": r.sensitivity}
                  for n, r in rules.items()},
        "results": per_source, "privacy_note": PRIVACY_NOTE,
    }
    write_json_atomic(join(out, "summary.json"), summary)
    save_plots(out, steps, cases, rules)
    training_csv = join(target.fold_folder, ALIGNMENT_CSV)
    if isfile(training_csv) and os.path.abspath(training_csv) != os.path.abspath(join(out, ALIGNMENT_CSV)):
        save_plots(out, read_csv(training_csv), [], rules, prefix="training_")
    print(format_summary(summary))
    print(f"Written to {out} (alignment.csv, alignment_cases.csv, summary.json, *.png).")
    return summary
