"""The global model: built from the server's plans exactly as the DP trainer builds it, its state as numpy arrays,
and the server's checks and aggregation of site updates (pure numpy, no Flower).

An update is site weights after its local steps minus the global weights it started from (local noise), or a site's
noised gradient sum over a public normaliser (distributed noise, summed under SecAgg+). A reply whose arrays have other
names or shapes, or any value that is not finite, is rejected as a whole: the round goes on without it and the global
model never sees it.
"""
from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from nnunet_dp.config import DPConfig
from nnunet_dp.federated import FederatedError

State = dict[str, np.ndarray]


def build_network(plans: dict[str, Any], dataset_json: dict[str, Any], configuration: str, cfg: DPConfig, *,
                  deep_supervision: bool = True, seed: int | None = 0) -> nn.Module:
    """nnU-Net's network for `configuration` with the DP trainer's changes (GroupNorm, DP-Morph in training), as
    nnUNetTrainerDP builds it. `seed`: a public seed for the initial weights (data-independent); None: torch's."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_dp.nnunet.plans import apply_dp_to_configuration

    manager = PlansManager(copy.deepcopy(plans))
    conf = manager.get_configuration(configuration)
    heads = manager.get_label_manager(dataset_json).num_segmentation_heads
    apply_dp_to_configuration(manager.plans, conf.configuration, configuration, norm_conversion=cfg.norm_conversion,
                              num_groups=cfg.group_norm_groups, morph_ops=cfg.morph_ops(heads, len(conf.patch_size)))
    channels = determine_num_input_channels(manager, conf, dataset_json)
    if seed is not None:
        torch.manual_seed(seed)
    return nnUNetTrainer.build_network_architecture(manager, conf, channels, heads, deep_supervision)


def _aliases(module: nn.Module) -> dict[str, str]:
    """state_dict key -> the first key holding the same tensor (nnU-Net's decoder holds the encoder, so its
    state_dict lists every encoder tensor twice; the model travels once)."""
    first: dict[tuple[int, tuple[int, ...]], str] = {}
    out = {}
    for key, t in module.state_dict(keep_vars=True).items():
        out[key] = first.setdefault((t.data_ptr(), tuple(t.shape)), key)
    return out


def state_of(module: nn.Module) -> State:
    """The module's state_dict without aliases, as float32 numpy arrays (copies)."""
    aliases = _aliases(module)
    return {k: v.detach().cpu().float().numpy().copy() for k, v in module.state_dict().items() if aliases[k] == k}


def load_state(module: nn.Module, state: Mapping[str, np.ndarray]) -> None:
    """Load numpy arrays into `module`, after checking names and shapes (never a partial load)."""
    problem = check_arrays(state, state_of(module), finite=False)
    if problem is not None:
        raise FederatedError("global model", problem, "the arrays of the network built from the server's plans",
                             "The site's plans or DP architecture settings differ from the server's.")
    own = module.state_dict()
    module.load_state_dict({k: torch.from_numpy(np.asarray(state[a])).to(own[k].dtype)
                            for k, a in _aliases(module).items()})


def check_arrays(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], *,
                 finite: bool = True) -> str | None:
    """Why `arrays` cannot be used against `reference` (names, shapes, finiteness), or None."""
    missing, extra = sorted(set(reference) - set(arrays)), sorted(set(arrays) - set(reference))
    if missing or extra:
        return f"array names differ (missing {missing[:3]}, unexpected {extra[:3]})"
    for key, ref in reference.items():
        a = np.asarray(arrays[key])
        if a.shape != ref.shape:
            return f"array {key!r} has shape {a.shape}, the model's is {ref.shape}"
        if finite and not np.isfinite(a).all():
            return f"array {key!r} holds {int((~np.isfinite(a)).sum())} values that are not finite"
    return None


def check_weight(value: Any) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value) and value > 0
    return None if ok else f"weight {value!r} is not a finite number > 0"


