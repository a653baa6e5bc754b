"""`nnUNetv2_dp_federated simulate`: one dataset split into K sites by patient, every arm of the comparison trained and
scored on the same held-out test patients, with repeats and wall times (OUT/results.csv, OUT/results.md).

Arms: each site alone (DP, its own N), federated with local noise (Flower simulation), federated with distributed
noise (Flower simulation, SecAgg+), central DP on the pooled patients (expected batch K x b, the federation's cases per
step), non-private pooled (the same trainer without clipping or noise: C = 1e6, sigma = 1e-12), and the public model
alone when --pretrained gives one. Single-site arms run the very same site round (site.run_round) in this process,
round after round, so that every arm differs only in who trains with whom.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from nnunet_dp.config import DPConfig
from nnunet_dp.federated.accounting import FEDERATED_PRIVACY_JSON, FEDERATION_JSON, federated_report
from nnunet_dp.federated.evaluate import held_out_dice
from nnunet_dp.federated.model import average_updates, build_network, load_pretrained, state_of, write_model_folder
from nnunet_dp.federated.site import FOLD, RoundTask, Site, run_round
from nnunet_dp.federated.split import POOLED, PUBLIC, SiteMap, materialise_site

ARMS: tuple[str, ...] = ("site", "federated_local", "federated_distributed", "central", "nonprivate", "public")
NONPRIVATE = {"target_epsilon": None, "noise_multiplier": 1e-12, "clip_norm": 1e6}


@dataclass
class Experiment:
    source: str  # the preprocessed dataset folder (all cases, preprocessed with data-independent plans)
    configuration: str
    plans_name: str
    site_map: SiteMap
    output: str
    rounds: int = 10
    local_steps: int = 5
    epsilon: float = 8.0
    delta: float = 1e-5
    expected_batch_size: float = 4.0
    repeats: int = 1
    arms: tuple[str, ...] = ARMS
    pretrained: str | None = None
    nonprivate_lr: float = 0.1  # the harness's `tiny` non-private lr (200-400 steps; 0.01 left it untrained)
    device: str = "cpu"
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def plans(self) -> dict[str, Any]:
        with open(os.path.join(self.source, f"{self.plans_name}.json")) as f:
            return json.load(f)

    @property
    def data_identifier(self) -> str:
        return self.plans["configurations"][self.configuration]["data_identifier"]

    def base_settings(self) -> dict[str, Any]:
        return {"target_epsilon": self.epsilon, "delta": self.delta, "expected_batch_size": self.expected_batch_size,
                **self.settings}


def _sites(exp: Experiment, folder: str, names: list[str], settings: dict[str, Any]) -> list[Site]:
    """Fresh site folders (new journals) for one run: symlinked cases, the plans, dataset.json."""
    out = []
    for name in names:
        cases = [c for v in exp.site_map.sites.values() for c in v] if name == POOLED else \
            exp.site_map.public if name == PUBLIC else exp.site_map.sites[name]
        root = os.path.join(folder, "sites", name)
        shutil.rmtree(root, ignore_errors=True)
        materialise_site(exp.source, root, cases, data_identifier=exp.data_identifier, plans_name=exp.plans_name)
        out.append(Site(name, root, settings=settings, device=exp.device))
    return out


def _initial(exp: Experiment, cfg: DPConfig) -> dict[str, np.ndarray]:
    with open(os.path.join(exp.source, "dataset.json")) as f:
        dataset_json = json.load(f)
    net = build_network(exp.plans, dataset_json, exp.configuration, cfg)
    if exp.pretrained:
        load_pretrained(net, exp.pretrained)
    return state_of(net)


def _finish(exp: Experiment, folder: str, state: dict[str, np.ndarray], cfg: DPConfig) -> float:
    with open(os.path.join(exp.source, "dataset.json")) as f:
        dataset_json = json.load(f)
    model = write_model_folder(folder, state, exp.plans, dataset_json, exp.configuration, cfg)
    return held_out_dice(model, os.path.join(exp.source, exp.data_identifier), exp.site_map.test, exp.device)


def _site_output(site: Site, exp: Experiment) -> str:
    name = os.path.basename(os.path.normpath(exp.source))
    return os.path.join(site.results, name, f"nnUNetTrainerDP__{exp.plans_name}__{exp.configuration}", f"fold_{FOLD}")


def run_alone(exp: Experiment, folder: str, site: Site) -> dict[str, Any]:
    """One site (or the pooled patients) training alone: the same rounds of site.run_round, its update applied."""
    settings = {**exp.base_settings(), **site.settings}
    task = RoundTask(round=1, rounds=exp.rounds, local_steps=exp.local_steps, mode="local", plans=exp.plans,
                     configuration=exp.configuration, settings=settings)
    cfg = DPConfig.from_mapping(settings, source="experiment")
    state = _initial(exp, cfg)
    for r in range(1, exp.rounds + 1):
        update, _ = run_round(replace(site, settings={}), replace(task, round=r), state)
        state = average_updates(state, [(1.0, update)])
    report = federated_report({"mode": "local"}, {site.name: _site_output(site, exp)}, delta=exp.delta)
    return {"dice": _finish(exp, folder, state, cfg), "epsilon": report["release_epsilon_local_trust"],
            "steps": report["sites"][0]["steps"]}


def run_federated(exp: Experiment, folder: str, mode: str) -> dict[str, Any]:
    """The K sites in Flower's simulation engine (local or distributed noise)."""
    from flwr.simulation import run_simulation

    from nnunet_dp.federated.app import FederationConfig, make_server_app
    from nnunet_dp.federated.client import make_client_app, simulation_sites

    names = list(exp.site_map.sites)
    sites = _sites(exp, folder, names, {})
    pooled = sum(len(c) for c in exp.site_map.sites.values())
    distributed = mode == "distributed"
    cfg = FederationConfig(
        plans_file=os.path.join(exp.source, f"{exp.plans_name}.json"),
        dataset_json=os.path.join(exp.source, "dataset.json"), configuration=exp.configuration,
        output=os.path.join(folder, "server"), num_sites=len(names), pretrained=exp.pretrained, mode=mode,
        rounds=exp.rounds * (exp.local_steps if distributed else 1), local_steps=1 if distributed else exp.local_steps,
        settings=exp.base_settings(), sampling_rate=min(1.0, exp.expected_batch_size * len(names) / pooled)
        if distributed else None, normaliser=exp.expected_batch_size * len(names) if distributed else None)
    run_simulation(make_server_app(cfg), make_client_app(simulation_sites(sites)), num_supernodes=len(names),
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0},
                                   "init_args": {"num_cpus": min(len(names), os.cpu_count() or 1),
                                                 "include_dashboard": False}})
    with open(os.path.join(cfg.output, FEDERATION_JSON)) as f:
        federation = json.load(f)
    report = federated_report(federation, {s.name: _site_output(s, exp) for s in sites}, delta=exp.delta)
    with open(os.path.join(folder, FEDERATED_PRIVACY_JSON), "w") as f:
        json.dump(report, f, indent=1)
    model = os.path.join(cfg.output, f"nnUNetTrainer__{exp.plans_name}__{exp.configuration}")
    dice = held_out_dice(model, os.path.join(exp.source, exp.data_identifier), exp.site_map.test, exp.device)
    return {"dice": dice, "epsilon": report["release_epsilon_local_trust"],
            "epsilon_secagg": report.get("release_epsilon_secagg_trust"),
            "steps": max(r["steps"] for r in report["sites"])}


