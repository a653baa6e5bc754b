"""A DP trainer that crashes after a chosen epoch (env NNUNET_DP_TEST_CRASH_AT), for the resume test."""
import os

from nnunet_dp.nnunet.trainer import nnUNetTrainerDP


class nnUNetTrainerDP_TestCrash(nnUNetTrainerDP):
    def on_epoch_end(self):
        super().on_epoch_end()
        if os.environ.get("NNUNET_DP_TEST_CRASH_AT") == str(self.current_epoch):
            raise RuntimeError(f"simulated crash after epoch {self.current_epoch - 1}")
