"""Test-only DP trainer for tests/test_ddp_e2e.py: records what each rank does, and replays it in one process.

Environment:
- NNUNET_DP_TEST_RECORD=DIR: each rank writes to DIR its shard and sampling rate, the network it starts from, every
  step's batch (keys, data, target), whether its noise generator drew, the trained parameters and EMA after the
  step, the projection basis it uses, and its step count and status at the end of training.
- NNUNET_DP_TEST_REPLAY=DIR (one process): starts from DIR's recorded start network and trains step t on the
  cases all ranks sampled at step t (their recorded batches, concatenated); the fresh batches of its own loader are
  discarded; with projection public it records the basis it computed, then uses rank 0's recorded one (the public
  gradients are float32 convolutions, not bit-reproducible across processes, so a near-tie of eigenvalues can
  rotate the computed basis and with it the noise V z). Stops (without nnU-Net's final validation) after the last
  recorded step.
- NNUNET_DP_TEST_KILL_RANK="R:T": rank R SIGKILLs itself just before its T-th step, once rank 0 has journaled that
  step (rank 0 then waits in the step's all-reduce, its noise not yet added).
- NNUNET_DP_TEST_SKIP_VALIDATION=1: no final validation (nnU-Net's perform_actual_validation), to save time.
Under DDP, ranks other than 0 would draw other public patches for projection public (another public seed), so a
rank that computed its own subspace would use another one than rank 0.
"""
import dataclasses
import json
import os
import signal
import time

import torch

import nnunet_dp.nnunet.projection as public_projection
from nnunet_dp.journal import JOURNAL_FILE, read_history, total_steps
from nnunet_dp.nnunet.trainer import nnUNetTrainerDP

RECORD, REPLAY, KILL = "NNUNET_DP_TEST_RECORD", "NNUNET_DP_TEST_REPLAY", "NNUNET_DP_TEST_KILL_RANK"
SKIP_VALIDATION = "NNUNET_DP_TEST_SKIP_VALIDATION"


class ReplayDone(Exception):
    """The replay ran every recorded step."""


def _cat(parts: list):
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    if isinstance(parts[0], list):
        return [torch.cat(level) for level in zip(*parts)]
    return torch.cat(parts)


class nnUNetTrainerDP_DDPRecord(nnUNetTrainerDP):
    def _out(self, name: str) -> str | None:
        folder = os.environ.get(RECORD)
        return None if not folder else os.path.join(folder, name.format(rank=self.local_rank))

    def _trained(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self._plain_network().named_parameters() if p.requires_grad}

    def get_dataloaders(self):
        dl_tr, dl_val = super().get_dataloaders()
        loader = getattr(dl_tr, "data_loader", None) or dl_tr.generator
        if (path := self._out("shard_rank{rank}.json")) is not None:
            with open(path, "w") as f:
                json.dump({"indices": list(loader.indices), "sampling_rate": loader.sampling_rate,
                           "world_size": torch.distributed.get_world_size() if self.is_ddp else 1}, f)
        return dl_tr, dl_val

    def on_train_start(self):
        if self.is_ddp and self.local_rank != 0:
            public_projection.PUBLIC_SEED += 1000 * self.local_rank
        if os.environ.get(REPLAY):
            if not self.was_initialized:
                self.initialize()
            saved = torch.load(os.path.join(os.environ[REPLAY], "init_rank0.pt"))
            with torch.no_grad():  # every parameter (LoRA's base weights and factors included), not the state_dict
                for name, p in self._plain_network().named_parameters():
                    p.copy_(saved[name])
        super().on_train_start()
        if (path := self._out("init_rank{rank}.pt")) is not None:
            torch.save({n: p.detach().clone() for n, p in self._plain_network().named_parameters()}, path)
        if (path := self._out("projection_rank{rank}.pt")) is not None and self.dp_run.projection is not None:
            torch.save(self.dp_run.projection.basis, path)
        recorded = os.path.join(os.environ.get(REPLAY) or "", "projection_rank0.pt")
        if os.environ.get(REPLAY) and self.dp_run.projection is not None and os.path.exists(recorded):
            basis = torch.load(recorded).to(self.dp_run.projection.basis)
            self.dp_run.projection = dataclasses.replace(self.dp_run.projection, basis=basis)

    def _replayed(self, step: int) -> dict:
        folder = os.environ[REPLAY]
        names = sorted(n for n in os.listdir(folder) if n.startswith(f"step{step:03d}_rank"))
        if not names:
            raise ReplayDone
        batches = [torch.load(os.path.join(folder, n)) for n in names]
        return {"data": _cat([b["data"] for b in batches]), "target": _cat([b["target"] for b in batches]),
                "keys": [k for b in batches for k in b["keys"]]}

    def train_step(self, batch):
        step = self.dp_run.steps + 1
        if os.environ.get(REPLAY):
            batch = self._replayed(step)
        rank, _, at = os.environ.get(KILL, "-1:0").partition(":")
        if int(rank) == self.local_rank and int(at) == step:
            journal, deadline = os.path.join(self.output_folder, JOURNAL_FILE), time.monotonic() + 60
            while total_steps(read_history(journal)) < step and time.monotonic() < deadline:
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)
        before = self.dp_run.generator.get_state().clone()
        out = super().train_step(batch)
        if (path := self._out(f"step{step:03d}" + "_rank{rank}.pt")) is not None:
            torch.save({"keys": list(batch.get("keys") or []), "data": batch["data"], "target": batch["target"],
                        "noise_drawn": not torch.equal(before, self.dp_run.generator.get_state()),
                        "trained": self._trained(),
                        "ema": None if self.dp_ema is None else self.dp_ema.state_dict()["shadow"]}, path)
        return out

    def run_training(self):
        try:
            super().run_training()
        except ReplayDone:
            pass

    def on_train_end(self):
        super().on_train_end()
        if (path := self._out("end_rank{rank}.json")) is not None:
            with open(path, "w") as f:
                json.dump({"steps": self.dp_run.steps, "status": self.dp_status, "epoch": self.current_epoch}, f)

    def perform_actual_validation(self, save_probabilities: bool = False):
        if not os.environ.get(REPLAY) and not os.environ.get(SKIP_VALIDATION):
            super().perform_actual_validation(save_probabilities)