def average_updates(global_state: State, updates: Sequence[tuple[float, State]]) -> State:
    """global + sum_k a_k update_k with a_k = w_k / sum_j w_j (uniform when every declared weight is 1). No update:
    the global model unchanged."""
    if not updates:
        return {k: v.copy() for k, v in global_state.items()}
    total = float(sum(w for w, _ in updates))
    out = {}
    for key, ref in global_state.items():
        acc = np.zeros(ref.shape, dtype=np.float64)
        for w, upd in updates:
            acc += (w / total) * np.asarray(upd[key], dtype=np.float64)
        out[key] = (ref.astype(np.float64) + acc).astype(ref.dtype)
    return out


class ServerSGD:
    """The server's step in distributed-noise mode: SGD (nesterov momentum) on the summed noised gradients, with
    nnU-Net's poly decay over rounds. Post-processing of the released sum: no privacy cost."""

    def __init__(self, *, lr: float, momentum: float, nesterov: bool, rounds: int) -> None:
        self.lr, self.momentum, self.nesterov, self.rounds = lr, momentum, nesterov, rounds
        self.velocity: State = {}

    def step(self, state: State, gradient: Mapping[str, np.ndarray], round_index: int) -> State:
        lr = self.lr * (1 - round_index / self.rounds) ** 0.9  # nnU-Net's PolyLRScheduler
        out = {k: v.copy() for k, v in state.items()}
        for key, g in gradient.items():
            g = np.asarray(g, dtype=np.float64)
            v = self.momentum * self.velocity.get(key, np.zeros_like(g)) + g
            self.velocity[key] = v
            d = g + self.momentum * v if self.nesterov else v
            out[key] = (state[key].astype(np.float64) - lr * d).astype(state[key].dtype)
        return out


def load_pretrained(module: nn.Module, path: str) -> None:
    """Public starting weights: the network_weights of an nnU-Net checkpoint (same plans and labels), all of them."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    weights = checkpoint.get("network_weights") if isinstance(checkpoint, dict) else None
    if not isinstance(weights, dict):
        raise FederatedError("pretrained", path, "an nnU-Net checkpoint with network_weights")
    own = module.state_dict()
    bad = sorted(k for k in own if k not in weights or tuple(weights[k].shape) != tuple(own[k].shape))
    if bad:
        raise FederatedError("pretrained", path, f"weights for every array of the server's network (missing or "
                             f"other shape: {bad[:3]})", "Use a checkpoint trained with the same plans and labels.")
    module.load_state_dict({k: weights[k] for k in own})


def write_model_folder(output: str, state: Mapping[str, np.ndarray], plans: dict[str, Any],
                       dataset_json: dict[str, Any], configuration: str, cfg: DPConfig) -> str:
    """The global model as an nnU-Net model folder (plans.json with the DP network, dataset.json,
    fold_all/checkpoint_final.pth holding only the weights): `nnUNetv2_predict_from_modelfolder -m FOLDER -f all`
    predicts with it. Returns FOLDER."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_dp.nnunet.plans import apply_dp_to_configuration

    net = build_network(plans, dataset_json, configuration, cfg)
    load_state(net, state)
    dp_plans = copy.deepcopy(plans)
    manager = PlansManager(dp_plans)
    conf = manager.get_configuration(configuration)
    heads = manager.get_label_manager(dataset_json).num_segmentation_heads
    apply_dp_to_configuration(dp_plans, conf.configuration, configuration, norm_conversion=cfg.norm_conversion,
                              num_groups=cfg.group_norm_groups, morph_ops=cfg.morph_ops(heads, len(conf.patch_size)))
    folder = os.path.join(output, f"nnUNetTrainer__{plans['plans_name']}__{configuration}")
    os.makedirs(os.path.join(folder, "fold_all"), exist_ok=True)
    for name, obj in (("plans.json", dp_plans), ("dataset.json", dataset_json)):
        with open(os.path.join(folder, name), "w") as f:
            json.dump(obj, f, indent=1)
    checkpoint = {"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainer", "current_epoch": 0,
                  "init_args": {"plans": dp_plans, "configuration": configuration, "fold": "all",
                                "dataset_json": dataset_json, "device": "cpu"},
                  "inference_allowed_mirroring_axes": tuple(range(len(conf.patch_size)))}
    tmp = os.path.join(folder, "fold_all", "checkpoint_final.pth.tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, os.path.join(folder, "fold_all", "checkpoint_final.pth"))
    return folder
