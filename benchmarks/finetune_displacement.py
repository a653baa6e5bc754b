"""Where fine-tuning moved the public weights: per run of an nnUNetv2_dp_experiment --public-fraction folder, the
displacement Δ = w_final − w_public (checkpoint_final vs the public model's), its norm, and its cosine with the
non-private fine-tuning's displacement.

    python benchmarks/finetune_displacement.py EXP [RUN ...]

Two non-private fine-tunings from the same public model share much of their direction (cosine ~0.5 on Hippocampus);
a DP run whose displacement has cosine ~0 with them (within a few 1/sqrt(d), the spread of the cosine between
independent random directions in d dimensions) moved the weights by its noise only, and learned nothing from the
private cases that the non-private run learned. Compared over the parameters both checkpoints hold, segmentation
heads excluded (nnU-Net never transfers them) and frozen parameters included (Δ = 0 there). A run with `ema_decay`
saves the averaged weights, whose Δ is smaller than the noise-alone expectation of the raw weights (not given).
Made the displacement table of docs/results.md.
"""
from __future__ import annotations

import glob
import json
import math
import os
import sys

import torch

from nnunet_dp.config import DPConfig
from nnunet_dp.experiment import report


def flat(weights: dict[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
    return torch.cat([weights[k].detach().double().flatten() for k in keys])


def compared_keys(public: dict[str, torch.Tensor]) -> list[str]:
    """Floating-point tensors of the public model except the segmentation heads, each once: nnU-Net's state dict
    names many tensors twice (`decoder.encoder.*`, `all_modules.*`), as views of one storage, which torch.load
    keeps shared."""
    seen, keys = set(), []
    for k, v in public.items():
        if v.dtype.is_floating_point and "seg_layers" not in k and v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            keys.append(k)
    return keys


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    return float(a @ b) / (na * nb) if na > 0 and nb > 0 else float("nan")


def load_weights(path: str) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["network_weights"]


def displacements(exp: str, runs: list[str] | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict]:
    """{run: Δ} for the finished runs of `exp` (all, or `runs`), the public weights (flattened) and the results."""
    with open(os.path.join(exp, "runs", "public_alone", "result.json")) as f:
        public_ckpt = json.load(f)["checkpoint"]
    public = load_weights(public_ckpt)
    keys = compared_keys(public)
    w0 = flat(public, keys)
    out, results = {}, {}
    for path in sorted(glob.glob(os.path.join(exp, "runs", "*", "result.json"))):
        with open(path) as f:
            r = json.load(f)
        if r["run"] == "public_alone" or (runs and r["run"] not in runs) or report.failed(r):
            continue
        ckpts = glob.glob(os.path.join(r["model_folder"], "fold_*", "checkpoint_final.pth"))
        if len(ckpts) != 1:
            continue
        w = load_weights(ckpts[0])
        missing = [k for k in keys if k not in w or w[k].shape != public[k].shape]
        if missing:
            raise SystemExit(f"{r['run']}: its checkpoint lacks {len(missing)} public tensors, e.g. {missing[0]}")
        out[r["run"]], results[r["run"]] = flat(w, keys) - w0, r
    return out, w0, results


def noise_displacement(r: dict, num_epochs: int, steps_per_epoch: int, trained: int,
                       momentum: float = DPConfig().momentum, nesterov: bool = DPConfig().nesterov) -> float:
    """Expected |Δ| of a DP run if it were its noise alone: independent kicks of σC/(qN) per coordinate (the noise
    on the averaged update), one per step, carried by SGD's momentum buffer under nnU-Net's poly schedule
    (lr_e = lr (1 − e/E)^0.9 in epoch e). A kick at step t moves the weights by a_t = Σ_{s ≥ t} lr_s β^(s−t)
    (Nesterov: lr_t + Σ_{s ≥ t} lr_s β^(s−t+1)), so E|Δ|² = d (σC/(qN))² Σ_t a_t² over the d trained coordinates
    (≈ (lr/(1 − β))² per kick far from the end)."""
    noise = r["noise_multiplier"] * r["clip_norm"] / r["expected_batch_size"]
    lrs = [r["lr_used"] * (1 - e / num_epochs) ** 0.9 for e in range(num_epochs) for _ in range(steps_per_epoch)]
    total, tail = 0.0, 0.0  # tail_t = Σ_{s ≥ t} lr_s β^(s−t), built from the last step back
    for lr in reversed(lrs):
        tail = lr + momentum * tail
        a = lr + momentum * tail if nesterov else tail
        total += a * a
    return noise * math.sqrt(trained * total)


def table(deltas: dict[str, torch.Tensor], w0: torch.Tensor, results: dict, budget: dict) -> str:
    refs = [n for n in deltas if results[n]["rule"] == "nonprivate" and results[n].get("trainable", "all") == "all"]
    d = w0.numel()
    lines = [(f"d = {d} compared parameters, |w_public| = {float(w0.norm()):.2f}; cosine of two independent random "
              f"directions: 0 ± {1 / math.sqrt(d):.4f} (sd)"),
             "| run | lr | trained coordinates | |Δ| | |Δ| if noise alone | |Δ| / |w_public| | "
             + " | ".join(f"cos(Δ, Δ {r})" for r in refs) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(refs)]
    for name, delta in deltas.items():
        r = results[name]
        lr, trained = r.get("lr_used"), int((delta != 0).sum())
        alone = ("–" if r.get("noise_multiplier") is None or lr is None else "– (EMA weights)" if r.get("ema_decay") else
                 f"{noise_displacement(r, budget['num_epochs'], budget['num_iterations_per_epoch'], trained):.3f}")
        lines.append(f"| {name} | {'–' if lr is None else f'{lr:.3g}'} | {trained} | {float(delta.norm()):.3f} | "
                     f"{alone} | {float(delta.norm() / w0.norm()):.4f} | "
                     + " | ".join("1" if r == name else f"{cosine(delta, deltas[r]):+.4f}" for r in refs) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if not argv or not os.path.isfile(os.path.join(argv[0], "runs", "public_alone", "result.json")):
        sys.exit(__doc__)
    torch.set_num_threads(1)
    deltas, w0, results = displacements(argv[0], argv[1:] or None)
    with open(os.path.join(argv[0], "budget.json")) as f:
        budget = json.load(f)
    print(table(deltas, w0, results, budget))


if __name__ == "__main__":
    main(sys.argv[1:])
