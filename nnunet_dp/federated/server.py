"""The server side on Flower: what each round sends, the checks on what comes back, the aggregation, the record.

Local noise: a FedAvg (Flower's Message-API strategy) whose aggregation adds the checked updates to the global
weights, uniformly weighted unless the sites' operators declared their N. Distributed noise: Flower's SecAgg+ workflow
(legacy DefaultWorkflow + SecAggPlusWorkflow, the one Flower 1.42 ships) with a strategy that turns the securely
summed noised gradients into one server SGD step. Both write federation.json: per round which sites' updates are in
the aggregate and why others are not (public facts the accounting needs).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from nnunet_dp.federated import FederatedError
from nnunet_dp.federated.accounting import FEDERATION_JSON
from nnunet_dp.federated.model import ServerSGD, State, average_updates, check_arrays, check_weight

TASK_KEY = "task"  # ConfigRecord entry: the round's task as JSON (public values only)
SITE_KEY = "site"  # reply ConfigRecord: the site's declared name
WEIGHT_KEY = "weight"  # reply MetricRecord: 1, or the operator-declared N


@dataclass
class FederationRecord:
    """federation.json: the mode, the aggregation, and for each round the sites in the aggregate."""

    folder: str
    mode: str
    aggregation: str = "uniform"
    secagg: dict[str, Any] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    declared_cases: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, round_index: int, sites: list[str], rejected: dict[str, str], failures: int) -> None:
        self.rounds.append({"round": round_index, "sites": sorted(sites), "rejected": rejected, "failures": failures})
        self.write()

    def write(self) -> None:
        os.makedirs(self.folder, exist_ok=True)
        data = {k: v for k, v in asdict(self).items() if k not in ("folder", "extra")} | self.extra
        tmp = os.path.join(self.folder, FEDERATION_JSON + ".tmp")
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, os.path.join(self.folder, FEDERATION_JSON))


def to_record(state: State) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def from_record(record: ArrayRecord) -> State:
    return {k: a.numpy() for k, a in record.items()}


def _reply_parts(msg: Message) -> tuple[str, State, Any] | str:
    """(site, update, weight) of a reply, or why it cannot be used."""
    c = msg.content
    if set(c.array_records) != {"arrays"} or set(c.metric_records) != {"metrics"}:
        return f"unexpected records {sorted(c.array_records)} / {sorted(c.metric_records)}"
    site = c.config_records.get(SITE_KEY, ConfigRecord()).get("name", f"node {msg.metadata.src_node_id}")
    return str(site), from_record(c.array_records["arrays"]), c.metric_records["metrics"].get(WEIGHT_KEY)


class LocalNoiseAvg(FedAvg):
    """FedAvg on updates: every reply checked on its own (names, shapes, finite values, weight); a bad one is left
    out of the round, never averaged. Fewer than `min_sites` usable replies: the global model stays as it was and,
    below min_sites, the federation stops with the reasons."""

    def __init__(self, *, task: dict[str, Any], record: FederationRecord, num_sites: int, min_sites: int,
                 on_round: Any = None) -> None:
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=num_sites,
                         min_available_nodes=num_sites, weighted_by_key=WEIGHT_KEY)
        self.task, self.record, self.min_sites, self.on_round = task, record, min_sites, on_round
        self.current: State = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.current = from_record(arrays)
        task = ConfigRecord({TASK_KEY: json.dumps({**self.task, "round": server_round})})
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, self.min_train_nodes)  # waits for every site
        return [Message(content=RecordDict({"arrays": arrays, "config": task}), message_type=MessageType.TRAIN,
                        dst_node_id=n) for n in node_ids]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord, MetricRecord]:
        good, rejected, failures = [], {}, 0
        for msg in replies:
            if msg.has_error():
                failures += 1
                continue
            parts = _reply_parts(msg)
            if isinstance(parts, str):
                rejected[f"node {msg.metadata.src_node_id}"] = parts
                continue
            site, update, weight = parts
            why = check_arrays(update, self.current) or check_weight(weight)
            if why is None and site in {s for s, _, _ in good}:
                why = "a second reply under the same site name"
            if why is not None:
                rejected[site] = why
            else:
                good.append((site, update, float(weight)))
        for site, _, weight in good:  # an operator-declared N: a public value the report lists
            if weight != 1.0:
                self.record.declared_cases[site] = weight
                self.record.aggregation = "weighted by the sites' declared number of patients"
        self.record.add(server_round, [s for s, _, _ in good], rejected, failures)
        if len(good) < self.min_sites:
            raise FederatedError("min_sites", self.min_sites, f"at most the {len(good)} usable replies of round "
                                 f"{server_round} (rejected: {rejected or 'none'}; failed: {failures})",
                                 "The global model is kept as it was before this round.")
        new = average_updates(self.current, [(w, u) for _, u, w in good])
        if self.on_round is not None:
            self.on_round(server_round, new)
        return to_record(new), MetricRecord({"sites-aggregated": len(good)})


class SecAggSum(LegacyFedAvg):
    """The strategy under SecAggPlusWorkflow: the workflow hands over the securely aggregated mean of the sites'
    (sum + noise)/B vectors (weights 1); times the number of sites in it that is the pooled noised gradient, and the
    server takes one SGD step with it."""

    def __init__(self, *, keys: list[str], state: State, task: dict[str, Any], record: FederationRecord,
                 optimizer: ServerSGD, min_sites: int, on_round: Any = None) -> None:
        super().__init__(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=task["num_sites"],
                         min_available_clients=task["num_sites"],
                         initial_parameters=ndarrays_to_parameters([state[k] for k in keys]),
                         on_fit_config_fn=lambda r: {TASK_KEY: json.dumps({**task, "round": r})})
        self.keys, self.state, self.record, self.optimizer = keys, state, record, optimizer
        self.min_sites, self.on_round = min_sites, on_round

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple[Any, dict]:
        sites = [str(fitres.metrics.get(SITE_KEY, proxy.node_id)) for proxy, fitres in results]
        self.record.add(server_round, sites, {}, len(failures))
        if len(results) < self.min_sites:
            raise FederatedError("min_sites", self.min_sites, f"at most the {len(results)} sites in round "
                                 f"{server_round}'s secure sum", "The global model is kept as it was.")
        mean = parameters_to_ndarrays(results[0][1].parameters)
        summed = {k: np.asarray(m, dtype=np.float64) * len(results) for k, m in zip(self.keys, mean, strict=True)}
        why = check_arrays(summed, self.state)
        if why is not None:
            raise FederatedError("secure sum", why, "finite arrays of the model's shapes")
        self.state = self.optimizer.step(self.state, summed, server_round - 1)
        if self.on_round is not None:
            self.on_round(server_round, self.state)
        return ndarrays_to_parameters([self.state[k] for k in self.keys]), {}
