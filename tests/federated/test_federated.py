"""Federated DP without Flower's engine: splitting, the site round on the DP trainer (journal across rounds, fresh
noise, a site killed mid-round), the accounting (per-site epsilon, release = max, distributed noise in closed form) and
the one-run audit with canaries at one site. The Flower parts are in test_federated_flower.py."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from federated_data import CONF, make_sites, plans, preprocess
from scipy import stats

from nnunet_dp.accounting import epsilon_for, epsilon_of
from nnunet_dp.federated import FederatedError
from nnunet_dp.federated.accounting import distributed_history, federated_report, site_history, sum_noise_std
from nnunet_dp.federated.audit import run_federated_audit
from nnunet_dp.federated.model import average_updates, check_arrays
from nnunet_dp.federated.site import RoundTask, Site, effective_settings, run_round
from nnunet_dp.federated.split import materialise_site, read_site_map, split_sites
from nnunet_dp.journal import read_history, session_modes
from nnunet_dp.run import DPPlan, DPRun

SETTINGS = {"target_epsilon": 8.0, "expected_batch_size": 2, "initial_lr": 0.01}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("fed")
    pre = preprocess(root)
    site_map = make_sites(root, pre, num_sites=2)
    return root, pre, site_map


def _global(pre: Path) -> dict[str, np.ndarray]:
    from nnunet_dp.config import DPConfig
    from nnunet_dp.federated.model import build_network, state_of

    dataset_json = json.loads((pre / "dataset.json").read_text())
    return state_of(build_network(plans(pre), dataset_json, CONF, DPConfig(**SETTINGS)))


def _task(pre: Path, **kw) -> RoundTask:
    return RoundTask(**{"round": 1, "rounds": 3, "local_steps": 2, "mode": "local", "plans": plans(pre),
                        "configuration": CONF, "settings": SETTINGS, **kw})


def _fold(site: Site, pre: Path) -> str:
    return os.path.join(site.results, pre.name, f"nnUNetTrainerDP__nnUNetPlans_dp__{CONF}", "fold_all")


# ---------------------------------------------------------------- splitting

def test_split_is_seeded_disjoint_and_order_free():
    cases = [f"c{i:02d}" for i in range(20)]
    a = split_sites(cases, num_sites=3, test_fraction=0.2, seed=4)
    b = split_sites(list(reversed(cases)), num_sites=3, test_fraction=0.2, seed=4)
    assert a == b and len(a.test) == 4
    parts = [set(v) for v in a.sites.values()] + [set(a.test)]
    assert sum(map(len, parts)) == 20 and set().union(*parts) == set(cases)
    assert sorted(len(v) for v in a.sites.values()) == [5, 5, 6]
    assert split_sites(cases, num_sites=3, test_fraction=0.2, seed=5) != a
    with pytest.raises(FederatedError, match="'--sites'"):
        split_sites(cases[:5], num_sites=3, test_fraction=0.2, seed=0)


def test_site_map_refuses_a_patient_at_two_sites(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"sites": {"A": ["c1", "c2"], "B": ["c2", "c3"]}, "test": []}))
    with pytest.raises(FederatedError, match="one site only"):
        read_site_map(str(path), ["c1", "c2", "c3"])
    path.write_text(json.dumps({"sites": {"A": ["c1", "c2"], "B": ["c3", "c4"]}, "test": ["c5"]}))
    assert read_site_map(str(path), ["c1", "c2", "c3", "c4", "c5"]).test == ["c5"]


# ---------------------------------------------------------------- aggregation and the settings a site may change

def test_average_is_uniform_and_leaves_out_nothing_silently():
    g = {"a": np.zeros(3, np.float32)}
    new = average_updates(g, [(1.0, {"a": np.ones(3)}), (1.0, {"a": 3 * np.ones(3)})])
    assert np.allclose(new["a"], 2.0)
    assert np.allclose(average_updates(g, [(3.0, {"a": np.ones(3)}), (1.0, {"a": 5 * np.ones(3)})])["a"], 2.0)
    assert np.array_equal(average_updates(g, [])["a"], g["a"])
    assert "not finite" in check_arrays({"a": np.array([0, np.nan, 0])}, g)
    assert "shape" in check_arrays({"a": np.zeros(4)}, g)
    assert "names" in check_arrays({"b": np.zeros(3)}, g)


def test_sites_cannot_change_the_shared_network_and_distributed_noise_is_sigma_over_sqrt_k(tiny):
    _, pre, _ = tiny
    site = Site("A", "/nowhere", settings={"group_norm_groups": 2})
    with pytest.raises(FederatedError, match="group_norm_groups"):
        effective_settings(site, _task(pre))
    with pytest.raises(FederatedError, match="'trainable'"):
        effective_settings(Site("A", "/x", settings={"trainable": "lora"}), _task(pre))
    mine = effective_settings(Site("A", "/x", settings={"target_epsilon": 2.0}), _task(pre))
    assert mine["target_epsilon"] == 2.0 and mine["num_epochs"] == 3 and mine["num_iterations_per_epoch"] == 2
    dist = effective_settings(Site("A", "/x"), _task(pre, mode="distributed", local_steps=1, num_sites=4,
                                                     central_noise_multiplier=2.0, sampling_rate=0.25))
    assert dist["noise_multiplier"] == pytest.approx(1.0) and dist["target_epsilon"] is None


# ---------------------------------------------------------------- the site's rounds

def test_site_rounds_continue_one_ledger_with_fresh_noise_and_stop_at_the_budget(tiny):
    root, pre, _ = tiny
    site = Site("site_0", str(root / "sites" / "site_0"))
    g = _global(pre)
    infos, updates = [], []
    for r in (1, 2, 3):
        update, info = run_round(site, _task(pre, round=r), g)
        infos.append(info)
        updates.append(update)
    fold = _fold(site, pre)
    history = read_history(os.path.join(fold, "dp_journal.txt"))
    assert sum(n for _, _, n in history) == 6 == infos[-1]["total_steps"]
    assert session_modes(os.path.join(fold, "dp_journal.txt")) == [True, True, True]  # three fresh-entropy sessions
    privacy = json.loads(Path(fold, "privacy.json").read_text())
    assert privacy["steps"] == 6 and privacy["epsilon"] <= 8.0 + 1e-9
    assert privacy["epsilon"] == pytest.approx(epsilon_of(history, delta=1e-5))
    assert check_arrays(updates[0], g) is None and not np.allclose(updates[0]["decoder.seg_layers.0.weight"],
                                                                   updates[1]["decoder.seg_layers.0.weight"])
    with pytest.raises(FederatedError, match="target epsilon is spent"):  # 6 planned steps are all spent
        run_round(site, _task(pre, round=4, rounds=3), g)


def test_a_site_killed_mid_round_counts_its_steps_and_rejoins_with_fresh_noise(tiny, tmp_path):
    """SIGKILL while a round runs: the journal already holds every step whose noise was drawn; the rejoining
    site's next round starts a new session (fresh OS entropy) and its ledger continues from all of them."""
    root, pre, _ = tiny
    site = Site("site_1", str(root / "sites" / "site_1"))
    g = _global(pre)
    np.savez(tmp_path / "g.npz", **g)
    code = (f"import sys, numpy as np; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
            "from test_federated import _task; from nnunet_dp.federated.site import Site, run_round\n"
            "from pathlib import Path\n"
            f"g = dict(np.load({str(tmp_path / 'g.npz')!r}))\n"
            f"run_round(Site('site_1', {site.folder!r}), _task(Path({str(pre)!r}), local_steps=400, rounds=1), g)\n")
    journal = os.path.join(_fold(site, pre), "dp_journal.txt")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and sum(n for *_, n in read_history(journal)) < 3:
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    ran = sum(n for *_, n in read_history(journal))
    assert ran >= 3, "the killed round never started"
    _, info = run_round(site, _task(pre, local_steps=2, rounds=400), g)
    history = read_history(journal)
    assert info["total_steps"] == sum(n for *_, n in history) >= ran + 2
    assert session_modes(journal) == [True, True]
    assert info["epsilon"] == pytest.approx(epsilon_of(history, delta=1e-5))  # the killed steps are in epsilon
    assert site_history(_fold(site, pre)) == history


