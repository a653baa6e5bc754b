"""The non-private baseline of nnUNetv2_dp_experiment: nnU-Net's own trainer and step, under the experiment's budget.

nnU-Net imports this module under its top-level name through nnUNet_extTrainer, so it holds a declaration only.
The budget comes from the JSON file named by env var nnUNet_dp_experiment_budget (written per run by the experiment).
"""
import json
import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

BUDGET_ENV = "nnUNet_dp_experiment_budget"
BUDGET_KEYS = ("num_epochs", "num_iterations_per_epoch", "num_val_iterations_per_epoch", "initial_lr", "batch_size",
               "save_every", "trainable", "lora_rank")


class nnUNetTrainerNonPrivateBudget(nnUNetTrainer):
    """nnU-Net's normal step (its batch sampling, batch Dice and norms as planned) with the experiment's budget; with
    `trainable` (optional, default all) only the DP setting's selection of parameters trains (the others get no
    gradient, so nnU-Net's SGD leaves them as loaded)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 (nnU-Net's exact signature)
        super().__init__(plans, configuration, fold, dataset_json, device)
        from nnunet_dp.nnunet.threads import apply_cpu_threads

        if (threads := apply_cpu_threads(self.device)) is not None:  # nnUNetv2_train ignores OMP_NUM_THREADS on a CPU
            self.print_to_log_file(threads)
        path = os.environ.get(BUDGET_ENV)
        if not path or not os.path.isfile(path):
            raise RuntimeError(f"{BUDGET_ENV} = {path!r}: expected the path of the budget JSON that "
                               "nnUNetv2_dp_experiment writes (keys: " + ", ".join(BUDGET_KEYS) + ").")
        with open(path) as f:
            budget = json.load(f)
        unknown = sorted(set(budget) - set(BUDGET_KEYS))
        if unknown:
            raise RuntimeError(f"{BUDGET_ENV} file {path!r} has unknown keys {unknown}; allowed: {list(BUDGET_KEYS)}")
        self.num_epochs = int(budget["num_epochs"])
        self.num_iterations_per_epoch = int(budget["num_iterations_per_epoch"])
        self.num_val_iterations_per_epoch = int(budget["num_val_iterations_per_epoch"])
        self.initial_lr = float(budget["initial_lr"])
        self.save_every = int(budget.get("save_every", self.save_every))
        self.experiment_batch_size = int(budget["batch_size"])
        self.experiment_trainable = str(budget.get("trainable", "all"))
        self.experiment_lora_rank = budget.get("lora_rank")

    def initialize(self):
        super().initialize()
        if self.experiment_trainable != "all":
            from nnunet_dp.config import DPConfig
            from nnunet_dp.nnunet.selection import add_lora_, freeze_, select_trainable

            net = self._plain_network()
            rank = self.experiment_lora_rank or DPConfig().lora_rank
            if add_lora_(net, DPConfig(trainable=self.experiment_trainable, lora_rank=rank)):  # the factors train
                self.optimizer, self.lr_scheduler = self.configure_optimizers()
            selection = select_trainable(net, self.experiment_trainable)  # type: ignore[arg-type]
            freeze_(net, selection)  # SGD skips parameters without a gradient; pretrained weights load afterwards
            self.print_to_log_file("non-private reference: " + selection.summary().replace("DP trainable", "trainable"))

    def on_train_start(self):
        """A fine-tuning reference starts where the DP runs start: with -pretrained_weights the public segmentation
        heads are copied too when the labels match (the DP trainers' transfer_heads default)."""
        super().on_train_start()
        import sys

        from nnunet_dp.nnunet.finetune import pretrained_weights_arg, transfer_heads

        path = pretrained_weights_arg(sys.argv[1:])
        if path is not None:
            _, line = transfer_heads(path, self._plain_network(), self.dataset_json)
            self.print_to_log_file(line)

    def _plain_network(self):
        """The network without nnU-Net's DDP and torch.compile wrappers."""
        net = getattr(self.network, "module", self.network)
        return getattr(net, "_orig_mod", net)

    def _set_batch_size_and_oversample(self):
        super()._set_batch_size_and_oversample()
        self.batch_size = self.experiment_batch_size
