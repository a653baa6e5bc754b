"""A DP trainer that records gradient alignment before each private step (what nnUNetTrainerDP.train_step does once
the hook line is in; recording is idempotent per step, so both together still write one set of rows)."""
from nnunet_dp.nnunet.alignment_hook import maybe_record_alignment
from nnunet_dp.nnunet.trainer import nnUNetTrainerDP


class nnUNetTrainerDP_TestAlignment(nnUNetTrainerDP):
    def train_step(self, batch: dict) -> dict:
        data, target = batch["data"], batch["target"]
        if data is not None:
            data = data.to(self.device)
            target = [t.to(self.device) for t in target] if isinstance(target, list) else target.to(self.device)
        maybe_record_alignment(self, data, target)
        return super().train_step(batch)