# ---------------------------------------------------------------- accounting

def test_release_epsilon_is_the_max_over_sites_and_says_two_sites_are_not_covered(tiny):
    root, pre, _ = tiny
    folders = {"site_0": _fold(Site("s", str(root / "sites" / "site_0")), pre)}
    report = federated_report({"mode": "local"}, folders, delta=1e-5)
    assert report["release_epsilon_local_trust"] == max(r["epsilon_local_trust"] for r in report["sites"])
    assert "two sites" in report["privacy_unit"] and "NOT covered" in report["privacy_unit"]
    assert any("not covered" in a for a in report["assumptions"])


def test_distributed_noise_sum_has_central_variance_in_closed_form():
    """K sites, each DPRun.private_step with sigma/sqrt(K) on an empty batch (noise only), scaled by qN_k / B and
    summed: per-coordinate variance sigma^2 C^2 / B^2, central DP's on the pooled sum (chi-square 99.9% interval)."""
    sigma, clip, k, b, d = 1.3, 0.7, 3, 5.0, 40_000
    total = torch.zeros(d, dtype=torch.float64)
    for n_k in (7, 11, 20):
        plan = DPPlan(rule="flat", rule_constant=None, clip_norm=clip, noise_multiplier=sigma / math.sqrt(k),
                      sampling_rate=0.2, num_training_cases=n_k, planned_steps=1, max_steps=None,
                      target_epsilon=None, delta=1e-5, accountant="rdp")
        run = DPRun(plan, device=torch.device("cpu"), seed=None, strategy="loop")
        model = torch.nn.Linear(d, 1, bias=False).double()
        run.private_step(model, lambda out, t: out.sum(), None, None)
        total += model.weight.grad.flatten() * plan.expected_batch_size / b
    expected = sum_noise_std(noise_multiplier=sigma, clip_norm=clip, num_sites=k, normaliser=b)
    assert expected == pytest.approx(sigma * clip / b)
    var = float(total.var())
    lo, hi = stats.chi2.ppf([0.0005, 0.9995], d - 1) / (d - 1)
    assert lo * expected**2 < var < hi * expected**2


