"""`nnUNetv2_train ... -num_gpus N` on CPU processes, for tests/test_ddp_e2e.py.

Runs nnU-Net's own entry point unchanged: run_training_entry parses the command line, run_training sets MASTER_ADDR /
MASTER_PORT and calls torch.multiprocessing.spawn(run_ddp, nprocs=N), and each rank runs run_ddp (trainer from the
arguments, --c / -pretrained_weights, run_training, perform_actual_validation). nnU-Net hard-codes CUDA there, so
only the backend and the device are patched, in every rank:
- run_training.setup_ddp: init_process_group("gloo") instead of "nccl" (with a timeout, so that a rank waiting for a
  dead peer fails instead of hanging);
- torch.cuda.set_device (run_ddp): no-op;
- nnUNetTrainer.__init__ sets device cuda:<rank> under DDP: the device becomes cpu right after it;
- DistributedDataParallel(net, device_ids=[rank]) in nnUNetTrainer.initialize: device_ids dropped (a CPU module
  takes none);
- torch.load(..., map_location=cuda:<rank>) (load_pretrained_weights under DDP): map_location cpu.
run_training's DDP branch accepts only `-device cuda` on the command line (nothing uses CUDA once the patches hold).
The patches are applied at import of this file, which `spawn` re-imports in every rank as `__mp_main__` before it
unpickles run_ddp.

Usage: python ddp_train.py DATASET CONFIGURATION FOLD -tr TRAINER -num_gpus 2 -device cuda [--c] [...]
"""
from __future__ import annotations

import functools
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from nnunetv2.run import run_training
from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as trainer_module
from torch.nn.parallel import DistributedDataParallel

TIMEOUT_S = int(os.environ.get("NNUNET_DP_TEST_DDP_TIMEOUT", "180"))


def _setup_gloo(rank: int, world_size: int) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=TIMEOUT_S))


def _ddp_on_cpu(module: torch.nn.Module, device_ids: list[int] | None = None, **kwargs) -> DistributedDataParallel:
    return DistributedDataParallel(module, **kwargs)


_nnunet_init = trainer_module.nnUNetTrainer.__init__


@functools.wraps(_nnunet_init)
def _init_on_cpu(self, *args, **kwargs) -> None:
    _nnunet_init(self, *args, **kwargs)
    self.device = torch.device("cpu")


_torch_load = torch.load


@functools.wraps(_torch_load)
def _load_on_cpu(*args, map_location=None, **kwargs):
    if isinstance(map_location, torch.device) and map_location.type == "cuda":
        map_location = torch.device("cpu")
    return _torch_load(*args, map_location=map_location, **kwargs)


run_training.setup_ddp = _setup_gloo
torch.load = _load_on_cpu
torch.cuda.set_device = lambda device: None
trainer_module.DDP = _ddp_on_cpu
trainer_module.nnUNetTrainer.__init__ = _init_on_cpu

if __name__ == "__main__":
    sys.argv[0] = "nnUNetv2_train"
    run_training.run_training_entry()
