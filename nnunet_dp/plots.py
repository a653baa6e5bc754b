"""Alignment plots (matplotlib Figures on the Agg canvas, no pyplot): alignment per rule over steps, ||g_i|| against cos(g_i, g_bar),
per-rule weight curves s(||g||) ||g|| / Delta, and the histogram of per-case gradient norms.

Each figure is drawn by a function on a matplotlib Axes, so the same drawing makes the single PNGs and the overview.
Inputs are the CSV rows of nnunet_dp.alignment_report (dicts), never tensors.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from nnunet_dp.rules import ScalingRule

Rows = Sequence[Mapping[str, Any]]
_COLORS = {"flat": "tab:blue", "autos": "tab:orange", "nsgd": "tab:green", "psac": "tab:red"}
_LABELS = {"flat": "flat (Abadi)", "autos": "Auto-S", "nsgd": "NSGD", "psac": "PSAC"}


def _finite(values: Sequence[float]) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    return arr[np.isfinite(arr)]


def draw_alignment(ax: Axes, steps: Rows, *, metric: str = "bias_alignment", title: str | None = None) -> None:
    """One line per rule over consecutive steps; sources (checkpoints) are separated by dotted lines."""
    sources = list(dict.fromkeys(r["source"] for r in steps))
    offsets, start = {}, 0
    for src in sources:
        offsets[src] = start - min(int(r["step"]) for r in steps if r["source"] == src)
        start += len({r["step"] for r in steps if r["source"] == src})
    for rule in dict.fromkeys(r["rule"] for r in steps):
        rows = [r for r in steps if r["rule"] == rule]
        x = [int(r["step"]) + offsets[r["source"]] for r in rows]
        ax.plot(x, [r[metric] for r in rows], marker=".", lw=1, color=_COLORS.get(rule), label=_LABELS.get(rule, rule))
    if len(sources) > 1:
        for src in sources:
            x0 = min(int(r["step"]) + offsets[src] for r in steps if r["source"] == src)
            ax.axvline(x0 - 0.5, color="0.6", ls=":", lw=1)
            ax.text(x0, 0.98, str(src), transform=ax.get_xaxis_transform(), va="top", fontsize=7, color="0.3")
    ax.set_xlabel("DP step" if sources == ["training"] else "batch" if len(sources) == 1 else "batch, per checkpoint")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title(title or metric.replace("_", " "), fontsize=9)
    ax.legend(fontsize=7)


def _norm_axis(ax: Axes, values: np.ndarray) -> None:
    """Log scale over a decade or more, linear (with plain tick labels) over a narrower range."""
    if values.size and values.min() > 0 and values.max() / values.min() >= 10:
        ax.set_xscale("log")


def draw_scatter(ax: Axes, cases: Rows, *, y: str = "cos_reference") -> None:
    """||g_i|| against cos(g_i, g_bar) or cos(g_i, mean of the others), one colour per source. With a batch-mean
    g_bar, g_i is part of g_bar, which lifts the cosine of large-norm cases: PSAC's premise is read on cos_others."""
    for src in dict.fromkeys(r["source"] for r in cases):
        rows = [r for r in cases if r["source"] == src and math.isfinite(r[y]) and r["norm"] > 0]
        ax.scatter([r["norm"] for r in rows], [r[y] for r in rows], s=8, alpha=0.6, label=str(src))
    _norm_axis(ax, _finite([r["norm"] for r in cases]))
    ax.set_xlabel("per-case gradient norm ||g_i||")
    ax.set_ylabel({"cos_reference": "cos(g_i, g_bar)", "cos_others": "cos(g_i, mean of others)"}.get(y, y))
    ax.set_title("PSAC assumes: small norm -> low alignment" if y == "cos_others"
                 else "norm vs alignment with g_bar (g_bar includes g_i)", fontsize=9)
    ax.legend(fontsize=7)


