"""One site's round: the DP trainer (nnUNetTrainerDP) on the site's own patients, from the global weights.

Design: the site drives the trainer's own hooks in-process (initialize, on_train_start, train_step /
DPRun.private_step, on_train_epoch_end) for `local_steps` steps, instead of running nnUNetv2_train for one epoch per
round: no checkpoint, progress plot or validation pass per round, the global weights go straight into the network,
and the update comes straight out of it. Everything private stays the trainer's: Poisson sampling, per-case clipping,
noise, journal, ledger, privacy.json. A new trainer (so a new DPRun, whose noise generator takes fresh OS entropy) is
made every round; its ledger continues from the site's write-ahead journal, which counts every step that ever ran in
the site's folder (a round lost to a crash included). sigma is calibrated for the site's own N and target epsilon over
all rounds x local_steps planned steps, and the trainer stops before overspending.

Only the update leaves: weights after the local steps minus the global weights (local noise), or the noised gradient
sum over the public normaliser B (distributed noise, one step per round: the sum over sites then carries central DP's
noise). No loss, Dice, count or shape of the site's data goes into the reply.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from nnunet_dp.federated import FederatedError
from nnunet_dp.federated.model import State, load_state, state_of

Mode = Literal["local", "distributed"]
MODES: tuple[str, ...] = ("local", "distributed")
ROUNDS_FILE = "federated_rounds.jsonl"  # site-private: one line per round (steps before/after); never sent
SETTINGS_FILE = "federated_dp_config.json"  # the effective DP settings of this site (public values only)
FOLD = "all"  # every case of the site trains
# settings a site may not change: they define the network all sites share, or the federation's schedule
SHARED_KEYS = ("norm_conversion", "group_norm_groups", "morph_in_training", "morph_kernel", "morph_classes")
REFUSED: dict[str, tuple[Any, ...]] = {"trainable": ("all",), "projection": ("none",), "ema_decay": (None,)}


@dataclass(frozen=True)
class Site:
    """A hospital: its name (declared, public), its folder (nnUNet_preprocessed/ inside; results written to
    nnUNet_results/ inside), its operator's DP settings (override the server's defaults) and, optionally, its
    operator-declared number of patients for weighted averaging (a public value the report lists)."""

    name: str
    folder: str
    settings: dict[str, Any] = field(default_factory=dict)
    declared_cases: int | None = None
    device: str = "cpu"

    @property
    def results(self) -> str:
        return os.path.join(self.folder, "nnUNet_results")

    @property
    def preprocessed(self) -> str:
        return os.path.join(self.folder, "nnUNet_preprocessed")


@dataclass(frozen=True)
class RoundTask:
    """What the server sends each round (all public): the schedule, the plans and the shared DP settings. In
    distributed mode also the central noise multiplier, the common sampling rate and the normaliser B."""

    round: int
    rounds: int
    local_steps: int
    mode: Mode
    plans: dict[str, Any]
    configuration: str
    settings: dict[str, Any]
    num_sites: int = 1
    central_noise_multiplier: float | None = None
    sampling_rate: float | None = None
    normaliser: float | None = None


def effective_settings(site: Site, task: RoundTask) -> dict[str, Any]:
    """The server's defaults, the site's own settings on top, then what the federation fixes (schedule, shared
    architecture settings; distributed: sigma / sqrt(K), the common q, one step per round)."""
    for key, allowed in REFUSED.items():
        value = {**task.settings, **site.settings}.get(key, allowed[0])
        if value not in allowed:
            raise FederatedError(key, value, f"{allowed[0]!r} in a federation (other values are not supported yet)")
    changed = [k for k in SHARED_KEYS if k in site.settings and site.settings[k] != task.settings.get(k)]
    if changed:
        raise FederatedError(changed[0], site.settings[changed[0]], "the server's value (it shapes the shared "
                             "network)", f"Remove '{changed[0]}' from site {site.name}'s settings.")
    out = {**task.settings, **site.settings, **{k: task.settings[k] for k in SHARED_KEYS if k in task.settings}}
    out.update(num_epochs=task.rounds, num_iterations_per_epoch=task.local_steps, num_val_iterations_per_epoch=0,
               save_every=10**6)
    if task.mode == "distributed":
        if task.local_steps != 1 or not task.central_noise_multiplier or not task.sampling_rate:
            raise FederatedError("mode", "distributed", "one local step per round, with the server's central noise "
                                 "multiplier and common sampling rate")
        out.update(noise_multiplier=task.central_noise_multiplier / np.sqrt(task.num_sites), target_epsilon=None,
                   sampling_rate=task.sampling_rate, expected_batch_size=None)
    return out


@contextlib.contextmanager
def site_environment(site: Site, settings_path: str) -> Iterator[None]:
    """nnU-Net's folder variables and nnUNet_dp_config pointing at the site, restored afterwards (one round runs at
    a time in a site's process)."""
    values = {"nnUNet_preprocessed": site.preprocessed, "nnUNet_results": site.results,
              "nnUNet_dp_config": settings_path}
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_plans(site: Site, plans: dict[str, Any], configuration: str) -> str:
    """The site's preprocessed dataset folder, after checking its data were preprocessed with the server's plans
    (same digest); the plans file is written there if the site has none."""
    from nnunet_dp.nnunet.plans import plans_digest

    folder = os.path.join(site.preprocessed, plans["dataset_name"])
    path = os.path.join(folder, f"{plans['plans_name']}.json")
    if not os.path.isdir(os.path.join(folder, plans["configurations"][configuration]["data_identifier"])):
        raise FederatedError("site data", folder, "the site's data preprocessed with the server's plans",
                             f"At site {site.name}: save the server's plans as {path}, then run nnUNetv2_preprocess -d "
                             f"{plans['dataset_name']} -plans_name {plans['plans_name']} -c {configuration}.")
    if os.path.isfile(path):
        with open(path) as f:
            mine = json.load(f)
        if plans_digest(mine, configuration) != plans_digest(plans, configuration):
            raise FederatedError("plans", path, "the server's plans (same spacing, patch, normalisation, topology)",
                                 "Preprocess the site's data again with the server's plans.")
    else:
        with open(path, "w") as f:
            json.dump(plans, f, indent=1)
    return folder


