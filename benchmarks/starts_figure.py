"""From scratch vs fine-tuned vs fine-tuned with a lever: one table and one plot from nnUNetv2_dp_experiment folders.

    python benchmarks/starts_figure.py OUT.png --title Dataset904 --epsilon 8 \
        "from scratch=EXP_SCRATCH" "fine-tuned=EXP_PUBLIC" ["LABEL=EXP[:CELL_SUFFIX]" ...]

Each "LABEL=FOLDER" is one start: its DP cells are the runs of FOLDER/runs/*/result.json whose cell is
`<rule>_eps<ε>` (or `<rule>_eps<ε>_<CELL_SUFFIX>` with ":CELL_SUFFIX", e.g. ":decoder", ":ema0.99"), repeats pooled
(mean ± sample sd, n). A folder's `nonprivate` cell is its reference and its `public_alone` run the public model
alone; both are drawn as lines and listed once per folder. Prints the markdown table (test Dice, the refinement modes
given by --modes, the ratio to the reference of the first start with a public model or else the first start) and
saves the plot (one panel per mode, a bar per rule and start, error bars = sd).

Made the "three starts" table and figure of docs/results.md.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
from collections import defaultdict

import matplotlib
import numpy as np

from nnunet_dp.experiment import report

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RULES = {"flat": "flat", "autos": "Auto-S", "nsgd": "NSGD", "psac": "PSAC"}
MODES = ("none", "global", "adaptive")


def cells(folder: str) -> dict[str, list[dict]]:
    """result.json files of an experiment folder, by cell (repeats of a cell together); failed runs (the harness's
    status "failed", no scores) are left out, as the harness's own tables leave them out of a cell's mean."""
    out: dict[str, list[dict]] = defaultdict(list)
    for path in sorted(glob.glob(os.path.join(folder, "runs", "*", "result.json"))):
        with open(path) as f:
            r = json.load(f)
        if not report.failed(r):
            out[r.get("cell", r["run"])].append(r)
    return out


def stat(runs: list[dict], mode: str) -> tuple[float, float | None, int] | None:
    """(mean, sample sd or None for one run, n) of the mean test Dice under `mode`; None if no run scored it."""
    v = [r["scores"][mode]["dice_mean"] for r in runs if mode in r.get("scores", {})]
    if not v:
        return None
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else None), len(v)


def _fmt(s, ref: float | None) -> str:
    if s is None:
        return "not run"
    mean, sd, n = s
    text = f"{mean:.4f}" + (f" ± {sd:.4f}" if sd is not None else "") + f" (n = {n})"
    return text + (f", {mean / ref:.3f} ×" if ref else "")


def parse_start(arg: str) -> tuple[str, str, str]:
    if "=" not in arg:
        raise SystemExit(f"start {arg!r}: expected LABEL=FOLDER[:CELL_SUFFIX]")
    label, rest = arg.split("=", 1)
    folder, _, suffix = rest.partition(":")
    if not os.path.isdir(os.path.join(folder, "runs")):
        raise SystemExit(f"start {label!r}: {folder}/runs is not a folder (an nnUNetv2_dp_experiment -o folder?)")
    return label, folder, suffix


def table(starts: list[tuple[str, str, str]], epsilon: int, modes: tuple[str, ...]) -> tuple[str, dict]:
    """The markdown table and the numbers behind it: {(label, rule): {mode: stat}} and the lines."""
    loaded = {folder: cells(folder) for _, folder, _ in starts}
    has_public = [f for _, f, _ in starts if "public_alone" in loaded[f]]
    ref_folder = has_public[0] if has_public else starts[0][1]
    ref = {m: (s[0] if (s := stat(loaded[ref_folder].get("nonprivate", []), m)) else None) for m in modes}
    bars, lines = {}, {}
    head = "| rule | start | " + " | ".join(f"test Dice, DP-Morph {m}" for m in modes) + " |"
    rows = [head, "|" + "---|" * (2 + len(modes))]
    for rule, name in RULES.items():
        for label, folder, suffix in starts:
            cell = f"{rule}_eps{epsilon}" + (f"_{suffix}" if suffix else "")
            bars[(label, rule)] = {m: stat(loaded[folder].get(cell, []), m) for m in modes}
            rows.append(f"| {name} | {label} | " + " | ".join(_fmt(bars[(label, rule)][m], ref[m]) for m in modes)
                        + " |")
    seen = set()
    for label, folder, _ in starts:
        if folder in seen:
            continue
        seen.add(folder)
        for cell, what in (("public_alone", "public model alone"), ("nonprivate", "non-private reference")):
            if cell in loaded[folder]:
                lines[f"{what} ({label})"] = {m: stat(loaded[folder][cell], m) for m in modes}
                rows.append(f"| – | {what} ({label}) | "
                            + " | ".join(_fmt(lines[f'{what} ({label})'][m], ref[m]) for m in modes) + " |")
    return "\n".join(rows), {"bars": bars, "lines": lines}


def plot(path: str, title: str, epsilon: int, starts, numbers: dict, modes: tuple[str, ...]) -> None:
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4.2), squeeze=False)
    width = 0.8 / len(starts)
    styles = ("--", "-.", ":", (0, (5, 1)), (0, (1, 3)))
    for ax, mode in zip(axes[0], modes):
        for k, (label, _, _) in enumerate(starts):
            xs, ys, es = [], [], []
            for i, rule in enumerate(RULES):
                s = numbers["bars"][(label, rule)][mode]
                if s is not None:
                    xs.append(i + (k - (len(starts) - 1) / 2) * width)
                    ys.append(s[0])
                    es.append(s[1] or 0.0)
            ax.bar(xs, ys, width, yerr=es, capsize=2, label=label)
        for j, (name, by_mode) in enumerate(numbers["lines"].items()):
            if by_mode[mode] is not None:
                ax.axhline(by_mode[mode][0], color=f"C{len(starts) + j}", ls=styles[j % len(styles)], lw=1.2,
                           label=name)
        ax.set_xticks(range(len(RULES)), list(RULES.values()))
        ax.set_ylim(0, 1)
        ax.set_ylabel("test Dice (mean over classes)")
        ax.set_title(f"{title}, ε = {epsilon}, DP-Morph {mode}")
        ax.grid(axis="y", alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="the plot (PNG)")
    p.add_argument("starts", nargs="+", help="LABEL=FOLDER[:CELL_SUFFIX]")
    p.add_argument("--epsilon", type=int, required=True)
    p.add_argument("--title", default="")
    p.add_argument("--modes", nargs="+", default=["none", "adaptive"], choices=MODES)
    a = p.parse_args(argv)
    starts = [parse_start(s) for s in a.starts]
    text, numbers = table(starts, a.epsilon, tuple(a.modes))
    print(text)
    plot(a.out, a.title, a.epsilon, starts, numbers, tuple(a.modes))
    print(f"saved {a.out}")


if __name__ == "__main__":
    main()
