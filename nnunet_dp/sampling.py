"""Poisson sampling of training cases: each case is included independently with probability q at every step."""
from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def poisson_sample(items: Sequence[T], *, sampling_rate: float, rng: np.random.Generator) -> list[T]:
    """Each item independently with probability `sampling_rate`; the result may be empty. Order is preserved."""
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate}")
    mask = rng.random(len(items)) < sampling_rate
    return [items[i] for i in np.flatnonzero(mask)]


def shard(items: Sequence[T], *, rank: int, world_size: int) -> list[T]:
    """The cases owned by one rank under torch.distributed: a disjoint partition, so that Poisson sampling on every
    rank with the same q includes each case exactly with probability q (and never twice)."""
    return [x for i, x in enumerate(items) if i % world_size == rank]
