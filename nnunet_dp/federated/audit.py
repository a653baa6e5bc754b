"""One-run audit of a federation (Steinke, Nasr, Jagielski 2023) with Dirac canaries planted at one site.

The audit reuses nnunet_dp.audit.canaries (the canaries, their norm at the sensitivity, the per-step likelihood score)
and the estimator: K sites each own a DPRun on the gradient-carrier model (a canary case's gradient is its canary
vector); the audited site's cases are its included canaries, the others have none (the strongest case for the
auditor: nothing else moves the canary coordinates). Each round every site takes one private step
(DPRun.private_step) and the server aggregates with the federation's own function (model.average_updates).

What the auditor (the server) sees: 'site' - the audited site's own update each round (local noise, no secure
aggregation: the site's epsilon is the claim); 'sum' - only the sum of all sites' updates each round (SecAgg+: the
secagg-trust epsilon is the claim). The lower bound must stay below the claim.
"""
from __future__ import annotations

import math
import secrets
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from nnunet_dp.accounting import epsilon_for
from nnunet_dp.audit.canaries import canary_norm, canary_scores, likelihood_scores, make_canaries, noise_scale
from nnunet_dp.audit.estimator import audit_from_scores
from nnunet_dp.federated.model import average_updates
from nnunet_dp.noise import stream_seed
from nnunet_dp.run import DPPlan, DPRun
from nnunet_dp.sampling import poisson_sample

View = Literal["site", "sum"]


def _loss(output: torch.Tensor, target: Any) -> torch.Tensor:
    return output.sum()  # <theta, x>: the per-case gradient is the canary vector x


def _site_run(sigma: float, q: float, m: int, rounds: int, delta: float, seed: int | None) -> DPRun:
    plan = DPPlan(rule="flat", rule_constant=None, clip_norm=1.0, noise_multiplier=sigma, sampling_rate=q,
                  num_training_cases=m, planned_steps=rounds, max_steps=None, target_epsilon=None, delta=delta,
                  accountant="rdp")
    return DPRun(plan, device=torch.device("cpu"), seed=seed, strategy="loop")


def run_federated_audit(*, num_sites: int, site_noise_multiplier: float, sampling_rate: float, rounds: int,
                        num_canaries: int = 1000, view: View = "site", delta: float = 1e-5,
                        seed: int | None = None) -> dict[str, Any]:
    """Canaries at site 0 of `num_sites`; one private step per site per round; the lower bound from what the
    server sees (`view`) next to site 0's epsilon under each trust model."""
    base = secrets.randbits(63) if seed is None else seed
    m, q = num_canaries, sampling_rate
    runs = [_site_run(site_noise_multiplier, q, m, rounds, delta, None if seed is None else stream_seed(base, 10 + k))
            for k in range(num_sites)]
    canaries = make_canaries(num_canaries=m, num_params=m, norm=canary_norm(runs[0].rule),
                             generator=torch.Generator().manual_seed(stream_seed(base, 1)))
    rng = np.random.default_rng(stream_seed(base, 2))
    members = torch.nonzero(canaries.included).flatten().tolist()
    models = [nn.Linear(m, 1, bias=False).double() for _ in range(num_sites)]
    state = {"w": np.zeros(m)}
    projections, scales = [], []
    for _ in range(rounds):
        updates = []
        for k, (run, model) in enumerate(zip(runs, models)):
            batch = poisson_sample(members, sampling_rate=q, rng=rng) if k == 0 else []
            data = canaries.gradients(torch.tensor(batch, dtype=torch.long)) if batch else None
            model.zero_grad(set_to_none=True)
            run.private_step(model, _loss, data, None if data is None else torch.zeros(len(batch)))
            updates.append(model.weight.grad.flatten().clone())
        seen = updates[0] if view == "site" else torch.stack(updates).sum(0)
        projections.append(canary_scores(canaries, seen))
        scales.append(noise_scale(seen))
        state = average_updates(state, [(1.0, {"w": -u.numpy()}) for u in updates])  # the server's aggregation
    signal = canaries.norm / runs[0].plan.expected_batch_size  # flat: s(n) n = C = 1 at n = C
    scores = likelihood_scores(torch.stack(projections), np.asarray(scales), signal=signal, sampling_rate=q)
    result = audit_from_scores(scores.numpy(), canaries.included.numpy(), delta=delta)
    eps_local = epsilon_for(noise_multiplier=site_noise_multiplier, sampling_rate=q, steps=rounds, delta=delta)
    eps_secagg = epsilon_for(noise_multiplier=site_noise_multiplier * math.sqrt(num_sites), sampling_rate=q,
                             steps=rounds, delta=delta)
    return {**result, "view": view, "num_sites": num_sites, "epsilon_local_trust": eps_local,
            "epsilon_secagg_trust": eps_secagg, "site_noise_multiplier": site_noise_multiplier,
            "rounds": rounds, "sampling_rate": q}
