"""Gradient alignment: how well each scaling rule's (private) update direction follows the true gradient.

Pure functions over per-case gradients g_1..g_B (a B x d matrix G; per-parameter lists are flattened first) and a
reference direction g_bar (the batch mean of the unscaled g_i, or a given vector, e.g. a training-set mean).
Every rule is evaluated on the same gradients. With a = sum_i s_i g_i (s_i = rule.scale(||g_i||)) and noise
z ~ N(0, (sigma Delta)^2 I_d) as in the private step (docs/invariants.md, invariant 5):
  bias alignment        cos(a, g_bar)
  private alignment     E_z cos(a + z, g_bar); Monte Carlo over z (explicit generator), and the approximation
                        E cos ~= (a.g_bar / ||g_bar||) / sqrt(||a||^2 + d (sigma Delta)^2) = bias * snr / sqrt(1 + snr^2):
                        z.g_bar has mean 0 and ||a + z||^2 concentrates at ||a||^2 + d (sigma Delta)^2 (relative
                        spread sqrt(2/d)), so the error is O(1/sqrt(d)); the tests check it against Monte Carlo.
  snr                   ||a|| / (sigma Delta sqrt(d))
  normalised deviation  ||a / sum_i s_i - g_bar|| / ||g_bar||
Per case: ||g_i||, cos(g_i, mean of the other cases), cos(g_i, g_bar), s_i and the effective weight s_i ||g_i|| / Delta.
PSAC's assumption (Xia et al., AAAI 2023: small-norm per-sample gradients point away from the true gradient, so rules
that give them weight ~1 (Auto-S, NSGD) bias the update) as numbers: the Spearman rank correlation between ||g_i||
and cos(g_i, mean of the others) (> 0 where the assumption holds), and the mean of that cosine over the
smallest-norm decile against the rest. Both treat values equal up to rounding as ties (tie_groups, RANK_TIE_RTOL), so
gradients equal in exact arithmetic are not ranked by their last bits.

Cosines are clamped to [-1, 1]: rounding takes the cosine of parallel vectors (a batch of one case: a || g_bar) a
few ulps past 1 on some machines. Everything except Monte Carlo works on the Gram matrix of [g_1..g_B, g_bar] in float64, so no d-dimensional vector
beyond G itself is ever formed.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch import nn

from nnunet_dp.per_sample import LossFn, Target, batch_size_of, case_gradient, case_slice, trainable_parameters
from nnunet_dp.rules import RULE_NAMES, ScalingRule, make_rule

_CHUNK = 1 << 22  # columns of G per block (bounded float64 temporaries)
# Rank statistics tie values closer than RANK_TIE_RTOL * (their side's scale: largest |value|, at least 1 for cosines):
# tie_groups. Norms and cosines from the float64 Gram route differ between machines (BLAS blocking, threads) by
# ~sqrt(d) eps of that scale (1e-12 at d = 30 M); float32 gradients are good to ~6e-8, so less than 1e-9 means nothing.
RANK_TIE_RTOL = 1e-9


def all_rules(*, clip_norm: float, autos_gamma: float = 0.01, nsgd_r: float = 0.1,
              psac_r: float = 0.1) -> dict[str, ScalingRule]:
    """Every registered rule with the run's constants, so all rules are compared on the same gradients."""
    return {name: make_rule(name, clip_norm=clip_norm, autos_gamma=autos_gamma, nsgd_r=nsgd_r,  # type: ignore[arg-type]
                            psac_r=psac_r) for name in RULE_NAMES}