def test_distributed_accounting_per_round():
    history = [(0.5, 0.1, 5)]
    rounds = {1: 1, 2: 1, 3: 1, 4: 1}  # round 5's step never finished: no round record
    in_sum = {1: 4, 2: 4, 3: 3}  # round 4's share reached no released sum
    dist = distributed_history(history, rounds, in_sum, colluding=1)
    assert dist == [(0.5 * math.sqrt(3), 0.1, 1), (0.5 * math.sqrt(3), 0.1, 1), (0.5 * math.sqrt(2), 0.1, 1),
                    (0.5, 0.1, 2)]
    assert epsilon_of(dist, delta=1e-5) < epsilon_of(history, delta=1e-5)


# ---------------------------------------------------------------- one-run audit with canaries at one site

@pytest.mark.parametrize(("view", "sigma"), [("site", 1.5), ("sum", 1.5 / math.sqrt(3))])
def test_one_run_audit_at_one_site_stays_below_its_epsilon(view, sigma):
    result = run_federated_audit(num_sites=3, site_noise_multiplier=sigma, sampling_rate=0.05, rounds=80, view=view,
                                 seed=0)
    claim = result["epsilon_local_trust"] if view == "site" else result["epsilon_secagg_trust"]
    assert claim == pytest.approx(epsilon_for(noise_multiplier=1.5, sampling_rate=0.05, steps=80, delta=1e-5))
    assert result["epsilon_lower_bound"] <= claim


def test_one_run_audit_catches_a_site_adding_a_tenth_of_its_noise(monkeypatch):
    from nnunet_dp import step as step_mod

    original = step_mod.add_gaussian_noise_
    monkeypatch.setattr(step_mod, "add_gaussian_noise_",
                        lambda tensors, *, std, generator: original(tensors, std=0.1 * std, generator=generator))
    result = run_federated_audit(num_sites=3, site_noise_multiplier=1.5, sampling_rate=0.05, rounds=80, seed=0)
    assert result["epsilon_lower_bound"] > result["epsilon_local_trust"]


def test_importing_nnunet_dp_needs_no_flower():
    code = ("import sys; sys.modules['flwr'] = None\n"
            "import nnunet_dp, nnunet_dp.federated.site, nnunet_dp.federated.accounting, nnunet_dp.federated.split\n"
            "from nnunet_dp.federated import require_flwr\n"
            "try:\n    require_flwr()\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "nnunet-dp[federated]" in out



def test_a_site_refuses_plans_other_than_its_data_were_made_with(tiny):
    root, pre, _ = tiny
    other = plans(pre)
    other["configurations"][CONF]["patch_size"] = [16, 16]
    with pytest.raises(FederatedError, match="'plans'"):
        run_round(Site("site_0", str(root / "sites" / "site_0")), replace(_task(pre), plans=other), _global(pre))


def test_report_command_writes_the_sites_epsilons(tiny, tmp_path):
    from nnunet_dp.commands import federated as cli

    _, pre, site_map = tiny
    identifier = plans(pre)["configurations"][CONF]["data_identifier"]
    materialise_site(str(pre), str(tmp_path / "site_r"), site_map.sites["site_0"], data_identifier=identifier,
                     plans_name="nnUNetPlans_dp")
    site = Site("site_r", str(tmp_path / "site_r"))
    run_round(site, _task(pre, local_steps=1), _global(pre))
    fold = _fold(site, pre)
    (tmp_path / "federation.json").write_text(json.dumps({"mode": "local", "rounds": []}))
    cli.main(["report", "--federation", str(tmp_path / "federation.json"), "--site", f"site_0={fold}",
              "-o", str(tmp_path)])
    report = json.loads((tmp_path / "federated_privacy.json").read_text())
    assert report["sites"][0]["epsilon_local_trust"] == pytest.approx(
        json.loads(Path(fold, "privacy.json").read_text())["epsilon"])


def test_the_non_private_arms_train_with_the_given_lr(tmp_path):
    """--nonprivate-lr reaches the non-private pooled arm (and the public pretraining): the default 0.1 is the
    harness's `tiny` non-private lr; the DP arms keep the DP lr rule (no initial_lr of theirs)."""
    from nnunet_dp.commands.federated import build_parser
    from nnunet_dp.federated.command import experiment_of
    from nnunet_dp.federated.simulate import _jobs

    site_map = split_sites([f"c{i:02d}" for i in range(20)], num_sites=2, test_fraction=0.2, seed=0)
    for extra, lr in (([], 0.1), (["--nonprivate-lr", "0.03"], 0.03)):
        args = build_parser().parse_args(["simulate", "-d", "1", "-o", str(tmp_path), *extra])
        jobs = dict(_jobs(experiment_of(args, str(tmp_path), site_map)))
        assert jobs["nonprivate_pooled"][2]["initial_lr"] == lr
        assert "initial_lr" not in jobs["central_dp_pooled"][2] and jobs["alone_site_0"][2] == {}