def _record(site_output: str, entry: dict[str, Any]) -> None:
    with open(os.path.join(site_output, ROUNDS_FILE), "a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


def make_trainer(site: Site, task: RoundTask, dataset_folder: str) -> Any:
    """nnUNetTrainerDP on the site's folders (fold 'all'), initialised; the caller holds site_environment."""
    from nnunet_dp.nnunet.trainer import nnUNetTrainerDP

    with open(os.path.join(dataset_folder, "dataset.json")) as f:
        dataset_json = json.load(f)
    with contextlib.redirect_stdout(sys.stderr):
        trainer = nnUNetTrainerDP({**task.plans, "continue_training": False}, task.configuration, FOLD, dataset_json,
                                  torch.device(site.device))
        trainer.initialize()
    return trainer


def _private_gradient(trainer: Any, batch: dict) -> State:
    """One DP step of the trainer's own DPRun (as train_step, without the optimizer): the noised gradient
    (sum + N(0, sigma^2 C^2)) / (qN) of every trained parameter."""
    data, target = batch["data"], batch["target"]
    if data is not None:
        data = data.to(trainer.device)
        target = [t.to(trainer.device) for t in target] if isinstance(target, list) else target.to(trainer.device)
    net = trainer._plain_network()
    net.zero_grad(set_to_none=True)
    trainer.dp_run.private_step(net, trainer.dp_loss, data, target, trainer._autocast(),
                                group=trainer.dp_config.augmentations_per_case)
    return {k: (p.grad.detach().cpu().double().numpy() if p.grad is not None else np.zeros(tuple(p.shape)))
            for k, p in net.named_parameters()}


def _local_steps(trainer: Any, task: RoundTask) -> tuple[list[dict], State | None]:
    trainer.network.train()
    trainer.lr_scheduler.step(task.round - 1)  # nnU-Net's poly decay over the rounds
    outputs, gradient = [], None
    for _ in range(task.local_steps):
        if not trainer.dp_run.can_step():
            break
        batch = next(trainer.dataloader_train)
        if task.mode == "distributed":
            gradient = _private_gradient(trainer, batch)
        else:
            outputs.append(trainer.train_step(batch))
    return outputs, gradient


def _finish(trainer: Any, status: str) -> None:
    trainer.dp_status = status
    from nnunet_dp.nnunet.report import write_privacy

    write_privacy(trainer)
    if trainer.dp_run.journal is not None:
        trainer.dp_run.journal.close()
    for loader in (trainer.dataloader_train, trainer.dataloader_val):
        if hasattr(loader, "_finish"):
            loader._finish()


def _update(trainer: Any, task: RoundTask, start: State, gradient: State | None) -> State:
    net = trainer._plain_network()
    if task.mode == "local":
        end = state_of(net)
        return {k: (end[k].astype(np.float64) - start[k]).astype(np.float32) for k in start}
    scale = trainer.dp_run.plan.expected_batch_size / float(task.normaliser)  # (sum + noise) / B
    grads = {k: (g * scale).astype(np.float32) for k, g in (gradient or {}).items()}
    return {k: grads.get(k, np.zeros_like(v)) for k, v in start.items()}


def run_round(site: Site, task: RoundTask, global_state: Mapping[str, np.ndarray]) -> tuple[State, dict[str, Any]]:
    """The site's round: its update and a site-private record (steps, epsilon so far; never sent)."""
    from nnunet_dp.journal import JOURNAL_FILE, read_history, total_steps

    dataset_folder = check_plans(site, task.plans, task.configuration)
    settings = effective_settings(site, task)
    os.makedirs(site.folder, exist_ok=True)
    settings_path = os.path.join(site.folder, SETTINGS_FILE)
    with open(settings_path, "w") as f:
        json.dump(settings, f, indent=1)
    with site_environment(site, settings_path):
        trainer = make_trainer(site, task, dataset_folder)
        trainer.dp_resumed_steps = total_steps(read_history(os.path.join(trainer.output_folder, JOURNAL_FILE)))
        start = {k: np.asarray(v, dtype=np.float64) for k, v in global_state.items()}
        load_state(trainer._plain_network(), global_state)
        with contextlib.redirect_stdout(sys.stderr):
            trainer.on_train_start()  # loaders; journal continued (fresh noise: a new DPRun); privacy.json
        before, t0 = trainer.dp_run.steps, time.time()
        _record(trainer.output_folder, {"round": task.round, "mode": task.mode, "event": "start", "steps": before})
        try:
            outputs, gradient = _local_steps(trainer, task)
            if outputs:
                trainer.on_train_epoch_end(outputs)  # logs (site-private) and the divergence stop
        finally:
            _finish(trainer, f"federated: round {task.round} of {task.rounds}")
        after = trainer.dp_run.steps
        _record(trainer.output_folder, {"round": task.round, "mode": task.mode, "event": "end", "steps": after})
        if after == before:
            raise FederatedError("privacy budget", f"site {site.name}: {after} steps", "room for another step",
                                 "The site's target epsilon is spent; it takes no further part.")
        info = {"site": site.name, "round": task.round, "steps": after - before, "total_steps": after,
                "epsilon": trainer.dp_run.epsilon(), "seconds": time.time() - t0, "output": trainer.output_folder}
        return _update(trainer, task, start, gradient), info
