"""nnUNetTrainerDP: nnU-Net's trainer with DP-SGD (per-case gradients, scaling rule, Gaussian noise, Poisson cases).

Only nnU-Net's hooks, each delegating to the module that does the work: start.py (privacy plan, optimizer, noise
advice, projection, DP-Morph operations), loader.py (Poisson data), resume.py (settings, journal, epoch accounting),
checkpoints.py (what each checkpoint holds), report.py (privacy.json), finetune.py / selection.py (public weights, the
trained parameters). The DP step itself is nnunet_dp.run.DPRun.private_step. Named variants (rules, budgets) are
declared in trainers/ as 1-3 line subclasses, like nnU-Net's own nnUNetTrainer_250epochs.
"""
from __future__ import annotations

import os
from os.path import isfile, join
from typing import Any, ClassVar

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import distributed as dist
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunet_dp.bookkeeping import unsupported_layers
from nnunet_dp.ema import ParameterEMA, applied
from nnunet_dp.errors import DPCheckpointError, DPConfigError, DPModelError
from nnunet_dp.nnunet import checkpoints, finetune, selection, start
from nnunet_dp.nnunet.alignment_hook import maybe_record_alignment
from nnunet_dp.nnunet.case_loss import make_case_loss
from nnunet_dp.nnunet.loader import dp_dataloaders
from nnunet_dp.nnunet.plans import apply_dp_to_configuration, plans_provenance, start_without_fingerprint
from nnunet_dp.nnunet.report import CONFIG_JSON, write_json_atomic, write_privacy
from nnunet_dp.nnunet.resume import account_epoch, attach_journal, check_labels, load_dp_config, read_checkpoint
from nnunet_dp.nnunet.threads import apply_cpu_threads
from nnunet_dp.rules import RuleName
from nnunet_dp.run import DPRun, dp_autocast
from nnunet_dp.validation import find_problems

_EMPTY_EPOCH = {"loss": np.array(np.nan), "batch_size": np.array(0), "dropped": np.array(0)}


