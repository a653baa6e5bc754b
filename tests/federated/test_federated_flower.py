"""Federated DP on Flower's simulation engine (tiny data, 3 sites): what leaves a site (a message inspector), faults
(a NaN update, an update of the wrong shape, a site lost after its steps), and distributed noise through SecAgg+.

Skipped, with the install command, where Flower is missing; CI installs it (setup.py's `test` extra)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr", reason="Flower is not installed: pip install 'nnunet-dp[federated]' (CI installs it "
                                   "through the test extra)")

from federated_data import CONF, NAME, PLANS, make_sites, preprocess

from nnunet_dp.federated.accounting import federated_report
from nnunet_dp.federated.model import ServerSGD, average_updates
from nnunet_dp.federated.site import Site

SETTINGS = {"target_epsilon": 8.0, "expected_batch_size": 2, "initial_lr": 0.01}
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    root = tmp_path_factory.mktemp("flower")
    pre = preprocess(root)
    site_map = make_sites(root, pre, num_sites=3)
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), *filter(None, [old])])  # ray workers import the mods
    yield root, pre, [Site(n, str(root / "sites" / n)) for n in site_map.sites]
    if old is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old


def _round(msg) -> int:
    task = msg.content.config_records["config"]["task"] if "config" in msg.content.config_records else \
        msg.content.config_records["fitins.config"]["task"]
    return int(json.loads(str(task))["round"])


def inspector(folder: str):
    """A Flower mod that writes down everything a site's reply holds (records, keys, arrays' names and shapes) and
    the update itself (test only, to recompute the server's aggregate)."""
    def mod(msg, context, call_next):
        reply = call_next(msg, context)
        c, pid = reply.content, int(context.node_config["partition-id"])
        arrays = {rk: {k: list(a.numpy().shape) for k, a in rec.items()} for rk, rec in c.array_records.items()}
        entry = {"partition": pid, "array_records": arrays,
                 "metric_records": {k: dict(v) for k, v in c.metric_records.items()},
                 "config_records": {k: sorted(v.keys()) for k, v in c.config_records.items()}}
        with open(os.path.join(folder, "replies.jsonl"), "a") as f:
            f.write(json.dumps(entry) + "\n")
        if "arrays" in c.array_records and "config" in msg.content.config_records:
            np.savez(os.path.join(folder, f"update_r{_round(msg)}_p{pid}.npz"),
                     **{k: a.numpy() for k, a in c.array_records["arrays"].items()})
        return reply
    return mod


def faults(msg, context, call_next):
    """Round 1: site 2 sends a NaN. Round 2: site 1 sends an array of another shape; site 2 runs its steps and is
    lost before it replies."""
    from flwr.app import Array

    pid, r = int(context.node_config["partition-id"]), _round(msg)
    reply = call_next(msg, context)
    arrays = reply.content.array_records["arrays"]
    key = min(arrays.keys())
    if (r, pid) == (1, 2):
        bad = arrays[key].numpy().copy()
        bad.flat[0] = np.nan
        arrays[key] = Array(bad)
    elif (r, pid) == (2, 1):
        arrays[key] = Array(np.zeros((*arrays[key].numpy().shape, 2), np.float32))
    elif (r, pid) == (2, 2):
        raise RuntimeError("site 2 lost after its steps")
    return reply


def _simulate(cfg, sites, mods=(), inner=()):
    from flwr.simulation import run_simulation

    from nnunet_dp.federated.app import make_server_app
    from nnunet_dp.federated.client import make_client_app, simulation_sites

    states = {}
    run_simulation(make_server_app(cfg, on_round=lambda r, s: states.__setitem__(r, s)),
                   make_client_app(simulation_sites(sites), mods=mods, inner_mods=inner), num_supernodes=len(sites),
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0},
                                   "init_args": {"num_cpus": 2, "include_dashboard": False}})
    return states


def _config(root, pre, **kw):
    from nnunet_dp.federated.app import FederationConfig

    return FederationConfig(**{"plans_file": str(pre / f"{PLANS}.json"), "dataset_json": str(pre / "dataset.json"),
                               "configuration": CONF, "output": str(root / "server"), "num_sites": 3, "rounds": 2,
                               "local_steps": 1, "settings": SETTINGS, **kw})


def _fold(site: Site) -> str:
    return os.path.join(site.results, NAME, f"nnUNetTrainerDP__{PLANS}__{CONF}", "fold_all")


