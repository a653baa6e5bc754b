"""The utility-vs-N law: test Dice and its ratio to non-private training against the number of private training
cases N, measured with the product's own defaults (the harness's `tiny` budget: 400 steps, batch at most N/4 and 32,
the DP learning-rate rules), from scratch and from a public model.

    python benchmarks/n_law.py run -o nlaw --dataset synthetic --n 40 100 200 400 800 1600 --epsilons 1 8
    python benchmarks/n_law.py run -o nlaw902 --dataset 902 --n 40 80 --start scratch public
    python benchmarks/n_law.py table -o nlaw nlaw902 --md docs/figures/nlaw.md --png docs/figures/nlaw.png

`run` calls nnUNetv2_dp_experiment once per (start, N) with --train-cases N (a nested, seeded subsample of fold 0's
training cases; validation, test and public cases fixed), each in OUT/<start>_n<N>; the public model is trained once
per pretraining batch (the `tiny` batch min(N/4, 32), which the public pretraining shares) and copied to the other
folders of that batch: every N >= 128 starts from the same public model, smaller N from one trained on the same
public cases with their batch. Finished
runs are skipped, so the command resumes. `table` reads every results.csv and writes the law: per (start, rule, ε, N)
the mean test Dice ± sd (n repeats), the non-private Dice at that N, their ratio, and the signal-to-noise variable
s = N·ε / sqrt(d·log(1/δ)) (d: the noise's dimensions), as markdown, CSV and a plot.

The synthetic task (nnunet_dp.synthetic.HARD): a disk and a ring of the same weak intensity (0.8 over noise 1.0) on
32×32 images, so that the classes differ only by shape: small N fails.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from collections.abc import Sequence
from os.path import isdir, isfile, join
from typing import Any

from nnunet_dp import law
from nnunet_dp.config import DPConfig

SYNTHETIC_ID, SYNTHETIC_NAME = 970, "NLawShapes"
SYNTHETIC_CASES = 2000  # 1600 private training cases at most, plus validation, test and public
SPLIT = {"test_fraction": 0.06, "val_fraction": 0.07}  # synthetic: 120 test, 131 validation cases
PUBLIC_FRACTION = 0.1
DELTA = DPConfig().delta  # the harness's δ: every cell's s uses it


def synthetic_raw(work: str) -> str:
    """The synthetic dataset in WORK/raw (made once)."""
    from nnunet_dp.synthetic import HARD, make_dataset

    raw = join(work, "raw")
    folder = join(raw, f"Dataset{SYNTHETIC_ID}_{SYNTHETIC_NAME}")
    if not isfile(join(folder, "dataset.json")):
        print(f"making {SYNTHETIC_CASES} synthetic cases in {folder}", flush=True)
        make_dataset(raw, dataset_id=SYNTHETIC_ID, name=SYNTHETIC_NAME, num_train=SYNTHETIC_CASES, num_test=0,
                     shape=(32, 32), seed=SYNTHETIC_ID, appearance=HARD)
    return raw


def experiment_command(args: argparse.Namespace, dataset: str, n: int, start: str, out: str) -> list[str]:
    cmd = ["nnUNetv2_dp_experiment", "-d", dataset, "-c", "2d", "--rules", *args.rules, "--epsilons",
           *map(str, args.epsilons), "--train-cases", str(n), "--seeds", str(args.seeds), "-o", out,
           "--refine", "none", "-device", "cpu", "-np", "1"]
    if args.dataset == "synthetic":
        cmd += ["--test-fraction", str(SPLIT["test_fraction"]), "--val-fraction", str(SPLIT["val_fraction"])]
    if start == "public":
        cmd += ["--public-fraction", str(args.public_fraction)]
    return cmd


def share_public_model(first: str, target: str) -> None:
    """Copy the first folder's public model and its public dataset (raw and preprocessed) so that `target` starts
    from it. The private derived dataset is not copied: it holds only the first folder's N training cases (the
    harness preprocesses the subsample), so each N makes its own."""
    if isdir(join(target, "public")) or not isdir(join(first, "public")):
        return
    os.makedirs(target, exist_ok=True)
    shutil.copytree(join(first, "public"), join(target, "public"), symlinks=True)
    for sub in ("nnUNet_raw", "nnUNet_preprocessed"):
        for name in (os.listdir(join(first, sub)) if isdir(join(first, sub)) else []):
            if name.endswith("Public"):
                shutil.copytree(join(first, sub, name), join(target, sub, name), symlinks=True,
                                ignore=shutil.ignore_patterns("splits_final.json"))


def run(args: argparse.Namespace) -> None:
    env = dict(os.environ)
    if args.dataset == "synthetic":
        env["nnUNet_raw"] = synthetic_raw(args.o)
        dataset = str(SYNTHETIC_ID)
    else:
        dataset = args.dataset
    env.setdefault("nnUNet_preprocessed", join(args.o, "preprocessed"))
    env.setdefault("nnUNet_n_proc_DA", "0")
    env.setdefault("OMP_NUM_THREADS", "1")
    for start in args.start:
        for n in args.n:
            out = join(args.o, f"{start}_n{n}" + (f"_{args.tag}" if args.tag else ""))
            source = trained_public_model(args.o, start, tiny_batch(n)) if start == "public" else None
            if source is not None and source != out:
                share_public_model(source, out)
            print(f"\n=== {start}, N = {n}: {out}", flush=True)
            proc = subprocess.run(experiment_command(args, dataset, n, start, out), env=env, check=False)
            if proc.returncode != 0:
                print(f"(N = {n}, {start}: the harness reported failures; see {out}/results.md)", flush=True)


def tiny_batch(n: int) -> int:
    """The `tiny` budget's batch for N training cases, which its public pretraining uses too: min(floor(N/4), 32)."""
    from nnunet_dp.experiment.plan import MAX_SAMPLING_RATE

    return min(int(MAX_SAMPLING_RATE * n), 32)


