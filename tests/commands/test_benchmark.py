"""nnUNetv2_dp_benchmark: the --quick smoke run writes the documented JSON; its steps are nnU-Net's and ours.

No test asserts a timing (CI machines are shared); the fields, the ratio bookkeeping and the step code are checked.
"""
import json
import types

import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_dp import benchmark as core
from nnunet_dp.commands import benchmark as cli
from nnunet_dp.config import DPConfig
from nnunet_dp.nnunet.trainer import nnUNetTrainerDP
from nnunet_dp.tools import bench_methods as bm
from nnunet_dp.tools import benchmark as bench

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def quick_rows(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "quick.json"
    cli.main(["--quick", "--threads", "1", "--json", str(path)])
    with open(path) as f:
        return json.load(f)


def test_quick_json_has_every_method_and_the_documented_fields(quick_rows):
    assert [r["method"] for r in quick_rows] == list(bm.METHODS)
    for r in quick_rows:
        assert set(core.ROW_FIELDS) <= set(r)
        assert r["config"] == "tiny2d" and r["batch_size"] == 4
        assert r["time_s"] > 0 and len(r["times_s"]) == 2, r
        assert r["peak_mem_mb"] is not None and r["peak_mem_mb"] > 0, r
        assert r["time_ratio"] == pytest.approx(r["time_s"] / quick_rows[0]["time_s"], rel=1e-2)
        assert r["mem_ratio"] == pytest.approx(r["peak_mem_mb"] / quick_rows[0]["peak_mem_mb"], rel=1e-2)
        assert r["env_start"]["loadavg"] and r["env_start"]["threads"] == 1
    by = {r["method"]: r for r in quick_rows}
    assert by["nnunet"]["time_ratio"] == 1.0 and by["nnunet"]["mem_ratio"] == 1.0
    assert by["dp-auto"]["strategy"] in ("loop", "bk") and by["dp-bk"]["strategy"] == "bk"
    for m in ("dp-loop", "dp-bk", "dp-auto"):
        assert 0 < by[m]["overhead_share"] < 1
    assert "norms vs loop" in by["dp-bk"]["note"]
    assert "per-case norms" in by["opacus"]["note"]


def test_nnunet_step_is_nnunet_trainers_train_step():
    """The benchmark's nnU-Net step and nnUNetTrainer.train_step (called on the same state) give the same weights."""
    cfg = bm.quick_configs()["tiny2d"]
    batch = bm.make_batch(cfg, 3, CPU)
    ours = bm.nnunet_method(cfg, batch, CPU)
    net, loss = bm.build_network(cfg, seed=0), bm.build_loss(cfg)
    trainer = types.SimpleNamespace(device=CPU, network=net, loss=loss, optimizer=bm.sgd(net), grad_scaler=None)
    for _ in range(2):
        ours.step()
        nnUNetTrainer.train_step(trainer, {"data": batch[0], "target": batch[1]})
    for a, b in zip(ours.model.parameters(), net.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("strategy", ["bk", "auto"])
def test_dp_step_is_dp_trainers_train_step(strategy):
    """The benchmark's DP step and nnUNetTrainerDP.train_step with the same noise seed give the same weights."""
    cfg = bm.quick_configs()["tiny2d"]
    batch = bm.make_batch(cfg, 3, CPU)
    ours = bm.dp_method(cfg, batch, CPU, strategy)
    net = bm.build_network(cfg, seed=0)
    trainer = types.SimpleNamespace(device=CPU, dp_loss=bm.make_case_loss(bm.build_loss(cfg)), optimizer=bm.sgd(net),
                                    dp_config=DPConfig(), local_rank=0, dp_ema=None,
                                    dp_run=bm.dp_run(strategy, 3, CPU), _plain_network=lambda: net,
                                    _autocast=lambda: bm.dp_autocast(CPU))
    ours.step()
    nnUNetTrainerDP.train_step(trainer, {"data": batch[0], "target": batch[1]})
    for a, b in zip(ours.model.parameters(), net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert trainer.dp_run.steps == ours.run.steps == 1


def test_ratios_and_alternation():
    rows = [core.Row("c", "dp-bk", 3.0, 150.0), core.Row("c", core.BASELINE, 2.0, 100.0),
            core.Row("d", "dp-bk", 1.0, None), core.Row("d", core.BASELINE, 0.5, 10.0)]
    core.add_ratios(rows)
    assert (rows[0].time_ratio, rows[0].mem_ratio) == (1.5, 1.5)
    assert (rows[2].time_ratio, rows[2].mem_ratio) == (2.0, None)
    calls = []
    times = core.alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=2, warmup=1,
                           device=CPU)
    assert calls == ["a", "b", "a", "b", "b", "a"]  # warm-up, then the order rotates each round
    assert {k: len(v) for k, v in times.items()} == {"a": 2, "b": 2}
    assert "dp-bk" in core.format_table(rows, "header")


def test_cpu_batch_cap_and_plans_configs():
    configs = bm.load_configs([str(bench.PLANS_DIR / "Dataset902_Hippocampus_nnUNetPlans.json"),
                                str(bench.PLANS_DIR / "large_2d_256.json")])
    assert {"2d", "3d_fullres", "2d_256"} <= set(configs)
    args = cli.parse_args([])
    assert bench.batch_size_for(configs["2d"], CPU, args) == 200_000 // (56 * 40)
    assert bench.batch_size_for(configs["3d_fullres"], CPU, args) == 2
    assert bench.batch_size_for(configs["2d"], torch.device("cuda"), args) == 366


def test_trainable_subsets_freeze_every_methods_network_as_the_dp_trainers_do(tmp_path):
    """--trainable: each method trains exactly the DP trainers' selection (nnU-Net's step included); rows are labelled
    per subset and compared with nnU-Net's step on the same subset."""
    from dataclasses import replace

    from nnunet_dp.nnunet.selection import select_trainable
    cfg = replace(bm.quick_configs()["tiny2d"], trainable="norm_bias")
    batch = bm.make_batch(cfg, 3, CPU)
    plain = bm.build_network(bm.quick_configs()["tiny2d"], seed=0)
    chosen = {id(q) for q in select_trainable(plain, "norm_bias").trained}
    expected = {n for n, p in plain.named_parameters() if id(p) in chosen}
    for method in (bm.nnunet_method(cfg, batch, CPU), bm.dp_method(cfg, batch, CPU, "bk")):
        before = {n: p.detach().clone() for n, p in method.model.named_parameters()}
        method.step()
        changed = {n for n, p in method.model.named_parameters() if not torch.equal(p, before[n])}
        trained = {n for n, p in method.model.named_parameters() if p.requires_grad}
        assert changed <= trained and trained == expected
        assert "decoder.seg_layers.1.weight" in changed  # the (full-resolution) seg head trains under norm_bias
    path = tmp_path / "q.json"
    cli.main(["--quick", "--threads", "1", "--trainable", "all", "norm_bias", "--methods", "nnunet", "dp-bk",
              "--no-memory", "--json", str(path)])
    rows = json.loads(path.read_text())
    assert [(r["config"], r["method"]) for r in rows] == [("tiny2d", "nnunet"), ("tiny2d", "dp-bk"),
                                                          ("tiny2d/norm_bias", "nnunet"), ("tiny2d/norm_bias", "dp-bk")]
    assert rows[3]["time_ratio"] == pytest.approx(rows[3]["time_s"] / rows[2]["time_s"], rel=1e-2)
