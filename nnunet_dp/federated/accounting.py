"""Federated privacy accounting, from each site's own journal (no trust in the server needed for the first claim).

Trust model "local" (each site's noise alone; the server may see every site's update): a patient at site k is
protected by site k's epsilon over every step site k ever ran (its write-ahead journal; rounds lost to a crash
included). No amplification from sampling sites is claimed: every site takes part every round. The federated model's
release epsilon is the maximum over sites, for a patient who is at one site only. A patient at two sites is not
covered (each site protects its own records; two records of one person compose across sites, and no site knows).

Trust model "secagg" (distributed noise): each site adds N(0, (sigma/sqrt(K))^2 C^2) and the server sees only the sum
of the K_r sites' shares in round r (Flower's SecAgg+; the server honest-but-curious, at most c sites colluding with it,
the dropout threshold holding). The sum then carries noise of std sigma_site * sqrt(K_r - c) * C: with K_r = K and
c = 0 exactly central DP's sigma * C on the pooled patients. A step of a site whose share did not reach a released sum
(a lost round) is counted at its own sigma_site: what the site's own journal guarantees.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from nnunet_dp.accounting import epsilon_of
from nnunet_dp.config import AccountantName
from nnunet_dp.federated.site import ROUNDS_FILE
from nnunet_dp.journal import JOURNAL_FILE, read_history, total_steps

FEDERATION_JSON = "federation.json"  # the server's record: mode, rounds, which sites each aggregate holds (public)
FEDERATED_PRIVACY_JSON = "federated_privacy.json"

ASSUMPTIONS = (
    ("Privacy unit: one patient's record (image and label) at one site. A patient whose records are at two or more "
     "sites is not covered: each site's epsilon protects only its own records, and records of one person at several "
     "sites compose (up to the sum of those sites' epsilons), which no site can see."),
    ("Each site's epsilon comes from its own write-ahead journal (dp_journal.txt in its fold folder) over every step it "
     "ever ran in this federation, crashed or lost rounds included; no amplification by sampling sites is claimed."),
    ("Plans are data-independent (nnUNetv2_dp_plan) and sent by the server; no fingerprint, intensity statistic, "
     "shape, case count, loss or Dice leaves a site. Each reply carries the update arrays, the site's declared name and "
     "its aggregation weight (1, or the number of patients its operator declared: a public value listed below)."),
    ("Each site's number of training cases N (its q = expected batch / N) and its hyperparameters are assumed public at "
     "that site, as in a single-site release (privacy.json of each site)."),
    ("Hospital-level (client-level) DP is not claimed: Flower's client-level DP wrappers are not used."),
)


def site_history(output_folder: str) -> list[tuple[float, float, int]]:
    """[(sigma, q, steps), ...] of every step the site's fold folder ever ran (its journal)."""
    return read_history(os.path.join(output_folder, JOURNAL_FILE))


def site_rounds(output_folder: str) -> dict[int, int]:
    """round -> steps the site ran in it, for rounds the site finished (start and end recorded)."""
    path, starts, out = os.path.join(output_folder, ROUNDS_FILE), {}, {}
    if not os.path.isfile(path):
        return out
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # cut short by a crash
            if rec.get("event") == "start":
                starts[rec["round"]] = rec["steps"]
            elif rec.get("event") == "end" and rec["round"] in starts:
                out[int(rec["round"])] = int(rec["steps"]) - int(starts[rec["round"]])
    return out


def sum_noise_std(*, noise_multiplier: float, clip_norm: float, num_sites: int, normaliser: float) -> float:
    """Std per coordinate of the sum over K sites of (N(0, (sigma/sqrt(K))^2 C^2)) / B: sqrt(K (sigma/sqrt K)^2) C / B =
    sigma C / B, central DP's noise on the pooled sum divided by the same B."""
    per_site = noise_multiplier / math.sqrt(num_sites) * clip_norm
    return math.sqrt(num_sites * per_site**2) / normaliser


def distributed_history(history: Sequence[tuple[float, float, int]], rounds: Mapping[int, int],
                        in_sum: Mapping[int, int], *, colluding: int = 0) -> list[tuple[float, float, int]]:
    """The site's steps under the secagg trust model: a step of round r whose share reached a released sum of K_r
    sites is a Gaussian step with sigma_site * sqrt(K_r - colluding); every other step keeps sigma_site."""
    if not history:
        return []
    sigma, q = history[-1][0], history[-1][1]
    if any((s, qq) != (sigma, q) for s, qq, _ in history):
        return list(history)  # mixed settings: no distributed claim, the site's own history stands
    out, covered = [], 0
    for r, steps in sorted(rounds.items()):
        k = in_sum.get(r, 0) - colluding
        if k >= 1 and steps:
            out.append((sigma * math.sqrt(k), q, steps))
            covered += steps
    rest = total_steps(history) - covered
    return out + ([(sigma, q, rest)] if rest > 0 else [])


def site_report(name: str, output_folder: str, federation: Mapping[str, Any], *, delta: float,
                accountant: AccountantName = "rdp", colluding: int = 0) -> dict[str, Any]:
    history = site_history(output_folder)
    out = {"site": name, "steps": total_steps(history), "ledger_history": history,
           "epsilon_local_trust": epsilon_of(history, delta=delta, accountant=accountant)}
    if federation.get("mode") == "distributed":
        in_sum = {int(r["round"]): len(r["sites"]) for r in federation.get("rounds", []) if name in r["sites"]}
        dist = distributed_history(history, site_rounds(output_folder), in_sum, colluding=colluding)
        out["epsilon_secagg_trust"] = epsilon_of(dist, delta=delta, accountant=accountant)
        out["secagg_history"] = dist
    return out


def federated_report(federation: Mapping[str, Any], sites: Mapping[str, str], *, delta: float,
                     accountant: AccountantName = "rdp", colluding: int = 0) -> dict[str, Any]:
    """federated_privacy.json: per-site epsilon under each trust model and the release epsilon (max over sites)."""
    rows = [site_report(n, f, federation, delta=delta, accountant=accountant, colluding=colluding)
            for n, f in sites.items()]
    out: dict[str, Any] = {
        "privacy_unit": "one patient's record at one site; a patient at two sites is NOT covered",
        "delta": delta, "accountant": accountant, "mode": federation.get("mode"),
        "release_epsilon_local_trust": max((r["epsilon_local_trust"] for r in rows), default=0.0),
        "sites": rows, "aggregation": federation.get("aggregation", "uniform"),
        "declared_cases": federation.get("declared_cases", {}), "assumptions": list(ASSUMPTIONS)}
    if federation.get("mode") == "distributed":
        out["release_epsilon_secagg_trust"] = max((r["epsilon_secagg_trust"] for r in rows), default=0.0)
        out["secagg_trust_model"] = (
            f"honest-but-curious server running Flower's SecAgg+ faithfully; at most {colluding} sites collude with "
            f"it (their noise shares are subtracted); each round's sum holds the sites listed in federation.json; "
            f"SecAgg+ parameters {federation.get('secagg', {})}. If more sites collude or the protocol is broken, only "
            "release_epsilon_local_trust holds.")
    return out
