"""The experiment's loop over arms and repeats, and its tables (results.csv: one row per run; results.md: mean ± sd
per arm). Finished runs (OUT/runs/<arm>/r<i>/result.json) are kept and skipped on a rerun."""
from __future__ import annotations

import csv
import json
import os
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

from nnunet_dp.federated.simulate import Experiment, _jobs, pretrain_public, run_job

COLUMNS = ("arm", "repeat", "dice", "epsilon", "epsilon_secagg", "steps", "wall_s", "error")
EXPLAIN = {"alone_": "DP, this site's patients alone", "federated_local": "Flower, each site's own noise (local trust)",
           "federated_distributed": "Flower + SecAgg+, sigma/sqrt(K) per site (epsilon_secagg: secagg trust)",
           "central_dp_pooled": "DP on all sites' patients pooled (a trusted curator)",
           "nonprivate_pooled": "all patients pooled, no clipping, no noise (not private)",
           "public_alone": "the public model, no private training"}


def run_experiment(exp: Experiment, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    rows = []
    if exp.site_map.public and not exp.pretrained:
        exp.pretrained = pretrain_public(exp)
        log(f"public model (non-private, {len(exp.site_map.public)} public patients): {exp.pretrained}")
    for repeat in range(exp.repeats):
        for arm, job in _jobs(exp):
            folder = os.path.join(exp.output, "runs", arm, f"r{repeat}")
            done = os.path.join(folder, "result.json")
            if os.path.isfile(done):
                with open(done) as f:
                    rows.append(json.load(f))
                continue
            os.makedirs(folder, exist_ok=True)
            t0 = time.time()
            try:
                result = run_job(exp, folder, job)
                error = ""
            except Exception as e:  # noqa: BLE001 (one failed run is reported in the table, the others go on)
                result, error = {}, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                with open(os.path.join(folder, "error.txt"), "w") as f:
                    f.write(traceback.format_exc())
            row = {"arm": arm, "repeat": repeat, **result, "wall_s": round(time.time() - t0, 1), "error": error}
            if not error:
                with open(done, "w") as f:
                    json.dump(row, f)
            rows.append(row)
            log(f"{arm} r{repeat}: dice {row.get('dice', float('nan')):.4f} epsilon {row.get('epsilon')} "
                f"({row['wall_s']} s){' FAILED ' + error if error else ''}")
    write_tables(exp, rows)
    return rows


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "—"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for arm in dict.fromkeys(r["arm"] for r in rows):
        group = [r for r in rows if r["arm"] == arm and not r.get("error")]
        dice = [r["dice"] for r in group]
        eps = [r["epsilon"] for r in group if r.get("epsilon") is not None]
        sec = [r["epsilon_secagg"] for r in group if r.get("epsilon_secagg") is not None]
        out.append({"arm": arm, "runs": len(group), "failed": sum(1 for r in rows if r["arm"] == arm) - len(group),
                    "dice_mean": float(np.mean(dice)) if dice else None,
                    "dice_sd": float(np.std(dice, ddof=1)) if len(dice) > 1 else None,
                    "epsilon": max(eps) if eps else None, "epsilon_secagg": max(sec) if sec else None,
                    "wall_s_mean": float(np.mean([r["wall_s"] for r in group])) if group else None})
    return out


def write_tables(exp: Experiment, rows: list[dict[str, Any]]) -> None:
    with open(os.path.join(exp.output, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    title = (f"# Federated DP: {os.path.basename(os.path.normpath(exp.source))} ({exp.configuration}), "
             f"{len(exp.site_map.sites)} sites, epsilon {exp.epsilon} per site, delta {exp.delta}")
    setup = (f"Sites: {exp.site_map.counts()}. Rounds {exp.rounds} x {exp.local_steps} local steps (distributed: "
             f"{exp.rounds * exp.local_steps} rounds of 1 step); expected batch {exp.expected_batch_size} per site; "
             f"{exp.repeats} repeat(s); start: {exp.pretrained or 'from scratch'}. Dice: mean over foreground labels "
             "and test cases (preprocessed space). Non-private rows carry no epsilon.")
    lines = [title, "", setup, "",
             "| arm | what | test Dice (mean ± sd) | release ε (local trust) | ε (secagg trust) | runs | wall s |",
             "|---|---|---|---|---|---|---|"]
    for s in summary(rows):
        what = next((v for k, v in EXPLAIN.items() if s["arm"].startswith(k)), "")
        eps = "non-private" if s["arm"] == "nonprivate_pooled" else _fmt(s["epsilon"], 2)
        dice = _fmt(s["dice_mean"]) + (f" ± {_fmt(s['dice_sd'])}" if s["dice_sd"] is not None else "")
        runs = f"{s['runs']}" + (f" ({s['failed']} failed)" if s["failed"] else "")
        lines.append(f"| {s['arm']} | {what} | {dice} | {eps} | {_fmt(s['epsilon_secagg'], 2)} | {runs} | "
                     f"{_fmt(s['wall_s_mean'], 0)} |")
    with open(os.path.join(exp.output, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
