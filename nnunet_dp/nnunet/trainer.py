"""nnUNetTrainerDP: nnU-Net's trainer with DP-SGD (per-case gradients, scaling rule, Gaussian noise, Poisson cases).

Overrides only the hooks it must; the DP logic lives in nnunet_dp (core). Named variants (rules, budgets) are
declared in trainers/ as 1-3 line subclasses, like nnU-Net's own nnUNetTrainer_250epochs.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable
from os.path import isdir, isfile, join
from typing import Any, ClassVar

import numpy as np
import torch
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from torch import distributed as dist
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunet_dp.advise import training_advice
from nnunet_dp.bookkeeping import unsupported_layers
from nnunet_dp.ema import ParameterEMA, applied
from nnunet_dp.errors import DPCheckpointError, DPConfigError, DPDivergedError, DPModelError
from nnunet_dp.journal import JOURNAL_FILE, ever_seeded
from nnunet_dp.nnunet import checkpoints, finetune
from nnunet_dp.nnunet.alignment_hook import maybe_record_alignment
from nnunet_dp.nnunet.augmenter import make_augmenter
from nnunet_dp.nnunet.case_loss import make_case_loss
from nnunet_dp.nnunet.loader import nnUNetPoissonDataLoader
from nnunet_dp.nnunet.plans import apply_dp_to_configuration, plans_provenance, start_without_fingerprint
from nnunet_dp.nnunet.projection import shared_projection
from nnunet_dp.nnunet.report import CONFIG_JSON, PRIVACY_JSON, privacy_report, write_json_atomic
from nnunet_dp.nnunet.resume import attach_journal, check_dropped, check_labels, load_dp_config, read_checkpoint
from nnunet_dp.nnunet.threads import apply_cpu_threads
from nnunet_dp.optim import default_lr, noise_per_coordinate
from nnunet_dp.rules import RuleName
from nnunet_dp.run import DPRun, dp_autocast, make_plan
from nnunet_dp.sampling import shard
from nnunet_dp.validation import find_problems


class nnUNetTrainerDP(nnUNetTrainer):
    """DP-SGD with flat (Abadi) clipping. Settings: JSON file named by env var nnUNet_dp_config (see README)."""

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
                                  num_groups=cfg.group_norm_groups, morph_ops=self._morph_ops())
        self.dp_run: DPRun | None = None
        self.dp_status = "initialised"
        self.dp_resumed_steps: int | None = None  # ledger steps of the checkpoint loaded by --c / --val
        self.dp_dropped: int | None = 0  # cases dropped (non-finite gradient or loss); None: unknown after a resume
        # from a release checkpoint. Unnoised: in the log and checkpoint_latest only, never in privacy.json
        self.dp_noise: dict[str, Any] | None = None  # {"noise": nnunet_dp.advise.noise_summary}, set in initialize
        self.dp_selection: finetune.Selection | None = None  # the parameters DP-SGD trains (setting trainable)
        self.dp_pretrained: dict | None = None  # privacy.json's pretrained_weights (nnunet_dp.nnunet.finetune)
        self.dp_ema: ParameterEMA | None = None  # setting ema_decay
        self.dp_projection: dict | None = None  # privacy.json's record of the public subspace (setting projection)
        self.dp_raw_weights: dict | None = None  # raw weights of a loaded checkpoint_final/best, for a resume

    def _morph_ops(self) -> dict[str, list]:
        """morph_in_training as the per-class operations the plans' network applies (nnunet_dp.morph)."""
        cfg = self.dp_config
        if cfg.morph_in_training != "none" and self.label_manager.has_regions:
            raise DPConfigError("morph_in_training", cfg.morph_in_training, "'none' for a region-based dataset "
                                "(the operations act on the labels' classes)", self.dp_config_source)
        return cfg.morph_ops(self.label_manager.num_segmentation_heads, len(self.configuration_manager.patch_size))

    # ---- network, loss, compile -------------------------------------------------------------------------------
    def _do_i_compile(self) -> bool:
        return False  # per-case autograd.grad on a compiled module recompiles per shape; keep DP steps eager

    def initialize(self) -> None:
        super().initialize()
        problems = find_problems(self._plain_network())
        if problems:
            raise DPModelError(problems)
        finetune.freeze_(self._plain_network(), self.dp_selection)  # before the engines read (and cache) the structure
        self.print_to_log_file(self.dp_selection.summary())
        self._log_noise_advice()
        if self.dp_config.per_sample_strategy == "bk" and (why := unsupported_layers(self._plain_network())):
            raise DPConfigError("per_sample_strategy", "bk", "a strategy that can run on this network; 'bk' cannot: "
                                + "; ".join(why) + ". Use 'auto' (falls back to 'loop') or 'loop'")
        self.print_to_log_file(f"DP settings from {self.dp_config_source}")
        # nnU-Net's loss with a batched per-case evaluation (book-keeping strategy); identical values to self.loss
        self.dp_loss = make_case_loss(self.loss)

    def _log_noise_advice(self, dimensions: int | None = None) -> None:
        """The noise on the averaged update against the signal C (nnunet_dp.advise), logged and in privacy.json.
        dimensions: the noise's dimensions when not the trained parameters' count (projection)."""
        finetuning = finetune.pretrained_weights_arg(sys.argv[1:]) is not None  # nnU-Net loads it after initialize
        d = self.dp_selection.num_trained if dimensions is None else dimensions
        self.dp_noise, warning = training_advice(self._dp_setup().plan, d, finetuning)
        n = self.dp_noise["noise"]
        self.print_to_log_file(f"DP noise: norm ~{n['noise_norm']:.4g} on the averaged update = {n['noise_ratio']:.3g} x"
                               f" the largest signal C (sigma*sqrt(d)/(qN), d = {n['num_trained_parameters']} trained "
                               f"parameters; warns above {n['warn_above']:g}; nnUNetv2_dp_advise shows the levers)")
        if warning is not None:
            self.print_to_log_file(f"DP WARNING: {warning}")

    def _plain_network(self) -> torch.nn.Module:
        mod = self.network.module if isinstance(self.network, DDP) else self.network  # (not yet DDP in initialize)
        return mod._orig_mod if isinstance(mod, OptimizedModule) else mod

    def configure_optimizers(self):
        """nnU-Net's SGD and poly schedule with DP-aware defaults: momentum 0.9 and, unless initial_lr is set, the
        learning rate of nnunet_dp.optim.default_lr for this run's noise and steps."""
        cfg, plan = self.dp_config, self._dp_setup().plan
        rule_lr = default_lr(noise_multiplier=plan.noise_multiplier, clip_norm=plan.clip_norm,
                             expected_batch_size=plan.expected_batch_size, steps=plan.planned_steps,
                             momentum=cfg.momentum)
        self.initial_lr = cfg.initial_lr if cfg.initial_lr is not None else rule_lr
        self.dp_lr_rule = "initial_lr setting" if cfg.initial_lr is not None else "default rule"  # finetune may change
        noise = noise_per_coordinate(noise_multiplier=plan.noise_multiplier, clip_norm=plan.clip_norm,
                                     expected_batch_size=plan.expected_batch_size)
        source = "initial_lr setting" if cfg.initial_lr is not None else "default rule"
        self.print_to_log_file(
            f"DP optimizer: SGD lr={self.initial_lr:.4g} ({source}; rule: {rule_lr:.4g}), momentum={cfg.momentum}, "
            f"nesterov={cfg.nesterov}, effective step lr/(1-momentum)={self.initial_lr / (1 - cfg.momentum):.4g}, "
            f"noise per coordinate sigma*C/(qN)={noise:.4g}")
        if finetune.add_lora_(self._plain_network(), cfg):  # adapters before the selection (and before DDP)
            self.print_to_log_file(f"DP trainable=lora: rank-{cfg.lora_rank} adapters on every convolution but the "
                                   "segmentation heads; checkpoints hold the merged plain network")
        self.dp_selection = finetune.select_trainable(self._plain_network(), cfg.trainable)  # frozen in initialize
        optimizer = torch.optim.SGD(self.dp_selection.trained, self.initial_lr, weight_decay=self.weight_decay,
                                    momentum=cfg.momentum, nesterov=cfg.nesterov)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    # ---- privacy plan -----------------------------------------------------------------------------------------
    def _dp_setup(self) -> DPRun:
        """Calibrate sigma for this fold's training cases (once); on resume, load_checkpoint restores the ledger."""
        if self.dp_run is None:
            if self.dataset_class is None:
                self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
            tr_keys, _ = self.do_split()
            plan = make_plan(self.dp_config, rule=self.dp_rule, num_training_cases=len(tr_keys),
                             plans_batch_size=self.configuration_manager.batch_size)
            self.dp_run = DPRun(plan, device=self.device, seed=self.dp_config.seed,
                                strategy=self.dp_config.per_sample_strategy)
            self.print_to_log_file(
                f"DP: rule={plan.rule} C={plan.clip_norm} sigma={plan.noise_multiplier:.4f} q={plan.sampling_rate:.4f} "
                f"(expected batch {plan.expected_batch_size:.2f} of N={plan.num_training_cases}) steps={plan.planned_steps}"
                f" -> epsilon={self.dp_run.projected_epsilon():.3f} at delta={plan.delta} ({plan.accountant})")
            if plan.max_steps is not None and plan.max_steps < plan.planned_steps:
                self.print_to_log_file(f"DP WARNING: only {plan.max_steps} of the {plan.planned_steps} planned steps fit "
                                       f"in target_epsilon={plan.target_epsilon}; training will stop there.")
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
        run = self._dp_setup()
        rot, dummy_2d, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        ds_scales = self._get_deep_supervision_scales()
        lm = self.label_manager
        label_kwargs = {"is_cascaded": self.is_cascaded, "foreground_labels": lm.foreground_labels,
                            "regions": lm.foreground_regions if lm.has_regions else None, "ignore_label": lm.ignore_label}
        tr_transforms = self.get_training_transforms(
            self.configuration_manager.patch_size, rot, ds_scales, mirror_axes, dummy_2d,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm, **label_kwargs)
        val_transforms = self.get_validation_transforms(ds_scales, **label_kwargs)
        dataset_tr, dataset_val = self.get_tr_and_val_datasets()
        if self.is_ddp:  # disjoint shards: each case is sampled by exactly one rank, with probability q
            dataset_tr.identifiers = shard(sorted(dataset_tr.identifiers), rank=dist.get_rank(),
                                           world_size=dist.get_world_size())
        dl_tr = nnUNetPoissonDataLoader(
            dataset_tr, initial_patch_size, self.configuration_manager.patch_size, lm,
            sampling_rate=run.plan.sampling_rate, oversample_foreground_percent=self.oversample_foreground_percent,
            transforms=tr_transforms, seed=self.dp_config.seed, seed_salt=self.current_epoch * 1000 + self.local_rank,
            augmentations_per_case=self.dp_config.augmentations_per_case)
        dl_val = nnUNetDataLoader(dataset_val, self.batch_size, self.configuration_manager.patch_size,
                                  self.configuration_manager.patch_size, lm,
                                  oversample_foreground_percent=self.oversample_foreground_percent,
                                  transforms=val_transforms)
        return self._augmenter(dl_tr, train=True), self._augmenter(dl_val, train=False)

    def _augmenter(self, loader, *, train: bool):
        """Workers read round-robin (nnunet_dp.nnunet.augmenter): which Poisson batch is step t is fixed in advance,
        never by which worker finishes first (DESIGN.md invariant 1)."""
        n = get_allowed_n_proc_DA()
        procs = n if train or n == 0 else max(1, n // 2)
        return make_augmenter(loader, num_processes=procs, train=train, pin_memory=self.device.type == "cuda")

    # ---- the private step --------------------------------------------------------------------------------------
    def _autocast(self) -> Callable[[], Any]:
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
            result = self.dp_run.private_step(self._plain_network(), self.dp_loss, data, target, self._autocast(),
                                              group=k)
        except (IndexError, RuntimeError) as e:  # e.g. a label value outside dataset.json's classes
            check_labels(target, self.label_manager, batch.get("keys"), e)
            raise
        self.optimizer.step()
        if self.dp_ema is not None:
            self.dp_ema.update(self._plain_network())
        # the mean loss of the sampled finite cases (not private: see privacy.json assumptions); nan if none
        finite = result.losses[result.finite]
        loss = finite.mean().item() if finite.numel() else float("nan")
        return {"loss": np.array(loss), "batch_size": np.array(0 if data is None else data.shape[0] // k),
                "dropped": np.array(result.dropped)}

    def on_train_epoch_end(self, train_outputs: list[dict]) -> None:
        outputs = collate_outputs(train_outputs)
        stats = [np.atleast_1d(outputs[k]).astype(float) for k in ("loss", "batch_size", "dropped")]
        if self.is_ddp:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, stats)
            stats = [np.concatenate([g[i] for g in gathered]) for i in range(3)]
        losses, sampled, dropped = stats[0], int(stats[1].sum()), int(stats[2].sum())
        self.logger.log("train_losses", float(np.nanmean(losses)) if np.isfinite(losses).any() else float("nan"),
                        self.current_epoch)
        if self.dp_dropped is not None:
            self.dp_dropped += dropped
        if dropped:
            self.print_to_log_file(f"DP: {dropped} of {sampled} sampled cases dropped this epoch (non-finite gradient "
                                   "or loss; they contributed nothing, the steps still added their noise)")
        try:
            check_dropped(dropped, sampled, self.current_epoch)
        except DPDivergedError:
            self.dp_status = "stopped: most sampled cases were not finite"
            if isdir(self.output_folder):  # the epoch's steps are journaled: privacy.json counts them before stopping
                self._write_privacy_json()
            raise

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
            self.on_train_epoch_end(outputs or [{"loss": np.array(np.nan), "batch_size": np.array(0),
                                                 "dropped": np.array(0)}])
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

    # ---- reporting ----------------------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        finetune.start_finetuning(self)  # raw weights of a resume, the public checkpoint's record, the EMA
        if plans_provenance(self.plans_manager.plans, self.configuration_name)["data_independent"]:
            start_without_fingerprint(self)  # nnUNetv2_dp_plan's plans: the private fingerprint is not read
        else:
            super().on_train_start()
        self.dp_status = "training"
        self._setup_projection()
        attach_journal(self)
        if self.local_rank == 0:
            write_json_atomic(join(self.output_folder, CONFIG_JSON),
                              {"trainer": self.__class__.__name__, "rule": self.dp_rule,
                               **self.dp_config.release_dict()})
            self._write_privacy_json()

    def _setup_projection(self) -> None:
        """projection public: the public subspace (nnunet_dp.nnunet.projection), before the first step."""
        if self.dp_config.projection != "public":
            return
        self.dp_run.projection, self.dp_projection = shared_projection(self)  # rank 0's under DDP
        r = self.dp_projection
        self.print_to_log_file(f"DP projection=public: k={r['projection_dim']} dimensions of {r['projected_parameters']} "
                               f"projected parameters ({r['public_energy_captured']:.1%} of the {r['public_gradients']} "
                               f"public gradients' energy; public data {r['public_data']}); "
                               f"{r['unprojected_parameters']} parameters not projected; noise in "
                               f"{r['noise_dimensions']} dimensions")
        self._log_noise_advice(r["noise_dimensions"])

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
        self._write_privacy_json()

    def on_train_end(self) -> None:
        if self.dp_status == "training":
            self.dp_status = "finished"
        super().on_train_end()  # checkpoint_final: the average in network_weights (finetune.checkpoint_weights)
        if self.dp_ema is not None:  # nnU-Net's final validation (perform_actual_validation) uses the average
            self.dp_ema.copy_to(self._plain_network())
        self._write_privacy_json()
        if self.dp_run.journal is not None:
            self.dp_run.journal.close()

    def _private_randomness(self) -> bool:
        """False when this session or any earlier one in the folder was seeded (the journal records each session)."""
        return self.dp_config.private_randomness and not ever_seeded(join(self.output_folder, JOURNAL_FILE))

    def _write_privacy_json(self) -> None:
        if self.local_rank == 0 and self.dp_run is not None:
            extra, assumptions = finetune.report_extra(self.dp_config, self.dp_selection, self.dp_pretrained)
            extra.update(self.dp_noise or {}, initial_lr=self.initial_lr, lr_rule=self.dp_lr_rule,
                         projection=self.dp_projection or {"projection": "none"})
            write_json_atomic(join(self.output_folder, PRIVACY_JSON),
                              privacy_report(self.dp_run, status=self.dp_status,
                                             private_randomness=self._private_randomness(),
                                             extra=extra,
                                             extra_assumptions=assumptions,
                                             plans=plans_provenance(self.plans_manager.plans,
                                                                    self.configuration_name)))

    def _restore_private_counters(self, checkpoint: dict) -> None:
        """The dropped-case count and nnU-Net's logger continue from checkpoint_latest; a release checkpoint
        (final/best) holds neither, so the logger restarts with NaN for the epochs run and the count is unknown."""
        if checkpoint.get(checkpoints.RELEASE_MARK):
            self.logger.load_checkpoint(checkpoints.padded_logging(checkpoint.get("logging"), self.current_epoch))
            self.dp_dropped = None
            self.print_to_log_file("DP: resumed from a release checkpoint (no training curves, no dropped-case "
                                   "count): the curves restart here and the count of dropped cases is unknown")
        else:
            self.dp_dropped = int(checkpoint.get("dp_dropped") or 0)

    # ---- checkpoints: the ledger travels in every one ------------------------------------------------------------
    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        run = self._dp_setup()
        checkpoint = {
            **finetune.checkpoint_weights(self._plain_network(), self.dp_ema, filename),  # raw / EMA (finetune)
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": None,
            "logging": self.logger.get_checkpoint(),
            "_best_ema": self._best_ema,
            "current_epoch": self.current_epoch + 1,
            "init_args": self.my_init_kwargs,
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
            "dp_state": run.state_dict(),  # plan and ledger; never a noise generator state or seed
            "dp_config": self.dp_config.release_dict(),
            "dp_pretrained": self.dp_pretrained,
            "dp_initial_lr": self.initial_lr, "dp_lr_rule": self.dp_lr_rule,
            "dp_dropped": self.dp_dropped,  # unnoised count: checkpoint_latest only (checkpoints.for_release)
            **finetune.lora_entries(self._plain_network()),  # the adapters' factors (trainable lora), for --c
        }
        if checkpoints.is_releasable(filename):  # final/best: no logger values, no _best_ema, no counts
            checkpoint = checkpoints.for_release(checkpoint)
        tmp = f"{filename}.tmp"
        torch.save(checkpoint, tmp)
        os.replace(tmp, filename)  # a crash while saving never leaves a checkpoint without its ledger

    def load_checkpoint(self, filename_or_checkpoint: str | dict) -> None:
        if not self.was_initialized:
            self.initialize()
        if not isinstance(filename_or_checkpoint, str) or not isfile(filename_or_checkpoint):
            raise FileNotFoundError(f"checkpoint {filename_or_checkpoint!r} not found")
        checkpoint = read_checkpoint(filename_or_checkpoint)
        self._dp_setup().load_state_dict(checkpoint.get("dp_state"))
        finetune.check_resume(checkpoint, self.dp_config)
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
        finetune.restore_lora(checkpoint, self._plain_network())
        self._restore_private_counters(checkpoint)
        self.dp_pretrained = checkpoint.get("dp_pretrained")
        finetune.restore_lr(self, checkpoint)
        self.dp_ema = finetune.restore_ema(checkpoint, self._plain_network(), self.dp_config.ema_decay,
                                           self.print_to_log_file)
        self.print_to_log_file(f"DP: resumed ledger with {self.dp_run.steps} steps, "
                               f"epsilon so far {self.dp_run.epsilon():.4f}")