def trained_public_model(work: str, start: str, batch: int) -> str | None:
    """A folder of `work` whose public model is trained with this batch (the harness refuses to reuse one trained
    with another: its settings differ), so that every N with the same batch starts from the same public model."""
    if not isdir(work):
        return None
    for d in sorted(os.listdir(work)):
        settings = join(work, d, "public", "settings.json")
        if d.startswith(f"{start}_n") and isdir(join(work, d, "public", "nnUNet_results")) and isfile(settings):
            with open(settings) as f:
                if json.load(f).get("batch_size") == batch:
                    return join(work, d)
    return None


# ---- the table ------------------------------------------------------------------------------------------------
def harness_folders(folders: Sequence[str]) -> list[tuple[str, str, str]]:
    """(folder, start, harness output) for each given folder: a `run` work folder (its <start>_n<N> subfolders) or a
    harness output folder itself (its start from budget.json: scratch, or public for any public model)."""
    out = []
    for folder in folders:
        if isdir(join(folder, "runs")):
            with open(join(folder, "budget.json")) as f:
                start = "scratch" if json.load(f)["start"]["from"] == "scratch" else "public"
            out.append((folder, start, folder))
            continue
        for sub in sorted(os.listdir(folder)):
            if "_n" in sub and isdir(join(folder, sub, "runs")):  # <start>_n<N>, or <start>_n<N>_<tag> (more repeats)
                out.append((folder, sub.rsplit("_n", 1)[0], join(folder, sub)))
    return out


def noise_dimensions(result: dict) -> int | None:
    """d of a DP run: the noise's dimensions in its privacy.json (the trained parameters, or k + d_R under projection)."""
    path = join(result.get("model_folder", ""), "fold_0", "privacy.json")
    if not isfile(path):
        return result.get("num_trained_parameters")
    with open(path) as f:
        return json.load(f).get("noise", {}).get("num_trained_parameters")


