"""The Flower app: `server_app` and `client_app` for `flwr run` (components in the app's pyproject.toml, written by
`nnUNetv2_dp_federated app`), and the same apps built from Python for Flower's simulation engine.

The server reads its settings from the run config (keys below, in [tool.flwr.app.config]); each SuperNode finds its
site in its node config (nnunet_dp.federated.client).
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from flwr.app import Context
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp

from nnunet_dp.accounting import calibrate_noise
from nnunet_dp.config import DPConfig
from nnunet_dp.federated import FederatedError
from nnunet_dp.federated.client import make_client_app
from nnunet_dp.federated.model import ServerSGD, State, build_network, load_pretrained, state_of, write_model_folder
from nnunet_dp.federated.server import FederationRecord, LocalNoiseAvg, SecAggSum, to_record
from nnunet_dp.federated.site import MODES
from nnunet_dp.optim import default_lr

OnRound = Callable[[int, State], None]


@dataclass
class FederationConfig:
    """The coordinator's settings (all public). settings: the sites' default DP settings (nnUNet_dp_config keys);
    a site's operator may override its own (target_epsilon, expected_batch_size, ...), not the shared network's."""

    plans_file: str
    dataset_json: str
    configuration: str
    output: str
    num_sites: int
    rounds: int
    local_steps: int = 1
    mode: str = "local"
    settings: dict[str, Any] = field(default_factory=dict)
    min_sites: int = 1
    pretrained: str | None = None
    init_seed: int = 0
    sampling_rate: float | None = None  # distributed: the common q of every site
    normaliser: float | None = None  # distributed: B, the public divisor of the summed noised gradient
    secagg_clipping_range: float = 8.0
    secagg_shares: float = 1.0
    secagg_threshold: float = 0.67
    sites_root: str | None = None  # `flwr run` in the simulation runtime: the sites' folders (read by the ClientApp)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FederationConfig:
        """From `flwr run`'s run config: the fields with '-' for '_'; 'settings' as a JSON string."""
        names = {f.name.replace("_", "-"): f.name for f in fields(cls)}
        unknown = sorted(set(run_config) - set(names))
        if unknown:
            raise FederatedError("run config", unknown, f"keys among {sorted(names)}")
        values = {names[k]: v for k, v in run_config.items()}
        if isinstance(values.get("settings"), str):
            values["settings"] = json.loads(values["settings"])
        for key in ("pretrained", "sampling_rate", "normaliser", "sites_root"):
            if values.get(key) in ("", 0, 0.0):
                values[key] = None
        return cls(**values)

    def check(self) -> None:
        if self.mode not in MODES:
            raise FederatedError("mode", self.mode, f"one of {MODES}")
        for key in ("num_sites", "rounds", "local_steps", "min_sites"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise FederatedError(key, getattr(self, key), "an integer >= 1")
        if self.mode == "distributed" and (self.local_steps != 1 or not self.sampling_rate or self.num_sites < 2):
            raise FederatedError("mode", "distributed", "local_steps 1, a common sampling_rate q and >= 2 sites",
                                 "Distributed noise adds sigma/sqrt(K) per site to one private step per round.")


def _start(cfg: FederationConfig) -> tuple[dict, dict, DPConfig, State]:
    cfg.check()
    with open(cfg.plans_file) as f:
        plans = json.load(f)
    with open(cfg.dataset_json) as f:
        dataset_json = json.load(f)
    dp = DPConfig.from_mapping({k: v for k, v in cfg.settings.items() if k != "seed"}, source="federation settings")
    net = build_network(plans, dataset_json, cfg.configuration, dp, seed=cfg.init_seed)
    if cfg.pretrained:
        load_pretrained(net, cfg.pretrained)
    return plans, dataset_json, dp, state_of(net)


def _task(cfg: FederationConfig, plans: dict) -> dict[str, Any]:
    return {"rounds": cfg.rounds, "local_steps": cfg.local_steps, "mode": cfg.mode, "plans": plans,
            "configuration": cfg.configuration, "settings": cfg.settings, "num_sites": cfg.num_sites}


def _record(cfg: FederationConfig, **extra: Any) -> FederationRecord:
    start = "pretrained: " + os.path.abspath(cfg.pretrained) if cfg.pretrained else f"public seed {cfg.init_seed}"
    return FederationRecord(folder=cfg.output, mode=cfg.mode, extra={
        "rounds_planned": cfg.rounds, "local_steps": cfg.local_steps, "num_sites": cfg.num_sites,
        "settings": cfg.settings, "initial_weights": start, **extra})


def run_local(grid: Grid, cfg: FederationConfig, on_round: OnRound | None = None) -> State:
    """Local noise: each site's own DP, the server averages the checked updates."""
    plans, dataset_json, dp, state = _start(cfg)
    record = _record(cfg)
    final: dict[str, State] = {"state": state}

    def keep(r: int, s: State) -> None:
        final["state"] = s
        if on_round is not None:
            on_round(r, s)

    strategy = LocalNoiseAvg(task=_task(cfg, plans), record=record, num_sites=cfg.num_sites,
                             min_sites=cfg.min_sites, on_round=keep)
    record.write()
    strategy.start(grid=grid, initial_arrays=to_record(state), num_rounds=cfg.rounds)
    write_model_folder(cfg.output, final["state"], plans, dataset_json, cfg.configuration, dp)
    return final["state"]


def run_distributed(grid: Grid, context: Context, cfg: FederationConfig, on_round: OnRound | None = None) -> State:
    """Distributed noise under SecAgg+: sigma/sqrt(K) per site, one step per round, server SGD on the sum."""
    plans, dataset_json, dp, state = _start(cfg)
    q = float(cfg.sampling_rate)
    sigma = dp.noise_multiplier or calibrate_noise(target_epsilon=dp.target_epsilon, delta=dp.delta,
                                                   sampling_rate=q, steps=cfg.rounds, accountant=dp.accountant)
    batch = cfg.normaliser or float(dp.expected_batch_size or 2) * cfg.num_sites
    lr = dp.initial_lr or default_lr(noise_multiplier=sigma, clip_norm=dp.clip_norm, expected_batch_size=batch,
                                     steps=cfg.rounds, momentum=dp.momentum)
    secagg = {"num_shares": cfg.secagg_shares, "reconstruction_threshold": cfg.secagg_threshold,
              "clipping_range": cfg.secagg_clipping_range, "max_weight": 1.0}
    record = _record(cfg, central_noise_multiplier=sigma, sampling_rate=q, normaliser=batch, server_lr=lr)
    record.secagg = secagg
    keys = sorted(state)
    task = {**_task(cfg, plans), "central_noise_multiplier": sigma, "sampling_rate": q, "normaliser": batch,
            "keys": keys, "secagg_clipping_range": cfg.secagg_clipping_range}
    strategy = SecAggSum(keys=keys, state=state, task=task, record=record, min_sites=cfg.min_sites, on_round=on_round,
                         optimizer=ServerSGD(lr=lr, momentum=dp.momentum, nesterov=dp.nesterov, rounds=cfg.rounds))
    record.write()
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=cfg.rounds), strategy=strategy)
    DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(**secagg))(grid, legacy)
    write_model_folder(cfg.output, strategy.state, plans, dataset_json, cfg.configuration, dp)
    return strategy.state


def run_federation(grid: Grid, context: Context, cfg: FederationConfig, on_round: OnRound | None = None) -> State:
    if cfg.mode == "distributed":
        return run_distributed(grid, context, cfg, on_round)
    return run_local(grid, cfg, on_round)


def make_server_app(cfg: FederationConfig | None = None, on_round: OnRound | None = None) -> ServerApp:
    """The ServerApp; cfg None: read from the run config (`flwr run`)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, context, cfg or FederationConfig.from_run_config(context.run_config), on_round)

    return app


server_app = make_server_app()
client_app = make_client_app()
