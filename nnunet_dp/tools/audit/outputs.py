"""The audit's files: the per-case CSV and the PNG plots (matplotlib Figures on the Agg canvas, no pyplot)."""
from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

CASE_FIELDS = ("case_id", "member", "loss", "dice")


def write_cases_csv(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """One row per case (case_id, member 0/1, loss, dice), written to a temporary file and moved into place."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CASE_FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow({"case_id": r["case_id"], "member": int(r["member"]), "loss": repr(float(r["loss"])),
                             "dice": repr(float(r["dice"]))})
    os.replace(tmp, path)


def _save(fig: Figure, path: str) -> None:
    FigureCanvasAgg(fig)
    fig.tight_layout(rect=(0, 0.05 if fig.texts else 0, 1, 1))  # room for a caption (fig.text) at the bottom
    fig.savefig(path, dpi=110)


def roc_plot(path: str, curves: Mapping[str, Mapping[str, Any]], *, title: str, caption: str) -> None:
    """`roc_figure` written to `path`."""
    _save(roc_figure(curves, title=title, caption=caption), path)


def roc_figure(curves: Mapping[str, Mapping[str, Any]], *, title: str, caption: str) -> Figure:
    """ROC curves of the score attacks (name -> {'roc': {'fpr', 'tpr'}, 'auc'}): linear axes and log-log axes (the
    low-FPR regime), with the chance diagonal; `caption` (e.g. that the plot is private) below both."""
    fig = Figure(figsize=(10, 4.9))
    for i, log in enumerate((False, True)):
        ax = fig.add_subplot(1, 2, i + 1)
        for name, c in curves.items():
            fpr, tpr = np.asarray(c["roc"]["fpr"]), np.asarray(c["roc"]["tpr"])
            keep = (fpr > 0) & (tpr > 0) if log else np.ones_like(fpr, dtype=bool)
            ax.plot(fpr[keep], tpr[keep], marker=".", label=f"{name} (AUC {c['auc']:.3f})")
        lo = 1e-3 if log else 0.0
        ax.plot([lo, 1], [lo, 1], color="grey", linestyle=":", label="chance")
        if log:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlim(lo, 1)
            ax.set_ylim(lo, 1.05)
        ax.set_xlabel("false positive rate (non-members called members)")
        ax.set_ylabel("true positive rate (members found)")
        ax.set_title(("log-log: low FPR" if log else "ROC") + f" - {title}", fontsize=9)
        ax.legend(fontsize=8, loc="lower right")
    fig.text(0.5, 0.01, caption, ha="center", va="bottom", fontsize=9, color="tab:red")
    return fig


def canary_histogram(path: str, scores: Sequence[float], included: Sequence[bool], *, title: str) -> None:
    """Histograms of the canary scores, included vs not included (the more they separate, the higher eps_lower)."""
    s, inc = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    bins = np.histogram_bin_edges(s, bins=min(60, max(10, s.size // 15)))
    ax.hist(s[~inc], bins=bins, alpha=0.6, label=f"not included ({int((~inc).sum())})", color="tab:blue")
    ax.hist(s[inc], bins=bins, alpha=0.6, label=f"included ({int(inc.sum())})", color="tab:red")
    ax.set_xlabel("canary score (higher = guessed 'included')")
    ax.set_ylabel("canaries")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    _save(fig, path)
