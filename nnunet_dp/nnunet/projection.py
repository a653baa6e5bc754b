"""Setting `projection: public`: the public subspace of the case gradients, estimated when training starts.

The mechanism is in nnunet_dp.projection. Here, from public inputs only:
- the public model: the `-pretrained_weights` checkpoint the run starts from (privacy.json's `pretrained_weights`;
  its sha256 is checked again), rebuilt from the plans, configuration and dataset.json recorded in it, with the DP
  trainer's norm changes, so that its parameters have the DP network's names;
- public cases: the preprocessed training data of the checkpoint's dataset (`$nnUNet_preprocessed/<its dataset>/
  <its data identifier>`), or the folder named by `projection_data`; patches drawn by nnU-Net's own loader with a fixed
  seed (public data: a seed costs no privacy, and the subspace is the same at every start and resume);
- per-case gradients of the public model's own loss on those patches (nnU-Net's Dice + CE with deep supervision),
  for every trained parameter that the public network has with the same name and shape. Trained parameters without
  one (the segmentation heads when the labels differ) are not projected: their noise stays full-dimensional.
The private cases are never read here: nothing of them reaches the subspace.
Under DDP (nnUNetv2_train -num_gpus N) rank 0 computes the subspace and every rank uses its V (`shared_projection`):
each rank projects its own sum before the all-reduce (nnunet_dp.step), which adds up to the projection of the total
only with one V on every rank; ranks that computed their own could differ (GPU kernels, thread counts).
"""
from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import distributed as dist
from torch import nn

from nnunet_dp.config import DPConfig
from nnunet_dp.errors import DPConfigError, DPError
from nnunet_dp.nnunet.resume import read_checkpoint
from nnunet_dp.projection import Projection, top_subspace

PUBLIC_SEED = 20261206  # the public patches' sampling (public data only)
MAX_BASIS_ELEMENTS = 500_000_000  # d_P * k: 2 GB of float32 for V


def _fail(value: Any, allowed: str, fix: str = "") -> DPConfigError:
    return DPConfigError("projection", value, allowed, fix=fix)


def public_checkpoint(record: dict[str, Any] | None) -> dict:
    """The public checkpoint named by privacy.json's pretrained_weights record, its sha256 checked."""
    from nnunet_dp.nnunet.finetune import sha256_of

    if not record:
        raise _fail("public", "a run that starts from public weights (nnUNetv2_train ... -pretrained_weights FILE)",
                    "The subspace is estimated from the public model and its public cases.")
    path = record["path"]
    if not os.path.isfile(path) or sha256_of(path) != record.get("sha256"):
        raise _fail("public", f"the public checkpoint {path} as it was when training started (sha256 "
                    f"{str(record.get('sha256'))[:12]}...)", "It was moved or changed: restore it to resume.")
    return read_checkpoint(path)


def public_model(checkpoint: dict, cfg: DPConfig) -> tuple[nn.Module, Any, Any, dict]:
    """(network with the public weights, its label manager, configuration manager, plans) from the checkpoint."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_dp.nnunet.plans import apply_dp_to_configuration

    init = checkpoint.get("init_args") or {}
    plans, configuration, dataset_json = copy.deepcopy(init.get("plans")), init.get("configuration"), \
        init.get("dataset_json")
    if not plans or not configuration or not dataset_json:
        raise _fail("public", "a public checkpoint written by nnUNetv2_train (its init_args hold plans, configuration "
                    "and dataset.json)")
    manager = PlansManager(plans)
    conf = manager.get_configuration(configuration)
    apply_dp_to_configuration(plans, conf.configuration, configuration, norm_conversion=cfg.norm_conversion,
                              num_groups=cfg.group_norm_groups)
    labels = manager.get_label_manager(dataset_json)
    if labels.has_regions:
        raise _fail("public", "a public model with plain labels (region-based public models are not supported)")
    channels = determine_num_input_channels(manager, conf, dataset_json)
    net = nnUNetTrainer.build_network_architecture(manager, conf, channels, labels.num_segmentation_heads, True)
    state = net.state_dict()
    weights = {k: v for k, v in checkpoint["network_weights"].items() if k in state}
    missing = [k for k in state if k not in weights]
    if missing:
        raise _fail("public", f"a public checkpoint of the network its plans build (missing {missing[0]!r})")
    net.load_state_dict(weights)
    return net, labels, conf, plans


def _loss_and_scales(conf: Any, labels: Any) -> tuple[nn.Module, list]:
    """nnU-Net's loss for these labels with deep supervision (nnUNetTrainer._build_loss, batch Dice off)."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    scales = [list(i) for i in 1 / np.cumprod(np.vstack(conf.pool_op_kernel_sizes), axis=0)][:-1]
    loss = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=labels.ignore_label, dice_class=MemoryEfficientSoftDiceLoss)
    weights = np.array([1 / (2 ** i) for i in range(len(scales))])
    weights[-1] = 0
    return DeepSupervisionWrapper(loss, weights / weights.sum()), scales


