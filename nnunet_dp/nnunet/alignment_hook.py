"""Training-time alignment recording (DPConfig.alignment_every = k > 0): every k-th DP step, the per-case gradients of
the current batch are analysed for every rule at the run's sigma and one row per rule is appended to alignment.csv
in the fold's output folder.

It only reads: gradients are taken with torch.autograd.grad (no .grad is touched), the Monte Carlo noise comes from
its own generator (never the privacy noise generator), and nothing it computes reaches the private step. The output
is computed from unnoised per-case gradients and is not covered by epsilon (privacy.json, assumptions).
"""
from __future__ import annotations

from os.path import join
from typing import Any

import torch

from nnunet_dp.alignment import all_rules, analyse_batch, case_gradient_matrix
from nnunet_dp.alignment_report import ALIGNMENT_CSV, STEP_FIELDS, append_csv, step_rows
from nnunet_dp.noise import stream_seed
from nnunet_dp.per_sample import batch_size_of

MC_DRAWS = 8  # Monte Carlo noise draws per recorded step (the closed-form private alignment is always written)
SOURCE = "training"


def should_record(*, every: int, step: int, rank: int, batch_size: int, last_step: int | None) -> bool:
    """Every `every`-th DP step (step 0 included), on rank 0, for a non-empty batch, at most once per step."""
    return every > 0 and rank == 0 and batch_size > 0 and step % every == 0 and step != last_step


def maybe_record_alignment(trainer: Any, data: torch.Tensor | None, target: Any) -> None:
    """Call from nnUNetTrainerDP.train_step before the private step (data and target already on the device)."""
    run = getattr(trainer, "dp_run", None)
    if run is None:
        return
    step = run.steps
    if not should_record(every=trainer.dp_config.alignment_every, step=step, rank=trainer.local_rank,
                         batch_size=batch_size_of(data), last_step=getattr(trainer, "_dp_alignment_step", None)):
        return
    trainer._dp_alignment_step = step
    cfg = trainer.dp_config
    rules = all_rules(clip_norm=cfg.clip_norm, autos_gamma=cfg.autos_gamma, nsgd_r=cfg.nsgd_r, psac_r=cfg.psac_r)
    G = case_gradient_matrix(trainer._plain_network(), trainer.loss, data, target, autocast=trainer._autocast())
    generator = torch.Generator(device=G.device)
    generator.manual_seed(stream_seed(cfg.seed or 0, step))  # analysis noise only (never trains): reproducible
    result = analyse_batch(G, rules, noise_multiplier=run.plan.noise_multiplier, mc_draws=MC_DRAWS,
                           generator=generator)
    del G
    rows = step_rows(result, source=SOURCE, step=step, sensitivities={n: r.sensitivity for n, r in rules.items()})
    append_csv(join(trainer.output_folder, ALIGNMENT_CSV), STEP_FIELDS, rows)