def read_cells(folders: Sequence[str]) -> list[dict]:
    """One row per cell (folder, start, N, rule, ε, levers): the mean test Dice (no refinement) over the finished
    repeats, from each run's result.json, with N from the harness's budget and d the noise's dimensions."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for folder, start, harness in harness_folders(folders):
        with open(join(harness, "budget.json")) as f:
            n = json.load(f)["num_training_cases"]
        for run_name in sorted(os.listdir(join(harness, "runs"))):
            path = join(harness, "runs", run_name, "result.json")
            if not isfile(path):
                continue
            with open(path) as f:
                r = json.load(f)
            if r.get("status") == "failed" or r.get("rule") in (None, "public alone") or "none" not in r.get("scores", {}):
                continue
            group = folder if harness != folder else harness  # the repeats of sibling <start>_n<N>_<tag> folders join
            key = (group, start, n, r["rule"], r.get("target_epsilon"), r.get("levers", "defaults"))
            groups[key].append(r)
    cells = []
    for (folder, start, n, rule, eps, levers), runs in groups.items():
        dice = [r["scores"]["none"]["dice_mean"] for r in runs]
        mean = sum(dice) / len(dice)
        sd = math.sqrt(sum((x - mean) ** 2 for x in dice) / (len(dice) - 1)) if len(dice) > 1 else None
        cells.append({"folder": folder, "start": start, "n": n, "rule": rule, "epsilon": eps or "",
                      "levers": levers, "dice": mean, "sd": "–" if sd is None else f"{sd:.3f}",
                      "repeats": len(dice), "d": noise_dimensions(runs[0]) if rule != "nonprivate" else None})
    return cells


def law_rows(cells: list[dict]) -> list[dict]:
    """The DP cells with their non-private reference at the same (folder, start, N), ratio and s."""
    reference = {(c["folder"], c["start"], c["n"]): c["dice"] for c in cells
                 if c["rule"] == "nonprivate" and c["levers"] in ("defaults", "n/a")}
    out = []
    for c in cells:
        if c["rule"] == "nonprivate" or not c["epsilon"]:
            continue
        ref = reference.get((c["folder"], c["start"], c["n"]))
        eps = float(c["epsilon"])
        out.append({**c, "epsilon": eps, "nonprivate": ref, "ratio": None if not ref else c["dice"] / ref,
                    "s": law.signal_to_noise(num_cases=c["n"], epsilon=eps, dimensions=int(c["d"]),
                                                 delta=DELTA) if c["d"] else None})
    return sorted(out, key=lambda r: (r["folder"], r["start"], r["rule"], r["epsilon"], r["n"]))


def table(args: argparse.Namespace) -> None:
    rows = law_rows(read_cells(args.o))
    lines = ["| data | start | rule, lever | ε | N | test Dice (mean ± sd, n) | non-private | ratio | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "–" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(f"| {os.path.basename(r['folder'])} | {r['start']} | {r['rule']} {r['levers']} | {r['epsilon']:g} | {r['n']} | "
                     f"{r['dice']:.3f} ± {r['sd']} ({r['repeats']}) | {r['nonprivate'] or float('nan'):.3f} | "
                     f"{ratio} | {r['s']:.3g} |")
    text = "\n".join(lines)
    print(text)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text + "\n")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    if args.png:
        plot(rows, args.png)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    groups = defaultdict(list)
    for r in rows:
        if r["ratio"] is not None:
            groups[(r["start"], os.path.basename(r["folder"]), r["rule"], r["epsilon"])].append(r)
    for (start, data, rule, eps), group in sorted(groups.items()):
        ax = axes[0 if start == "scratch" else 1]
        group = sorted(group, key=lambda r: r["s"])
        ax.plot([r["s"] for r in group], [r["ratio"] for r in group], "o-" if rule == "flat" else "s--",
                label=f"{data} {rule} ε={eps:g}")
    laws = law.load()
    for ax, start in zip(axes, ("scratch", "public")):
        fitted = laws.get(start)
        xs = sorted(r["s"] for r in rows if r["start"] == start and r["s"])
        if fitted is None or not xs:
            continue
        grid = [xs[0] * (xs[-1] / xs[0]) ** (i / 99) for i in range(100)]
        ax.plot(grid, [fitted.mean(x) for x in grid], "k-", lw=1, label="fitted law")
        ax.fill_between(grid, [fitted.interval(x)[0] for x in grid], [fitted.interval(x)[1] for x in grid],
                        color="k", alpha=0.1, label=f"interval ±{fitted.half_width:.2f}")
    for ax, title in zip(axes, ("from scratch", "from a public model")):
        ax.set_xscale("log")
        ax.set_xlabel("s = N·ε / √(d·log(1/δ))")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("test Dice / non-private at the same N")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def fit_laws(args: argparse.Namespace) -> None:
    """Fit the law per start on the cells of the given folders and write nnunet_dp/law_calibration.json; print the
    fit, every cell's residual and how many cells each interval holds; with --check, the same for held-out folders."""
    fitted_rows, held_rows = law_rows(read_cells(args.o)), law_rows(read_cells(args.check or []))
    rows = [r for r in fitted_rows if r["ratio"] is not None and r["s"]]
    laws = []
    for start in args.starts:
        points = [(r["s"], r["ratio"]) for r in rows if r["start"] == start]
        if len(points) < 3:
            print(f"{start}: {len(points)} cells, not fitted")
            continue
        floor = 0.0 if start == "scratch" else min(p[1] for p in points)  # fine-tuned: DP keeps the public model
        source = (f"fitted on {len(points)} {start} cells of {', '.join(os.path.basename(o) for o in args.o)} "
                  "(benchmarks/n_law.py fit)")
        fitted = law.fit(points, start=start, source=source, floor=floor)
        checked = [(r, verdict(fitted, r)) for r in held_rows if r["start"] == start and verdict(fitted, r)]
        if checked:
            names = ", ".join(sorted({os.path.basename(r["folder"]) for r, _ in checked}))
            fitted = dataclasses.replace(fitted, held_out=(
                f"{sum(v == 'in' for _, v in checked)} of {len(checked)} cells of {names} inside the interval, "
                f"{sum(v == 'below' for _, v in checked)} below it (the law over-predicts there)"))
        laws.append(fitted)
        mid = f"s = {math.exp(fitted.midpoint):.3g}" if fitted.midpoint < 700 else "beyond any measured s: flat"
        print(f"{start}: slope {fitted.slope:.3f}, midpoint ln s = {fitted.midpoint:.3f} ({mid}), floor "
              f"{fitted.floor:.3f}, interval +-{fitted.half_width:.3f}")
    law.save(laws, args.calibration)
    print(f"written: {args.calibration}")
    for name, cells in (("fitted", fitted_rows), ("held out", held_rows)):
        report_coverage(name, cells, {x.start: x for x in laws})