def public_loader(folder: str, conf: Any, labels: Any, scales: list) -> Any:
    """nnU-Net's loader over every case of the public folder: one patch per call, its validation transforms (deep
    supervision targets), foreground oversampling 1/3 as nnU-Net trains."""
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    if not os.path.isdir(folder) or not os.listdir(folder):
        raise DPConfigError("projection_data", folder, "a folder of preprocessed public cases (nnU-Net's "
                            "$nnUNet_preprocessed/<public dataset>/<data identifier>)",
                            fix="Preprocess the public dataset with its plans, or name the folder in projection_data.")
    dataset = infer_dataset_class(folder)(folder, None)
    transforms = nnUNetTrainer.get_validation_transforms(scales, False, labels.foreground_labels, None,
                                                        labels.ignore_label)
    return nnUNetDataLoader(dataset, 1, conf.patch_size, conf.patch_size, labels, oversample_foreground_percent=0.33,
                            probabilistic_oversampling=True, transforms=transforms)


def public_gradients(net: nn.Module, loss: nn.Module, loader: Any, names: Sequence[str], samples: int,
                     device: torch.device) -> torch.Tensor:
    """(samples, d_P) per-patch gradients of the public loss for the parameters `names`, patches drawn with
    PUBLIC_SEED; the global numpy and torch generators are left as they were."""
    net = net.to(device).train()
    params = dict(net.named_parameters())
    chosen = [params[n] for n in names]
    rows = []
    state = np.random.get_state()
    try:
        np.random.seed(PUBLIC_SEED)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(PUBLIC_SEED)
            for _ in range(samples):
                batch = loader.generate_train_batch()
                data = batch["data"].to(device)
                target = [t.to(device) for t in batch["target"]]
                # the lowest deep-supervision head has weight 0 in nnU-Net's loss: its gradient is zero, not missing
                grads = torch.autograd.grad(loss(net(data), target), chosen, allow_unused=True)
                rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                                       for p, g in zip(chosen, grads)]).float().cpu())
    finally:
        np.random.set_state(state)
    return torch.stack(rows)


def setup_projection(trainer: Any) -> tuple[Projection, dict[str, Any]]:
    """The run's Projection (public subspace over the trained parameters the public network also has) and
    privacy.json's record of it."""
    cfg, selection = trainer.dp_config, trainer.dp_selection
    checkpoint = public_checkpoint(trainer.dp_pretrained)
    net, labels, conf, plans = public_model(checkpoint, cfg)
    folder = cfg.projection_data or os.path.join(os.environ.get("nnUNet_preprocessed", ""), plans["dataset_name"],
                                                 conf.data_identifier)
    ours = {id(p): n for n, p in trainer._plain_network().named_parameters()}
    theirs = dict(net.named_parameters())
    projected = tuple(ours[id(p)] in theirs and theirs[ours[id(p)]].shape == p.shape for p in selection.trained)
    names = [ours[id(p)] for p, flag in zip(selection.trained, projected) if flag]
    d_p = sum(theirs[n].numel() for n in names)
    if not names:
        raise _fail("public", "trained parameters that the public network also has (none of them match by name and "
                    "shape)")
    if d_p * cfg.projection_dim > MAX_BASIS_ELEMENTS:
        raise DPConfigError("projection_dim", cfg.projection_dim, f"at most {MAX_BASIS_ELEMENTS // d_p} for "
                            f"d_P = {d_p} projected parameters (the basis V holds d_P x k floats)",
                            fix="Train fewer parameters (trainable) or lower projection_dim.")
    loss, scales = _loss_and_scales(conf, labels)
    gradients = public_gradients(net, loss, public_loader(folder, conf, labels, scales), names,
                                 cfg.projection_samples, trainer.device)
    basis = top_subspace(gradients, cfg.projection_dim).float()
    captured = float((gradients.double() @ basis.double()).pow(2).sum() / gradients.double().pow(2).sum())
    sizes = [p.numel() for p in selection.trained]
    record = {"projection": "public", "projection_dim": cfg.projection_dim, "projected_parameters": d_p,
              "unprojected_parameters": sum(n for n, f in zip(sizes, projected) if not f),
              "noise_dimensions": Projection(basis, projected).noise_dimensions(sizes),
              "public_gradients": int(gradients.shape[0]), "public_data": folder,
              "public_energy_captured": captured}
    return Projection(basis=basis, projected=projected), record


def shared_projection(trainer: Any) -> tuple[Projection, dict[str, Any]]:
    """`setup_projection`, under DDP computed on rank 0 only and broadcast: every rank gets rank 0's basis (bit for
    bit) and record. A failure on rank 0 stops every rank (the others with a DPError that quotes it)."""
    if not trainer.is_ddp:
        return setup_projection(trainer)
    result, failure = None, None
    if dist.get_rank() == 0:
        try:
            result = setup_projection(trainer)
        except Exception as e:  # noqa: BLE001 (re-raised below, once the other ranks heard of it)
            failure = e
    box = [None if result is None else (result[0].projected, tuple(result[0].basis.shape), result[1]),
           None if failure is None else f"{type(failure).__name__}: {failure}"]
    dist.broadcast_object_list(box, src=0)
    if failure is not None:
        raise failure
    if box[1] is not None:
        raise DPError(f"projection public: rank 0 could not compute the public subspace ({box[1]})")
    projected, shape, record = box[0]
    basis = (result[0].basis if result is not None else torch.empty(shape, dtype=torch.float32)).to(trainer.device)
    dist.broadcast(basis, src=0)  # a device tensor: NCCL broadcasts only those
    return Projection(basis=basis.cpu(), projected=tuple(projected)), record