def flatten_cases(grads_per_case: Sequence[Sequence[torch.Tensor]],
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-parameter gradient lists (one list per case) -> B x d matrix, parameters concatenated in order."""
    rows = [torch.cat([g.detach().reshape(-1).to(dtype) for g in case]) for case in grads_per_case]
    return torch.stack(rows)


def case_gradient_matrix(model: nn.Module, loss_fn: LossFn, data: torch.Tensor | None, target: Target | None, *,
                         autocast: Callable[[], Any] = torch.enable_grad,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """B x d matrix of per-case gradients over every trainable parameter (per_sample.case_gradient, one case at a
    time; unreached parameters are zeros). Filled row by row: memory is G plus one case's gradient."""
    params = trainable_parameters(model)
    dim = sum(p.numel() for p in params)
    B = batch_size_of(data)
    G = torch.empty((B, dim), dtype=dtype, device=params[0].device)
    for i in range(B):
        grads, _ = case_gradient(model, params, loss_fn, case_slice(data, i), case_slice(target, i), autocast)
        offset = 0
        for g in grads:
            G[i, offset:offset + g.numel()] = g.detach().reshape(-1).to(dtype)
            offset += g.numel()
    return G


def gram(G: torch.Tensor, reference: torch.Tensor | None = None, *, chunk: int = _CHUNK) -> torch.Tensor:
    """(B+1) x (B+1) float64 inner products of [g_1..g_B, g_bar]; g_bar = batch mean of the rows when None."""
    B, dim = G.shape
    if reference is not None and reference.numel() != dim:
        raise ValueError(f"reference has {reference.numel()} entries, the gradients have d = {dim}")
    K = torch.zeros((B + 1, B + 1), dtype=torch.float64, device=G.device)
    for j in range(0, dim, chunk):
        block = G[:, j:j + chunk].double()
        ref = block.mean(0) if reference is None else reference.reshape(-1)[j:j + chunk].to(G.device).double()
        rows = torch.cat([block, ref[None]])
        K += rows @ rows.T
    return K.cpu()


def _cos(xy: float, xx: float, yy: float) -> float:
    """xy / sqrt(xx yy) clamped to [-1, 1] (parallel vectors, e.g. a batch of one case, round a few ulps past 1)."""
    return max(-1.0, min(1.0, xy / math.sqrt(xx * yy))) if xx > 0 and yy > 0 else float("nan")


def _resolved(K: torch.Tensor, x: torch.Tensor) -> float:
    """x'Kx = ||sum_i x_i v_i||^2, or 0 when it is below float64 resolution: the quadratic form carries an error of
    ~eps (sum_i |x_i| ||v_i||)^2, so a cancelled sum has no direction (its cosines are nan, never noise)."""
    q = float(x @ K @ x)
    scale = float(x.abs() @ K.diagonal().clamp_min(0).sqrt()) ** 2
    return q if q > 1e-12 * scale else 0.0


def rule_metrics(K: torch.Tensor, scales: torch.Tensor, *, dim: int, noise_std: float) -> dict[str, float]:
    """Step metrics of one rule from the Gram matrix K of [g_1..g_B, g_bar] and the scales s_i."""
    B = K.shape[0] - 1
    w = torch.cat([scales.double().cpu(), torch.zeros(1, dtype=torch.float64)])
    ref = torch.zeros(B + 1, dtype=torch.float64)
    ref[B] = 1.0
    aa, ar, rr = _resolved(K, w), float(w @ K @ ref), _resolved(K, ref)
    snr = math.sqrt(max(aa, 0.0)) / (noise_std * math.sqrt(dim))
    total = float(w.sum())
    v = w / total - ref if total > 0 else torch.full_like(w, float("nan"))
    return {
        "bias_alignment": _cos(ar, aa, rr),
        "private_alignment": _cos(ar, aa + noise_std ** 2 * dim, rr),
        "snr": snr,
        "normalized_deviation": math.sqrt(max(float(v @ K @ v), 0.0) / rr) if rr > 0 else float("nan"),
        "sum_scales": total,
    }


def case_metrics(K: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per case: ||g_i||, cos(g_i, mean of the others) (nan when B < 2), cos(g_i, g_bar)."""
    B = K.shape[0] - 1
    Kg = K[:B, :B]
    diag = Kg.diagonal()
    norms = diag.clamp_min(0).sqrt()
    row = Kg.sum(1)
    # g_i . sum_{j != i} g_j = row_i - K_ii;  ||sum_{j != i} g_j||^2 = 1'K1 - 2 row_i + K_ii  (the 1/(B-1) cancels)
    others_sq = (Kg.sum() - 2 * row + diag).clamp_min(0)
    denom = norms * others_sq.sqrt()
    cos_others = torch.where(denom > 0, ((row - diag) / denom.clamp_min(1e-300)).clamp(-1, 1),
                             torch.full_like(row, float("nan")))
    if B < 2:
        cos_others = torch.full_like(row, float("nan"))
    ref_norm = float(K[B, B].clamp_min(0).sqrt())
    denom_ref = norms * ref_norm
    cos_ref = torch.where(denom_ref > 0, (K[:B, B] / denom_ref.clamp_min(1e-300)).clamp(-1, 1),
                          torch.full_like(row, float("nan")))
    return {"norm": norms, "cos_others": cos_others, "cos_reference": cos_ref}


def tie_groups(values: Sequence[float] | np.ndarray, *, unit: float = 0.0, rtol: float = RANK_TIE_RTOL) -> np.ndarray:
    """Each (finite) value replaced by the smallest value of its tie group, so values equal up to rounding rank equal.
    tol = rtol * max(max|values|, unit); unit is the values' natural scale where their rounding error does not shrink
    with them (1 for cosines). In ascending order a group starts at its smallest value v0 and holds every value
    v <= v0 + tol; the first value beyond starts the next group. A group never spans more than tol, so a chain of
    values each within tol of the previous one is cut every tol, not merged; a value more than tol from every other
    value is never tied. Depends on the values only, not on their order."""
    v = np.asarray(values, dtype=float)
    if not np.isfinite(v).all():
        raise ValueError(f"tie_groups needs finite values, got {v[~np.isfinite(v)][:3].tolist()}")
    out = v.copy()
    if v.size == 0:
        return out
    tol = rtol * max(float(np.abs(v).max()), unit)
    anchor = -math.inf
    for i in np.argsort(v, kind="stable"):
        if v[i] - anchor > tol:
            anchor = float(v[i])
        out[i] = anchor
    return out


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, *, x_unit: float = 0.0,
             y_unit: float = 0.0, with_pvalue: bool = False) -> Any:
    """Spearman rank correlation over the finite pairs: scipy.stats.spearmanr on tie_groups of each side (with
    x_unit, y_unit), so values within RANK_TIE_RTOL of a side's scale tie and get average ranks. nan with fewer than
    3 pairs or a side that is one tie group. With with_pvalue: (rho, two-sided p-value)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3:
        return (float("nan"), float("nan")) if with_pvalue else float("nan")
    xt, yt = tie_groups(x[ok], unit=x_unit), tie_groups(y[ok], unit=y_unit)
    if np.ptp(xt) == 0 or np.ptp(yt) == 0:
        return (float("nan"), float("nan")) if with_pvalue else float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = stats.spearmanr(xt, yt)
    return (float(res.statistic), float(res.pvalue)) if with_pvalue else float(res.statistic)


def decile_weights(norms: Sequence[float] | np.ndarray, k: int) -> np.ndarray:
    """Each case's share of the k smallest-norm places, norms tied by tie_groups: 1 below the boundary, 0 above, and
    (places left) / (cases tied) for a tie group the boundary cuts, the mean over every order of the tied cases."""
    groups = tie_groups(norms)
    ordered = np.sort(groups)
    below = np.searchsorted(ordered, groups, side="left")
    tied = np.searchsorted(ordered, groups, side="right") - below
    return np.clip((k - below) / tied, 0.0, 1.0)


def psac_assumption(norms: Sequence[float] | np.ndarray, cos_others: Sequence[float] | np.ndarray, *,
                    fraction: float = 0.1) -> dict[str, float]:
    """PSAC's premise as numbers: rank correlation of ||g_i|| with cos(g_i, mean of the others), and the mean of
    that cosine over the k = ceil(fraction * n) smallest-norm cases ('small_decile_cos', tied norms share the places
    at the boundary: decile_weights) against the rest ('rest_cos'); decile_gap = rest_cos - small_decile_cos (> 0:
    small-norm cases are less aligned, as PSAC assumes). All nan with fewer than 2 cases or all norms tied."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    n_arr, c_arr = np.asarray(norms, dtype=float), np.asarray(cos_others, dtype=float)
    ok = np.isfinite(n_arr) & np.isfinite(c_arr)
    n_arr, c_arr = n_arr[ok], c_arr[ok]
    nan = float("nan")
    if len(n_arr) < 2 or np.ptp(tie_groups(n_arr)) == 0:
        return {"spearman_norm_cos": nan, "small_decile_cos": nan, "rest_cos": nan, "decile_gap": nan}
    k = min(max(1, math.ceil(fraction * len(n_arr))), len(n_arr) - 1)
    w = decile_weights(n_arr, k)
    small, rest = float(w @ c_arr / k), float((1 - w) @ c_arr / (len(n_arr) - k))
    return {"spearman_norm_cos": spearman(n_arr, c_arr, y_unit=1.0), "small_decile_cos": small, "rest_cos": rest,
            "decile_gap": rest - small}


def private_alignment_mc(G: torch.Tensor, K: torch.Tensor, weights: torch.Tensor, *, noise_std: float, draws: int,
                         generator: torch.Generator, reference: torch.Tensor | None = None,
                         chunk: int = _CHUNK) -> torch.Tensor:
    """Monte Carlo E_z cos(a_r + z, g_bar) for each row w_r of `weights` (R x B; a_r = sum_i w_ri g_i), with
    z ~ N(0, noise_std^2 I_d) drawn blockwise from `generator` (on G's device) and shared by all rules."""
    B, dim = G.shape
    W = weights.double().cpu()
    aa = torch.einsum("rb,bc,rc->r", W, K[:B, :B], W)
    ar, rr = W @ K[:B, B], float(K[B, B])
    out = torch.zeros(W.shape[0], dtype=torch.float64)
    for _ in range(draws):
        Gz = torch.zeros(B, dtype=torch.float64, device=G.device)
        rz = torch.zeros((), dtype=torch.float64, device=G.device)
        zz = torch.zeros((), dtype=torch.float64, device=G.device)
        for j in range(0, dim, chunk):
            block = G[:, j:j + chunk].double()
            z = torch.randn(block.shape[1], generator=generator, device=G.device, dtype=torch.float64) * noise_std
            Gz += block @ z
            zz += z @ z
            if reference is not None:
                rz += reference.reshape(-1)[j:j + chunk].to(G.device).double() @ z
        rz_val = float(Gz.mean()) if reference is None else float(rz)
        Gz_c = Gz.cpu()
        out += ((ar + rz_val) / torch.sqrt(rr * (aa + 2 * (W @ Gz_c) + float(zz)))).clamp(-1, 1)
    return out / draws


@dataclass(frozen=True)
class BatchAlignment:
    """All metrics of one batch: per rule, per case, and PSAC's assumption."""

    dim: int
    noise_multiplier: float
    rules: dict[str, dict[str, float]]  # rule -> step metrics
    cases: dict[str, np.ndarray]  # norm, cos_others, cos_reference, scale_<rule>, weight_<rule>
    psac: dict[str, float]

    @property
    def batch_size(self) -> int:
        return len(self.cases["norm"])


def analyse_batch(G: torch.Tensor, rules: Mapping[str, ScalingRule], *, noise_multiplier: float,
                  reference: torch.Tensor | None = None, mc_draws: int = 0,
                  generator: torch.Generator | None = None) -> BatchAlignment:
    """Every metric for every rule on the same per-case gradients G (B x d, B >= 1)."""
    if G.ndim != 2 or G.shape[0] < 1:
        raise ValueError(f"G must be a B x d matrix with B >= 1, got shape {tuple(G.shape)}")
    if mc_draws > 0 and generator is None:
        raise ValueError("Monte Carlo needs an explicit torch.Generator (on G's device)")
    dim = G.shape[1]
    K = gram(G, reference)
    cases = case_metrics(K)
    out_cases = {k: v.numpy() for k, v in cases.items()}
    per_rule: dict[str, dict[str, float]] = {}
    weights = []
    for name, rule in rules.items():
        s = rule.scale(cases["norm"]).double()
        weights.append(s)
        m = rule_metrics(K, s, dim=dim, noise_std=noise_multiplier * rule.sensitivity)
        m["mean_effective_weight"] = float((s * cases["norm"]).mean() / rule.sensitivity)
        per_rule[name] = m
        out_cases[f"scale_{name}"] = s.numpy()
        out_cases[f"weight_{name}"] = (s * cases["norm"] / rule.sensitivity).numpy()
    by_std: dict[float, list[int]] = {}  # one Monte Carlo per noise std: every rule sees the same draws
    for idx, rule in enumerate(rules.values()):
        by_std.setdefault(noise_multiplier * rule.sensitivity, []).append(idx)
    names = list(rules)
    for std, idxs in by_std.items():
        mc = torch.full((len(idxs),), float("nan"), dtype=torch.float64) if mc_draws <= 0 else private_alignment_mc(
            G, K, torch.stack([weights[i] for i in idxs]), noise_std=std, draws=mc_draws, generator=generator,
            reference=reference)
        for i, value in zip(idxs, mc.tolist()):
            per_rule[names[i]]["private_alignment_mc"] = value
    psac = psac_assumption(out_cases["norm"], out_cases["cos_others"])
    return BatchAlignment(dim=dim, noise_multiplier=float(noise_multiplier), rules=per_rule, cases=out_cases,
                          psac=psac)