def verdict(fitted: Any, row: dict) -> str | None:
    """'in', 'below' or 'above' the law's interval for a cell's ratio (clipped to 1, as the fit clips it); None for a
    cell without ratio or s."""
    if row["ratio"] is None or not row["s"]:
        return None
    lo, hi = fitted.interval(row["s"])
    ratio = min(row["ratio"], 1.0)
    return "below" if ratio < lo else "above" if ratio > hi else "in"


def report_coverage(name: str, rows: list[dict], laws: dict) -> None:
    inside, total = 0, 0
    for r in rows:
        fitted = laws.get(r["start"])
        ok = None if fitted is None else verdict(fitted, r)
        if ok is None:
            continue
        lo, hi = fitted.interval(r["s"])
        inside, total = inside + (ok == "in"), total + 1
        print(f"  {name}: {os.path.basename(r['folder'])} {r['start']} {r['rule']} eps {r['epsilon']:g} N {r['n']}: "
              f"ratio {r['ratio']:.3f}, predicted [{lo:.2f}, {hi:.2f}] {'in' if ok == 'in' else 'OUT'}")
    print(f"{name}: {inside} of {total} cells inside the predicted interval")


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train the grid (resumes)")
    r.add_argument("-o", required=True, help="work folder")
    r.add_argument("--dataset", default="synthetic", help="'synthetic' or an nnU-Net dataset id in nnUNet_raw")
    r.add_argument("--n", nargs="+", type=int, required=True, help="numbers of private training cases")
    r.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 8.0], help="target ε. Default: 1 8")
    r.add_argument("--rules", nargs="+", default=["nonprivate", "flat", "psac"], help="Default: nonprivate flat psac")
    r.add_argument("--start", nargs="+", choices=("scratch", "public"), default=["scratch", "public"],
                   help="from scratch and/or from a public model (an in-distribution public part)")
    r.add_argument("--public-fraction", type=float, default=PUBLIC_FRACTION, help="the public part's share")
    r.add_argument("--seeds", type=int, default=1, help="repeats per run. Default 1")
    r.add_argument("--tag", default=None, help="more repeats of cells run before: folders <start>_n<N>_<tag> (the "
                   "table joins their runs to the same cells)")
    t = sub.add_parser("table", help="the law from the folders' results")
    t.add_argument("-o", nargs="+", required=True, help="work folders of `run`")
    t.add_argument("--md", default=None, help="write the markdown table here")
    t.add_argument("--csv", default=None, help="write the rows as CSV here")
    t.add_argument("--png", default=None, help="write the plot here")
    f = sub.add_parser("fit", help="fit the law's calibration on the folders' cells (and check held-out folders)")
    f.add_argument("-o", nargs="+", required=True, help="work folders of `run` to fit on")
    f.add_argument("--starts", nargs="+", default=["scratch", "public"], choices=("scratch", "public"),
                   help="the starts to fit and write (default: both)")
    f.add_argument("--check", nargs="+", default=None, help="folders held out from the fit, to check the prediction")
    f.add_argument("--calibration", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                          "nnunet_dp", "law_calibration.json"),
                   help="where to write the calibration (default: the package's nnunet_dp/law_calibration.json)")
    args = ap.parse_args(argv)
    if args.command == "fit":
        fit_laws(args)
        return
    if args.command == "run":
        args.o = os.path.abspath(args.o)
        run(args)
    else:
        table(args)


if __name__ == "__main__":
    sys.exit(main())
