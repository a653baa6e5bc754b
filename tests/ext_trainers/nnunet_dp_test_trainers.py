"""Test-only DP trainers: a crash after a chosen epoch (env NNUNET_DP_TEST_CRASH_AT), and SIGKILL at a chosen point
(env NNUNET_DP_TEST_KILL = "step:K" | "ckpt:K" | "best:K", counted in this process) with the upcoming noise of each
step logged to NNUNET_DP_TEST_NOISE_LOG (read from a copy of the generator; the training's noise is untouched)."""
import os
import signal

import torch

from nnunet_dp.nnunet.trainer import nnUNetTrainerDP


class nnUNetTrainerDP_TestCrash(nnUNetTrainerDP):
    def on_epoch_end(self):
        super().on_epoch_end()
        if os.environ.get("NNUNET_DP_TEST_CRASH_AT") == str(self.current_epoch):
            raise RuntimeError(f"simulated crash after epoch {self.current_epoch - 1}")


def _kill_point() -> tuple[str, int]:
    kind, _, k = os.environ.get("NNUNET_DP_TEST_KILL", "none:0").partition(":")
    return kind, int(k)


class nnUNetTrainerDP_TestKill(nnUNetTrainerDP):
    _counts: dict

    def on_train_start(self):
        self._counts = {"step": 0, "ckpt": 0, "best": 0}
        super().on_train_start()
        kind, k = _kill_point()
        journal = self.dp_run.journal
        if kind == "step":  # killed between the journal record and the noise of the K-th step
            record = journal.record_step

            def record_then_maybe_die():
                record()
                self._counts["step"] += 1
                if self._counts["step"] == k:
                    os.kill(os.getpid(), signal.SIGKILL)
            journal.record_step = record_then_maybe_die

    def train_step(self, batch):
        g = torch.Generator(device=self.dp_run.generator.device)
        g.set_state(self.dp_run.generator.get_state())
        upcoming = torch.randn(4, generator=g, device=g.device).tolist()
        with open(os.environ["NNUNET_DP_TEST_NOISE_LOG"], "a") as f:
            f.write(f"{os.getpid()} {self.dp_run.steps} {' '.join(repr(v) for v in upcoming)}\n")
        return super().train_step(batch)

    def save_checkpoint(self, filename):
        kind, k = _kill_point()
        self._counts["ckpt"] += 1
        if kind == "ckpt" and self._counts["ckpt"] == k:  # killed while the checkpoint is half written
            with open(f"{filename}.tmp", "wb") as f:
                f.write(b"PK\x03\x04 half a checkpoint")
                f.flush()
                os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        super().save_checkpoint(filename)
        if self._counts.get("armed") and os.path.basename(filename) == "checkpoint_best.pth":
            os.kill(os.getpid(), signal.SIGKILL)

    def on_epoch_end(self):
        kind, k = _kill_point()
        if kind == "best" and (self.current_epoch + 1) % self.save_every:  # nnU-Net writes no latest this epoch
            self._counts["best"] += 1
            if self._counts["best"] == k:  # nnU-Net writes a checkpoint_best newer than checkpoint_latest; we die
                self._best_ema, self._counts["armed"] = None, True
        super().on_epoch_end()