class nnUNetTrainerDP(nnUNetTrainer):
    """DP-SGD with flat (Abadi) clipping. Settings: JSON file named by env var nnUNet_dp_config (docs/settings.md)."""

    dp_rule: RuleName = "flat"
    dp_defaults: ClassVar[dict[str, Any]] = {}  # class-level setting overrides for named variants (e.g. target_epsilon)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 (nnU-Net's exact signature)
        super().__init__(plans, configuration, fold, dataset_json, device)
        if (threads := apply_cpu_threads(self.device)) is not None:
            self.print_to_log_file(threads)
        cfg, self.dp_config_source = load_dp_config(self.output_folder, self.dp_defaults)
        self.dp_config = cfg
        self.num_epochs = cfg.num_epochs
        self.num_iterations_per_epoch = cfg.num_iterations_per_epoch
        self.num_val_iterations_per_epoch = cfg.num_val_iterations_per_epoch
        self.initial_lr = cfg.initial_lr  # None until configure_optimizers applies the DP default (needs sigma)
        self.oversample_foreground_percent = cfg.oversample_foreground_percent
        self.save_every = cfg.save_every
        self.grad_scaler = None  # per-case norms must be unscaled; CUDA uses bf16 autocast without a GradScaler
        apply_dp_to_configuration(self.plans_manager.plans, self.configuration_manager.configuration,
                                  configuration, norm_conversion=cfg.norm_conversion,
                                  num_groups=cfg.group_norm_groups, morph_ops=start.morph_ops(self))
        self.dp_run: DPRun | None = None
        self.dp_status = "initialised"
        self.dp_resumed_steps: int | None = None  # ledger steps of the checkpoint loaded by --c / --val
        self.dp_dropped: int | None = 0  # cases dropped (non-finite gradient or loss); None: unknown after a resume
        # from a release checkpoint. Unnoised: in the log and checkpoint_latest only, never in privacy.json
        self.dp_noise: dict[str, Any] | None = None  # {"noise": nnunet_dp.advise.noise_summary}, set in initialize
        self.dp_selection: selection.Selection | None = None  # the parameters DP-SGD trains (setting trainable)
        self.dp_pretrained: dict | None = None  # privacy.json's pretrained_weights (nnunet_dp.nnunet.finetune)
        self.dp_ema: ParameterEMA | None = None  # setting ema_decay
        self.dp_projection: dict | None = None  # privacy.json's record of the public subspace (setting projection)
        self.dp_raw_weights: dict | None = None  # raw weights of a loaded checkpoint_final/best, for a resume
        self.dp_lr_rule: str | None = None

    # ---- network, optimizer, loss -------------------------------------------------------------------------------
    def _do_i_compile(self) -> bool:
        return False  # per-case autograd.grad on a compiled module recompiles per shape; keep DP steps eager

    def initialize(self) -> None:
        super().initialize()
        net = self._plain_network()
        if problems := find_problems(net):
            raise DPModelError(problems)
        selection.freeze_(net, self.dp_selection)  # before the engines read (and cache) the network's structure
        self.print_to_log_file(self.dp_selection.summary())
        start.log_noise_advice(self)
        if self.dp_config.per_sample_strategy == "bk" and (why := unsupported_layers(net)):
            raise DPConfigError("per_sample_strategy", "bk", "a strategy that can run on this network; 'bk' cannot: "
                                + "; ".join(why) + ". Use 'auto' (falls back to 'loop') or 'loop'")
        self.print_to_log_file(f"DP settings from {self.dp_config_source}")
        # nnU-Net's loss with a batched per-case evaluation (book-keeping strategy); identical values to self.loss
        self.dp_loss = make_case_loss(self.loss)

    def _plain_network(self) -> torch.nn.Module:
        mod = self.network.module if isinstance(self.network, DDP) else self.network  # (not yet DDP in initialize)
        return mod._orig_mod if isinstance(mod, OptimizedModule) else mod

    def configure_optimizers(self):
        return start.dp_optimizer(self)

    def _dp_setup(self) -> DPRun:
        """The run's privacy plan, calibrated once; on resume, load_checkpoint restores the ledger."""
        if self.dp_run is None:
            self.dp_run = start.make_run(self)
        return self.dp_run

    # ---- data ---------------------------------------------------------------------------------------------------
    def _set_batch_size_and_oversample(self) -> None:
        """nnU-Net splits the plans' batch over DDP ranks (and refuses fewer cases than ranks) and recomputes
        oversampling per rank. Under DP the training batch is Poisson (q global, each rank samples its shard): the
        plans' batch size only sets the validation batch, split over the ranks with at least one case each; each
        case decides oversampling for itself with the configured probability, on every rank."""
        if self.is_ddp:
            self.batch_size = max(1, self.configuration_manager.batch_size // dist.get_world_size())
        else:
            super()._set_batch_size_and_oversample()
        self.oversample_foreground_percent = self.dp_config.oversample_foreground_percent

    def get_dataloaders(self):
        return dp_dataloaders(self)

    # ---- the private step --------------------------------------------------------------------------------------
    def _autocast(self) -> Any:
        return dp_autocast(self.device)

    def train_step(self, batch: dict) -> dict:
        data, target = batch["data"], batch["target"]
        if data is not None:
            data = data.to(self.device, non_blocking=True)
            target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
                else target.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        maybe_record_alignment(self, data, target)  # analysis only (alignment_every > 0); reads, never writes .grad
        k = self.dp_config.augmentations_per_case  # rows = K augmented patches per sampled case
        try:
            result = self.dp_run.private_step(self._plain_network(), self.dp_loss, data, target,
                                              self._autocast(), group=k)
        except (IndexError, RuntimeError) as e:  # e.g. a label value outside dataset.json's classes
            check_labels(target, self.label_manager, batch.get("keys"), e)
            raise
        self.optimizer.step()
        if self.dp_ema is not None:
            self.dp_ema.update(self._plain_network())
        # the mean loss of the sampled finite cases, for nnU-Net's logger (private: checkpoint_latest and the log)
        finite = result.losses[result.finite]
        loss = finite.mean().item() if finite.numel() else float("nan")
        return {"loss": np.array(loss), "batch_size": np.array(0 if data is None else data.shape[0] // k),
                "dropped": np.array(result.dropped)}

    def on_train_epoch_end(self, train_outputs: list[dict]) -> None:
        account_epoch(self, train_outputs)

    def run_training(self) -> None:
        """nnU-Net's loop, stopping before a step that would overspend the target epsilon."""
        self.on_train_start()
        for _ in range(self.current_epoch, self.num_epochs):
            if not self.dp_run.can_step():
                self._stop_for_budget()
                break
            self.on_epoch_start()
            self.on_train_epoch_start()
            outputs = [self.train_step(next(self.dataloader_train))
                       for _ in range(self.num_iterations_per_epoch) if self.dp_run.can_step()]
            if len(outputs) < self.num_iterations_per_epoch:  # the budget ends this epoch early, the last one too
                self._stop_for_budget()
            self.on_train_epoch_end(outputs or [_EMPTY_EPOCH])
            with torch.no_grad(), applied(self.dp_ema, self._plain_network()):  # validate the average
                self.on_validation_epoch_start()
                val_outputs = [self.validation_step(next(self.dataloader_val))
                               for _ in range(self.num_val_iterations_per_epoch)]
                if val_outputs:
                    self.on_validation_epoch_end(val_outputs)
            self.on_epoch_end()
        self.on_train_end()

    def _stop_for_budget(self) -> None:
        """privacy.json's status and the log line, once, when the target epsilon leaves no further step."""
        if self.dp_status == "training":
            self.dp_status = "stopped: privacy budget spent"
            self.print_to_log_file(f"DP: budget of epsilon={self.dp_run.plan.target_epsilon} reached after "
                                   f"{self.dp_run.steps} steps; training stops.")

    # ---- start, epochs, end ---------------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        finetune.start_finetuning(self)  # raw weights of a resume, the public checkpoint's record, the EMA
        if plans_provenance(self.plans_manager.plans, self.configuration_name)["data_independent"]:
            start_without_fingerprint(self)  # nnUNetv2_dp_plan's plans: the private fingerprint is not read
        else:
            super().on_train_start()
        self.dp_status = "training"
        start.attach_projection(self)
        if self.dp_resumed_steps is None and self.dp_pretrained is not None and self.dp_config.initial_lr is None:
            self.print_to_log_file(finetune.apply_finetune_lr(self))  # after the projection: its noise dimensions
        attach_journal(self)
        if self.local_rank == 0:
            write_json_atomic(join(self.output_folder, CONFIG_JSON),
                              {"trainer": self.__class__.__name__, "rule": self.dp_rule,
                               **self.dp_config.release_dict()})
            write_privacy(self)

    def on_epoch_end(self) -> None:
        checkpoints.restart_ema(self.logger.get_value("ema_fg_dice", step=None),
                                self.logger.get_value("mean_fg_dice", step=None))
        if self.num_val_iterations_per_epoch == 0:  # nnU-Net's epoch-end print needs validation values
            self.logger.log("val_losses", float("nan"), self.current_epoch)
            self.logger.log("dice_per_class_or_region", [float("nan")], self.current_epoch)
            self.logger.log("mean_fg_dice", float("nan"), self.current_epoch)
        super().on_epoch_end()
        run = self.dp_run
        self.print_to_log_file(f"DP: epsilon spent = {run.epsilon():.4f} (delta={run.plan.delta}) after "
                               f"{run.steps} steps; calibrated for {run.plan.planned_steps} steps")
        write_privacy(self)

    def on_train_end(self) -> None:
        if self.dp_status == "training":
            self.dp_status = "finished"
        super().on_train_end()  # checkpoint_final: the average in network_weights (finetune.checkpoint_weights)
        if self.dp_ema is not None:  # nnU-Net's final validation (perform_actual_validation) uses the average
            self.dp_ema.copy_to(self._plain_network())
        write_privacy(self)
        if self.dp_run.journal is not None:
            self.dp_run.journal.close()

    # ---- checkpoints: the ledger travels in every one ------------------------------------------------------------
    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        tmp = f"{filename}.tmp"
        torch.save(checkpoints.build(self, filename), tmp)
        os.replace(tmp, filename)  # a crash while saving never leaves a checkpoint without its ledger

    def load_checkpoint(self, filename_or_checkpoint: str | dict) -> None:
        if not self.was_initialized:
            self.initialize()
        if not isinstance(filename_or_checkpoint, str) or not isfile(filename_or_checkpoint):
            raise FileNotFoundError(f"checkpoint {filename_or_checkpoint!r} not found")
        checkpoint = read_checkpoint(filename_or_checkpoint)
        self._dp_setup().load_state_dict(checkpoint.get("dp_state"))
        selection.check_resume(checkpoint, self.dp_config)
        self.dp_resumed_steps = self.dp_run.steps
        try:
            super().load_checkpoint(filename_or_checkpoint)  # (nnU-Net 2.8 reads only a path, not a dict)
        except RuntimeError as e:  # nnU-Net's load_state_dict: missing keys, size mismatch
            raise DPCheckpointError(f"checkpoint {filename_or_checkpoint} does not fit the network built from this "
                                    f"folder's plans (it was trained with other plans or another configuration): "
                                    f"{str(e).splitlines()[0]}") from e
        # nnU-Net loaded network_weights (the average, in checkpoint_final/best): kept for --val; a resume continues
        # from the raw weights (finetune.start_finetuning)
        self.dp_raw_weights = checkpoint.get("raw_network_weights")
        selection.restore_lora(checkpoint, self._plain_network())
        checkpoints.restore_private_counters(self, checkpoint)
        self.dp_pretrained = checkpoint.get("dp_pretrained")
        finetune.restore_lr(self, checkpoint)
        self.dp_ema = finetune.restore_ema(checkpoint, self._plain_network(), self.dp_config.ema_decay,
                                           self.print_to_log_file)
        self.print_to_log_file(f"DP: resumed ledger with {self.dp_run.steps} steps, "
                               f"epsilon so far {self.dp_run.epsilon():.4f}")
