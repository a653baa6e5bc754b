"""Under torch.distributed (gloo, 2 CPU processes) the noise is drawn once across ranks and the sums add up, in one
all-reduce per step (docs/multi_gpu.md: the per-step communication)."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nnunet_dp.noise import make_generator
from nnunet_dp.step import privatize_


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    calls, all_reduce = [], dist.all_reduce
    dist.all_reduce = lambda t, *a, **k: calls.append(t.numel()) or all_reduce(t, *a, **k)
    summed = [torch.full((3, 4), float(rank + 1), dtype=torch.float64), torch.full((5,), 10.0 * (rank + 1),
                                                                                  dtype=torch.float64)]
    privatize_(summed, noise_multiplier=2.0, sensitivity=0.5, expected_batch_size=4.0,
               generator=make_generator(torch.device("cpu"), seed=11 + rank))
    dist.all_reduce = all_reduce
    assert calls == [12 + 5], calls  # one all-reduce of all d numbers, not one per tensor
    torch.save(summed, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_noise_once_across_ranks(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for a, b in zip(r0, r1):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # every rank steps with the same gradient
    # reference: sum of both ranks' scaled sums + ONE draw of rank 0's generator (std sigma*Delta), / qN
    gen = make_generator(torch.device("cpu"), seed=11)
    flat = torch.randn(12 + 5, generator=gen, dtype=torch.float32).double()  # one draw for all tensors
    expected = [(3.0 + flat[:12].view(3, 4)) / 4.0, (30.0 + flat[12:]) / 4.0]
    for got, exp in zip(r0, expected):
        torch.testing.assert_close(got, exp, rtol=1e-6, atol=1e-6)
