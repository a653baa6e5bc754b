"""Poisson sampling of cases: inclusion frequency and batch-size moments match q; empty batches happen."""
import numpy as np
import pytest

from nnunet_dp.sampling import poisson_sample, shard


def test_inclusion_frequency_and_batch_size_moments():
    n, q, steps = 50, 0.08, 20000
    rng = np.random.default_rng(0)
    counts = np.zeros(n)
    sizes = []
    for _ in range(steps):
        sel = poisson_sample(list(range(n)), sampling_rate=q, rng=rng)
        assert len(set(sel)) == len(sel)  # never the same case twice
        counts[sel] += 1
        sizes.append(len(sel))
    freq = counts / steps
    # each case: binomial(steps, q) -> sd sqrt(q(1-q)/steps) ~ 0.0019; 5 sd
    assert np.all(np.abs(freq - q) < 5 * np.sqrt(q * (1 - q) / steps))
    sizes = np.array(sizes)
    assert abs(sizes.mean() - n * q) < 5 * np.sqrt(n * q * (1 - q) / steps)
    assert abs(sizes.var() - n * q * (1 - q)) < 0.1 * n * q * (1 - q)
    assert (sizes == 0).mean() == pytest.approx((1 - q) ** n, abs=0.01)


def test_empty_and_full():
    rng = np.random.default_rng(1)
    assert poisson_sample([], sampling_rate=0.5, rng=rng) == []
    assert poisson_sample(list("abc"), sampling_rate=1.0, rng=rng) == list("abc")
    with pytest.raises(ValueError):
        poisson_sample(list("abc"), sampling_rate=0.0, rng=rng)


def test_shards_partition_cases():
    cases = [f"c{i}" for i in range(11)]
    parts = [shard(cases, rank=r, world_size=3) for r in range(3)]
    assert sorted(c for part in parts for c in part) == sorted(cases)
    assert not set(parts[0]) & set(parts[1])
