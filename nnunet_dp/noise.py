"""The Gaussian mechanism: N(0, (sigma * Delta)^2) added once per step, drawn from an explicit torch.Generator."""
from __future__ import annotations

import secrets
from collections.abc import Sequence

import torch


def make_generator(device: torch.device, seed: int | None) -> torch.Generator:
    """A generator on `device`, seeded from `seed`, or from the OS's entropy pool when seed is None."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else secrets.randbits(63))
    return gen


def add_gaussian_noise_(tensors: Sequence[torch.Tensor], *, std: float, generator: torch.Generator) -> None:
    """In place: every element of every tensor gets an independent N(0, std^2) draw (std = sigma * Delta).

    The draw depends only on the shapes and the generator, never on the tensors' values (batch contents).
    """
    for t in tensors:
        noise = torch.randn(t.shape, generator=generator, device=t.device, dtype=torch.float32)
        t.add_(noise.to(t.dtype), alpha=std)