def _jobs(exp: Experiment) -> list[tuple[str, Any]]:
    jobs: list[tuple[str, Any]] = []
    k = len(exp.site_map.sites)
    for arm in exp.arms:
        if arm == "site":
            jobs += [(f"alone_{name}", ("alone", name, {})) for name in exp.site_map.sites]
        elif arm in ("federated_local", "federated_distributed"):
            jobs.append((arm, ("federated", arm.split("_")[1], None)))
        elif arm == "central":
            jobs.append(("central_dp_pooled", ("alone", POOLED, {"expected_batch_size": exp.expected_batch_size * k})))
        elif arm == "nonprivate":
            jobs.append(("nonprivate_pooled", ("alone", POOLED, {**NONPRIVATE, "initial_lr": exp.nonprivate_lr,
                                                                 "expected_batch_size": exp.expected_batch_size * k})))
        elif arm == "public" and exp.pretrained:
            jobs.append(("public_alone", ("public", None, None)))
    return jobs


def pretrain_public(exp: Experiment) -> str:
    """The public model of an experiment (its split's public part): the non-private pooled trainer on the public
    cases for the same rounds x local steps, from scratch, once. Returns its checkpoint (the arms' --pretrained)."""
    folder = os.path.join(exp.output, "public")
    checkpoint = os.path.join(folder, f"nnUNetTrainer__{exp.plans_name}__{exp.configuration}", "fold_all",
                              "checkpoint_final.pth")
    if not os.path.isfile(checkpoint):
        settings = {**NONPRIVATE, "initial_lr": exp.nonprivate_lr, "expected_batch_size": exp.expected_batch_size}
        run_alone(replace(exp, pretrained=None), folder, _sites(exp, folder, [PUBLIC], settings)[0])
    return checkpoint


def run_job(exp: Experiment, folder: str, job: tuple[str, Any]) -> dict[str, Any]:
    kind, name, settings = job
    if kind == "federated":
        return run_federated(exp, folder, name)
    if kind == "public":
        cfg = DPConfig.from_mapping(exp.base_settings(), source="experiment")
        return {"dice": _finish(exp, folder, _initial(exp, cfg), cfg), "epsilon": 0.0, "steps": 0}
    site = _sites(exp, folder, [name], settings)[0]
    return run_alone(exp, folder, site)
