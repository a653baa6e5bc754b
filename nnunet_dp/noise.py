"""The Gaussian mechanism: N(0, (sigma * Delta)^2) added once per step, drawn from an explicit torch.Generator."""
from __future__ import annotations

import secrets
from collections.abc import Sequence

import numpy as np
import torch


def make_generator(device: torch.device, seed: int | None) -> torch.Generator:
    """A generator on `device`, seeded from `seed`, or from the OS's entropy pool when seed is None."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else secrets.randbits(63))
    return gen


def stream_seed(seed: int, stream: int) -> int:
    """A generator seed for stream `stream` of an explicit seed (reproducible mode: e.g. the steps already taken, so
    that a resumed run never replays the noise of earlier steps)."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1, np.uint64)[0]) & (2**63 - 1)


def add_gaussian_noise_(tensors: Sequence[torch.Tensor], *, std: float, generator: torch.Generator) -> None:
    """In place: every element of every tensor gets an independent N(0, std^2) draw (std = sigma * Delta).

    The draw depends only on the shapes and the generator, never on the tensors' values (batch contents). One
    float32 draw covers all tensors of a device (one kernel instead of one per parameter tensor); it is then split
    into views and added with one foreach call.
    """
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t)
    for device, group in by_device.items():
        if device.type != generator.device.type:  # a "cuda" generator serves "cuda:0" tensors; torch checks indices
            raise ValueError(f"noise generator on {generator.device}, tensors on {device}")
        flat = torch.randn(sum(t.numel() for t in group), generator=generator, device=device, dtype=torch.float32)
        noise = [n.view(t.shape).to(t.dtype) for n, t in zip(flat.split([t.numel() for t in group]), group)]
        torch._foreach_add_(group, noise, alpha=std)
