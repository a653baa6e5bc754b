"""Gradient projection onto a subspace estimated from public data (settings `projection: public`, `projection_dim` k).

PDP-SGD (Zhou, Wu, Banerjee, "Bypassing the ambient dimension: private SGD with gradient subspace identification",
ICLR 2021) and GEP (Yu, Zhang, Chen, Yin, Liu, "Do not let privacy overbill utility: gradient embedding
perturbation for private learning", ICLR 2021): the case gradients of a network lie close to a low-dimensional
subspace, which gradients on public cases reveal. Adding the noise in that k-dimensional subspace instead of all d
trained dimensions divides the noise's norm by sqrt(d / k).

The mechanism, per step. g_i is case i's gradient after the rule's scaling (||g_i|| <= Delta). The trained
coordinates split into P (projected: parameters the public gradients cover) and R (the rest, e.g. segmentation heads
whose labels differ from the public model's: no public gradient exists for them); V is d_P x k with orthonormal
columns, computed from public cases only (`top_subspace`):

    u_P = V^T sum_i g_i,P + sigma Delta z_k,      u_R = sum_i g_i,R + sigma Delta z_R,      z ~ N(0, I)
    update = (V u_P, u_R) / (qN)

Privacy: the map g -> (V^T g_P, g_R) does not increase norms (V^T V = I_k, so ||V^T x|| <= ||x||); adding or removing
a case moves the released (k + d_R)-vector by at most Delta, and N(0, (sigma Delta)^2 I) on it is exactly the Gaussian
mechanism the accountant counts (same sigma, q and steps as without projection). V is fixed before training from
public data only, so V u_P is post-processing. GEP also releases the residual g_P - V V^T g_P, clipped separately
with a second Gaussian mechanism over all d_P coordinates; PDP-SGD does not, and neither do we: that residual noise is
what the projection exists to avoid, and GEP's own ablation gives it a small share of the budget.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nnunet_dp.noise import add_gaussian_noise_


@dataclass(frozen=True)
class Projection:
    """V (d_P x k, orthonormal columns) and which trained tensors it covers (`projected[j]` for tensor j)."""

    basis: torch.Tensor
    projected: tuple[bool, ...]

    @property
    def dim(self) -> int:
        return int(self.basis.shape[1])

    def noise_dimensions(self, sizes: Sequence[int]) -> int:
        """k + d_R: the coordinates the noise is drawn in."""
        return self.dim + sum(n for n, p in zip(sizes, self.projected, strict=True) if not p)


def top_subspace(gradients: torch.Tensor, k: int, *, chunk: int = 1 << 20) -> torch.Tensor:
    """The top-k right singular vectors of the m x d matrix G of public gradients (d x k, orthonormal columns): the
    subspace that holds most of the public gradients' second moment G^T G (PDP-SGD eq. 5; GEP's anchor subspace).
    Through the m x m Gram matrix K = G G^T = U L U^T (float64, accumulated over column chunks, so G is never copied
    whole in float64): V = G^T U_k L_k^(-1/2), the same vectors as the SVD's for m << d. Each column's sign is fixed
    (its entry of largest magnitude is positive): eigh may return v or -v, e.g. for the same G with other threads,
    and the noise V z depends on the sign (the projection V V^T does not)."""
    if gradients.ndim != 2:
        raise ValueError(f"public gradients must be an m x d matrix, got shape {tuple(gradients.shape)}")
    m, d = gradients.shape
    if not 1 <= k <= min(m, d):
        raise ValueError(f"projection_dim k = {k} needs 1 <= k <= min(m, d) = min({m} public gradients, d = {d})")
    if not torch.isfinite(gradients).all():
        raise ValueError("public gradients hold non-finite values: check the public model and data")
    gram = torch.zeros(m, m, dtype=torch.float64)
    for start in range(0, d, chunk):
        part = gradients[:, start:start + chunk].double()
        gram += part @ part.T
    values, vectors = torch.linalg.eigh(gram)  # ascending
    values, vectors = values.flip(0)[:k], vectors.flip(1)[:, :k]
    if values[-1] <= 1e-12 * max(float(values[0]), 1e-300):
        raise ValueError(f"the public gradients span fewer than projection_dim = {k} dimensions: lower it or use more "
                         "public samples")
    basis = torch.empty(d, k, dtype=torch.float64)
    for start in range(0, d, chunk):
        basis[start:start + chunk] = gradients[:, start:start + chunk].double().T @ vectors / values.sqrt()
    peaks = basis.gather(0, basis.abs().argmax(dim=0, keepdim=True))
    return basis * torch.where(peaks < 0, -1.0, 1.0)


def _split(tensors: Sequence[torch.Tensor], projected: Sequence[bool]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    if len(tensors) != len(projected):
        raise ValueError(f"projection covers {len(projected)} trained tensors, the step has {len(tensors)}")
    return [t for t, p in zip(tensors, projected) if p], [t for t, p in zip(tensors, projected) if not p]


def project_(summed: list[torch.Tensor], projection: Projection) -> None:
    """In place, on every rank: the P part of the summed gradients becomes V V^T (its flattened P part)."""
    part, _ = _split(summed, projection.projected)
    if not part:
        return
    flat = torch.cat([t.reshape(-1) for t in part])
    basis = projection.basis.to(flat.device, flat.dtype)
    flat = basis @ (basis.T @ flat)
    for t, chunk in zip(part, flat.split([t.numel() for t in part])):
        t.copy_(chunk.view(t.shape))


def add_projected_noise_(summed: list[torch.Tensor], projection: Projection, *, std: float,
                         generator: torch.Generator) -> None:
    """In place: V (std z_k) on the P part, std z_R on the rest (one draw of k + d_R normals; never data-dependent)."""
    part, rest = _split(summed, projection.projected)
    if part:
        z = torch.randn(projection.dim, generator=generator, device=generator.device, dtype=torch.float32)
        basis = projection.basis.to(part[0].device, torch.float64)
        noise = (basis @ z.to(part[0].device, torch.float64)) * std
        for t, chunk in zip(part, noise.split([t.numel() for t in part])):
            t.add_(chunk.view(t.shape).to(t.dtype))
    if rest:
        add_gaussian_noise_(rest, std=std, generator=generator)
