"""The site side on Flower: a ClientApp whose train() runs nnunet_dp.federated.site.run_round.

Which site a SuperNode is: its node config (`flower-supernode --node-config "site-name='A' site-folder='/data/A'"`,
optionally dp-config='/path/settings.json', declared-cases=N, device='cuda'); in the simulation engine the
partition-id picks one of the sites the simulation was given. The reply holds only the update (ArrayRecord), the
site's declared name and its aggregation weight. In distributed mode the reply goes through Flower's secaggplus_mod,
which quantises and masks it; the site first refuses an update that is not finite or would be clipped by SecAgg+.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from nnunet_dp.federated import FederatedError
from nnunet_dp.federated.model import check_arrays
from nnunet_dp.federated.server import SITE_KEY, TASK_KEY, WEIGHT_KEY, from_record, to_record
from nnunet_dp.federated.site import RoundTask, Site, run_round

SiteResolver = Callable[[Context], Site]


def site_from_node_config(context: Context) -> Site:
    """A deployed SuperNode's site, from its --node-config; under `flwr run` in the simulation runtime (node config
    partition-id only) site_<id> in the run config's sites-root (the folders `nnUNetv2_dp_federated split` writes)."""
    cfg = context.node_config
    root = context.run_config.get("sites-root")
    if "site-folder" not in cfg and "partition-id" in cfg and root:
        name = f"site_{int(cfg['partition-id'])}"
        return Site(name=name, folder=os.path.join(str(root), name))
    if "site-folder" not in cfg or "site-name" not in cfg:
        raise FederatedError("node config", dict(cfg), "site-name and site-folder (flower-supernode --node-config "
                             "\"site-name='A' site-folder='/data/A'\")")
    settings: dict[str, Any] = {}
    if cfg.get("dp-config"):
        with open(str(cfg["dp-config"])) as f:
            settings = json.load(f)
    declared = cfg.get("declared-cases")
    return Site(name=str(cfg["site-name"]), folder=str(cfg["site-folder"]), settings=settings,
                declared_cases=int(declared) if declared else None, device=str(cfg.get("device", "cpu")))


def simulation_sites(sites: Sequence[Site]) -> SiteResolver:
    """In Flower's simulation engine: partition-id i is sites[i]."""
    def resolve(context: Context) -> Site:
        return sites[int(context.node_config["partition-id"])]
    return resolve


def _task(raw: str) -> RoundTask:
    return RoundTask(**{k: v for k, v in json.loads(raw).items() if k in RoundTask.__dataclass_fields__})


def _local(msg: Message, site: Site) -> Message:
    task = _task(str(msg.content.config_records["config"][TASK_KEY]))
    update, _ = run_round(site, task, from_record(msg.content.array_records["arrays"]))
    weight = float(site.declared_cases) if site.declared_cases else 1.0
    content = RecordDict({"arrays": to_record(update), "metrics": MetricRecord({WEIGHT_KEY: weight}),
                          SITE_KEY: ConfigRecord({"name": site.name})})
    return Message(content, reply_to=msg)


def _distributed(msg: Message, site: Site) -> Message:
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    raw = json.loads(str(fitins.config[TASK_KEY]))
    keys, clip = raw["keys"], float(raw["secagg_clipping_range"])
    start = dict(zip(keys, parameters_to_ndarrays(fitins.parameters), strict=True))
    update, _ = run_round(site, _task(json.dumps(raw)), start)
    why = check_arrays(update, start)
    if why is None and max(float(np.abs(v).max(initial=0)) for v in update.values()) > clip:
        why = f"a value beyond SecAgg+'s clipping range {clip} (raise --secagg-clip)"
    if why is not None:
        raise FederatedError("update", why, "a finite update inside the clipping range", "Not sent.")
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([update[k] for k in keys]), 1, {SITE_KEY: site.name})
    return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)


def secagg_when_asked(msg: Message, context: Context, call_next: Callable) -> Message:
    """Flower's secaggplus_mod for messages of the SecAgg+ workflow; plain messages go straight to train()."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def make_client_app(resolve: SiteResolver = site_from_node_config, mods: Sequence[Callable] = (),
                    inner_mods: Sequence[Callable] = ()) -> ClientApp:
    """The sites' ClientApp. `mods`: extra Flower mods around it (outermost first; they see what leaves the site),
    `inner_mods`: inside SecAgg+ (they see the plain reply before it is masked), e.g. message inspectors in tests."""
    app = ClientApp(mods=[*mods, secagg_when_asked, *inner_mods])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        site = resolve(context)
        legacy = "config" not in msg.content.config_records
        return _distributed(msg, site) if legacy else _local(msg, site)

    return app