def test_local_noise_only_the_update_leaves_and_bad_or_lost_updates_never_reach_the_model(fed, tmp_path):
    _, pre, sites = fed
    cfg = _config(tmp_path, pre)
    states = _simulate(cfg, sites, mods=(faults, inspector(str(tmp_path))))
    from nnunet_dp.federated.app import _start

    global0 = _start(cfg)[3]
    replies = [json.loads(line) for line in (tmp_path / "replies.jsonl").read_text().splitlines()]
    assert len(replies) == 6  # what the sites emit (the fault mod, outside the inspector, then loses one)
    shapes = {k: list(v.shape) for k, v in global0.items()}
    for r in replies:  # only model-shaped arrays, the declared weight and the site's name
        assert r["array_records"] == {"arrays": shapes}
        assert r["metric_records"] == {"metrics": {"weight": 1.0}}
        assert r["config_records"] == {"site": ["name"]}
    record = json.loads((tmp_path / "server" / "federation.json").read_text())
    r1, r2 = record["rounds"]
    assert r1["sites"] == ["site_0", "site_1"] and "not finite" in r1["rejected"]["site_2"]
    assert r2["sites"] == ["site_0"] and "shape" in r2["rejected"]["site_1"] and r2["failures"] == 1
    upd = {(r, p): dict(np.load(tmp_path / f"update_r{r}_p{p}.npz")) for r, p in [(1, 0), (1, 1), (2, 0)]}
    expect1 = average_updates(global0, [(1.0, upd[1, 0]), (1.0, upd[1, 1])])
    assert all(np.array_equal(states[1][k], expect1[k]) for k in global0)
    expect2 = average_updates(states[1], [(1.0, upd[2, 0])])
    assert all(np.array_equal(states[2][k], expect2[k]) and np.isfinite(states[2][k]).all() for k in global0)
    for site in sites:  # every site ran 2 steps, the lost and the rejected ones included
        assert federated_report(record, {site.name: _fold(site)}, delta=1e-5)["sites"][0]["steps"] == 2
    report = federated_report(record, {s.name: _fold(s) for s in sites}, delta=1e-5)
    assert 0 < report["release_epsilon_local_trust"] <= 8.0
    model = tmp_path / "server" / f"nnUNetTrainer__{PLANS}__{CONF}"
    from nnunet_dp.federated.evaluate import held_out_dice

    data = pre / json.loads((pre / f"{PLANS}.json").read_text())["configurations"][CONF]["data_identifier"]
    assert 0.0 <= held_out_dice(str(model), str(data), ["case_000", "case_001"]) <= 1.0  # nnU-Net's predictor loads it


def test_distributed_noise_secagg_sum_equals_the_sites_plain_sum(fed, tmp_path):
    """SecAgg+ in the simulation engine: the server's step uses exactly the sum of the sites' (sum + noise)/B
    vectors (up to SecAgg+'s quantisation), and the masked replies carry no plain array."""
    _, pre, sites = fed
    for s in sites:  # fresh site folders: new journals
        s_root = tmp_path / "sites" / s.name
        s_root.mkdir(parents=True)
        (s_root / "nnUNet_preprocessed").symlink_to(Path(s.folder) / "nnUNet_preprocessed")
    sites = [Site(s.name, str(tmp_path / "sites" / s.name)) for s in sites]
    cfg = _config(tmp_path, pre, mode="distributed", rounds=1, sampling_rate=0.5, normaliser=6.0)
    plain = tmp_path / "plain"
    plain.mkdir()
    states = _simulate(cfg, sites, mods=(inspector(str(tmp_path)),), inner=(_plain_recorder(str(plain)),))
    from nnunet_dp.federated.app import _start

    global0 = _start(cfg)[3]
    record = json.loads((tmp_path / "server" / "federation.json").read_text())
    assert record["rounds"][0]["sites"] == ["site_0", "site_1", "site_2"]
    keys = sorted(global0)
    total = sum(np.load(plain / f"p{p}.npz")["arr"] for p in range(3))
    opt = ServerSGD(lr=record["server_lr"], momentum=0.9, nesterov=True, rounds=1)
    expect = opt.step(global0, dict(zip(keys, _split(total, global0, keys), strict=True)), 0)
    # SecAgg+'s stochastic rounding: < one level (2 x clipping range / 2**22) per site and coordinate, 3 sites, times
    # the server's first step lr (1 + momentum); plus float32 rounding of the weights
    step = 3 * 2 * cfg.secagg_clipping_range / 2**22 * record["server_lr"] * 1.9
    assert all(np.allclose(states[1][k], expect[k], atol=step + 1e-7, rtol=0) for k in keys)
    moved = max(float(np.abs(states[1][k] - global0[k]).max()) for k in keys)
    assert moved > 100 * step  # the step itself is far larger than the tolerance
    masked = [json.loads(line) for line in (tmp_path / "replies.jsonl").read_text().splitlines()]
    assert all(not any(r["array_records"].values()) for r in masked)  # SecAgg+ cleared the plain arrays
    report = federated_report(record, {s.name: _fold(s) for s in sites}, delta=1e-5)
    assert report["release_epsilon_secagg_trust"] < report["release_epsilon_local_trust"]


def _split(flat, ref, keys):
    out, i = [], 0
    for k in keys:
        n = ref[k].size
        out.append(flat[i:i + n].reshape(ref[k].shape))
        i += n
    return out


def _plain_recorder(folder: str):
    """Inside secaggplus_mod: the site's plain (sum + noise)/B vector before it is quantised and masked."""
    def mod(msg, context, call_next):
        from flwr.common import parameters_to_ndarrays
        from flwr.compat.common import recorddict_compat as compat

        reply = call_next(msg, context)
        arrays = parameters_to_ndarrays(compat.recorddict_to_fitres(reply.content, keep_input=True).parameters)
        np.savez(os.path.join(folder, f"p{context.node_config['partition-id']}.npz"),
                 arr=np.concatenate([a.ravel() for a in arrays]))
        return reply
    return mod


def test_cli_app_writes_a_flower_app(fed, tmp_path, monkeypatch):
    root, _, _ = fed
    monkeypatch.setenv("nnUNet_preprocessed", str(root / "pre"))
    from nnunet_dp.commands import federated as cli
    from nnunet_dp.federated.app import FederationConfig

    cli.main(["app", "-d", NAME, "-c", CONF, "-p", PLANS, "--sites", "3", "-o", str(tmp_path / "app")])
    text = (tmp_path / "app" / "pyproject.toml").read_text()
    assert 'serverapp = "nnunet_dp.federated.app:server_app"' in text
    import tomllib

    config = tomllib.loads(text)["tool"]["flwr"]["app"]["config"]
    cfg = FederationConfig.from_run_config(config)
    assert cfg.num_sites == 3 and cfg.settings["target_epsilon"] == 8.0