def draw_weight_curves(ax: Axes, rules: Mapping[str, ScalingRule], norms: Sequence[float]) -> None:
    """s(||g||) ||g|| / Delta against ||g|| over the observed range: how much each case can move the sum."""
    obs = _finite(norms)
    obs = obs[obs > 0]
    lo, hi = (obs.min() / 3, obs.max() * 3) if obs.size else (1e-3, 1e2)
    grid = torch.logspace(math.log10(lo), math.log10(hi), 200, dtype=torch.float64)
    for name, rule in rules.items():
        weight = (rule.scale(grid) * grid / rule.sensitivity).numpy()
        ax.plot(grid.numpy(), weight, color=_COLORS.get(name), label=_LABELS.get(name, name))
    if obs.size:
        ax.plot(obs, np.full(obs.shape, -0.03), "|", color="0.3", ms=6, alpha=0.5, label="observed ||g_i||")
    ax.set_xscale("log")
    ax.set_ylim(-0.08, 1.05)
    ax.set_xlabel("||g||")
    ax.set_ylabel("effective weight s(||g||) ||g|| / Delta")
    ax.set_title("per-rule weight curves", fontsize=9)
    ax.legend(fontsize=7)


def draw_norm_histogram(ax: Axes, norms: Sequence[float], *, clip_norm: float | None = None) -> None:
    obs = _finite(norms)
    obs = obs[obs > 0]
    if obs.size:
        bins = np.logspace(np.log10(obs.min()), np.log10(obs.max()) + 1e-9, 30) if obs.max() > obs.min() else 10
        ax.hist(obs, bins=bins, color="0.5")
        _norm_axis(ax, obs)
    if clip_norm is not None:
        ax.axvline(clip_norm, color=_COLORS["flat"], ls="--", lw=1, label=f"C = {clip_norm:g}")
        ax.legend(fontsize=7)
    ax.set_xlabel("per-case gradient norm ||g_i||")
    ax.set_ylabel("cases")
    ax.set_title(f"norm histogram ({obs.size} cases)", fontsize=9)


def _figure(width: float, height: float) -> Figure:
    """A Figure on the Agg canvas, outside pyplot: no global backend or figure registry is touched."""
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def save_plots(folder: str, steps: Rows, cases: Rows, rules: Mapping[str, ScalingRule], *,
               prefix: str = "") -> list[str]:
    """Write alignment_steps, private_alignment_steps, norm_vs_alignment, weight_curves, norm_histogram and
    overview PNGs into `folder`; returns their paths. Case plots are skipped when there are no case rows."""
    os.makedirs(folder, exist_ok=True)
    clip = next(iter(rules.values())).clip_norm if rules else None
    norms = [r["norm"] for r in cases]
    out = []
    private = "private_alignment_mc" if all(math.isfinite(r["private_alignment_mc"]) for r in steps) \
        else "private_alignment"
    for name, metric in (("bias", "bias_alignment"), ("private", private)):
        fig = _figure(6, 3.5)
        ax = fig.subplots()
        draw_alignment(ax, steps, metric=metric)
        out.append(_save(fig, os.path.join(folder, f"{prefix}{name}_alignment_steps.png")))
    if cases:
        fig = _figure(10, 3.5)
        axes = fig.subplots(1, 2, sharey=True)
        draw_scatter(axes[0], cases, y="cos_reference")
        draw_scatter(axes[1], cases, y="cos_others")
        out.append(_save(fig, os.path.join(folder, f"{prefix}norm_vs_alignment.png")))
        for name, draw in (("weight_curves", lambda ax: draw_weight_curves(ax, rules, norms)),
                           ("norm_histogram", lambda ax: draw_norm_histogram(ax, norms, clip_norm=clip))):
            fig = _figure(5, 3.5)
            ax = fig.subplots()
            draw(ax)
            out.append(_save(fig, os.path.join(folder, f"{prefix}{name}.png")))
        fig = _figure(10, 7)
        axes = fig.subplots(2, 2)
        draw_alignment(axes[0, 0], steps, metric="bias_alignment", title="bias alignment cos(sum s_i g_i, g_bar)")
        draw_alignment(axes[0, 1], steps, metric=private, title="private alignment E cos(sum s_i g_i + z, g_bar)")
        draw_scatter(axes[1, 0], cases, y="cos_others")
        draw_weight_curves(axes[1, 1], rules, norms)
        out.append(_save(fig, os.path.join(folder, f"{prefix}overview.png")))
    return out
