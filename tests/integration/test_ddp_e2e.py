"""End to end under nnU-Net's own DDP: `nnUNetv2_train ... -num_gpus 2` with the DP trainer, two CPU ranks on gloo.

tests/integration/ddp_train.py runs nnU-Net's entry point unchanged (run_training_entry -> run_training -> mp.spawn(run_ddp)).
nnU-Net hard-codes NCCL and CUDA on that path, so it patches only the backend (gloo) and the device (cpu): the
process group, torch.cuda.set_device, the trainer's cuda:<rank>, DDP's device_ids and load_pretrained_weights'
map_location (its docstring lists them). One OpenMP thread per rank (OMP_NUM_THREADS=1 whatever pytest's is). The
plans' batch size is set to 1, below the number of ranks: nnU-Net's own batch split refuses that; the DP trainer does
not need it (its batch is Poisson).

The trainer is nnUNetTrainerDP_DDPRecord (tests/ext_trainers/nnunet_dp_ddp_test_trainers.py): the DP trainer plus
records of what each rank sampled and did. The reference for the per-step update is the same trainer in one process
(plain nnUNetv2_train), started from the DDP run's start network and fed, at step t, the cases that all ranks
sampled at step t (their recorded batches, concatenated). Both runs set a seed (reproducible mode), so the one
process draws the noise rank 0 drew: the update agrees only if the noise is added once across the ranks.

Run A: trainable lora, augmentations_per_case 2; nnU-Net's final validation under DDP.
Run B: -pretrained_weights A's checkpoint_final, trainable norm_bias, projection public, ema_decay,
augmentations_per_case 2, morph_in_training close. Rank 1 is SIGKILLed in step 3 (after rank 0 journaled it), then
--c resumes: the crashed step counts, so the target epsilon (calibrated for the planned 6 steps) stops the resumed
run one step early, on both ranks; nnUNetv2_predict predicts from its checkpoint_final.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from e2e import HERE, nnunet_env, prepare, run
from opacus.accountants import RDPAccountant

from nnunet_dp.journal import JOURNAL_FILE

DS = 996
TRAINER = "nnUNetTrainerDP_DDPRecord"
TIMEOUT_S = 480  # backstop: a rank stuck in a collective fails after gloo's timeout (180 s, tests/integration/ddp_train.py)
BASE = {"expected_batch_size": 3, "target_epsilon": 8.0, "augmentations_per_case": 2, "seed": 7}
CFG_A = {**BASE, "num_epochs": 1, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1,
         "trainable": "lora", "lora_rank": 2}
CFG_B = {**BASE, "num_epochs": 3, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 0, "save_every": 1,
         "trainable": "norm_bias", "ema_decay": 0.5, "projection": "public", "projection_dim": 4,
         "projection_samples": 8, "morph_in_training": "close"}


def fold(root, name):
    return root / f"res_{name}" / f"Dataset{DS}_Test{DS}" / f"{TRAINER}__nnUNetPlans__2d" / "fold_0"


def run_bounded(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """cmd in its own process group, all of it killed after TIMEOUT_S (the spawned ranks too)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(cmd)} still ran after {TIMEOUT_S} s (a rank hangs?):\n{err[-4000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def ddp_train(root, name, cfg, *args, **env):
    """nnUNetv2_train DS 2d 0 -num_gpus 2 (tests/integration/ddp_train.py), results in res_<name>, records in rec_<name>."""
    (root / f"rec_{name}").mkdir()
    proc = run_bounded([sys.executable, str(HERE / "integration" / "ddp_train.py"), str(DS), "2d", "0", "-tr", TRAINER, "-num_gpus",
                        "2", "-device", "cuda", *args],
                       nnunet_env(root, cfg, nnUNet_results=str(root / f"res_{name.split('_')[0]}"),
                                  NNUNET_DP_TEST_RECORD=str(root / f"rec_{name}"), OMP_NUM_THREADS="1", **env))
    return proc, root / f"rec_{name}"


def replay(root, name, cfg, *args):
    """The same training in one process on the cases the ranks of run `name` sampled (records in rec_<name>/replay)."""
    rec = root / f"rec_{name}"
    (rec / "replay").mkdir()
    run(["nnUNetv2_train", str(DS), "2d", "0", "-tr", TRAINER, "-device", "cpu", *args],
        nnunet_env(root, cfg, nnUNet_results=str(root / f"res_{name}_replay"), NNUNET_DP_TEST_REPLAY=str(rec),
                   NNUNET_DP_TEST_RECORD=str(rec / "replay")))
    return rec / "replay"


def load(folder, name):
    return torch.load(folder / name, weights_only=False)


def opacus_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    accountant = RDPAccountant()
    accountant.history = [(sigma, q, steps)]
    return accountant.get_epsilon(delta=delta)


def journal_lines(folder) -> tuple[int, int]:
    """(session lines, step lines) of the fold's journal."""
    lines = (folder / JOURNAL_FILE).read_text().splitlines()
    return sum(ln.startswith("{") for ln in lines), sum(ln == "s" for ln in lines)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    prepare(root, dataset_id=DS, shape=(32, 32), configuration="2d", num_train=8, num_test=1)
    plans_file = root / "pre" / f"Dataset{DS}_Test{DS}" / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    plans["configurations"]["2d"]["batch_size"] = 1
    plans_file.write_text(json.dumps(plans))
    return root


@pytest.fixture(scope="module")
def training_keys(root):
    splits = json.loads((root / "pre" / f"Dataset{DS}_Test{DS}" / "splits_final.json").read_text())
    return sorted(splits[0]["train"])


@pytest.fixture(scope="module")
def run_a(root):
    proc, rec = ddp_train(root, "A", CFG_A)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return rec


def check_shards(rec, keys, steps):
    """Disjoint shards covering the training cases, q = E[batch] / N (global), every case from its rank's shard,
    each K = 2 times in a row."""
    shards = [json.loads((rec / f"shard_rank{r}.json").read_text()) for r in (0, 1)]
    assert not set(shards[0]["indices"]) & set(shards[1]["indices"])
    assert sorted(shards[0]["indices"] + shards[1]["indices"]) == keys
    for shard in shards:
        assert shard["world_size"] == 2 and shard["sampling_rate"] == pytest.approx(3 / len(keys), rel=1e-12)
    for t in steps:
        for r in (0, 1):
            got = load(rec, f"step{t:03d}_rank{r}.pt")["keys"]
            assert got[::2] == got[1::2] and set(got) <= set(shards[r]["indices"]), (t, r, got)


def check_steps_against_one_process(rec, steps):
    """Rank 0 alone drew noise; both ranks hold the same weights; one process on the same cases (and the same noise:
    seeded) makes the same update, EMA included."""
    init = [load(rec, f"init_rank{r}.pt") for r in (0, 1)]
    assert init[0].keys() == init[1].keys() and all(torch.equal(init[0][n], init[1][n]) for n in init[0])
    for t in steps:
        ranks = [load(rec, f"step{t:03d}_rank{r}.pt") for r in (0, 1)]
        one = load(rec / "replay", f"step{t:03d}_rank0.pt")
        assert [r["noise_drawn"] for r in ranks] == [True, False] and one["noise_drawn"]
        assert one["keys"] == ranks[0]["keys"] + ranks[1]["keys"]
        assert ranks[0]["trained"].keys() == ranks[1]["trained"].keys() == one["trained"].keys()
        for n, value in ranks[0]["trained"].items():
            assert torch.equal(value, ranks[1]["trained"][n]), (t, n)
            torch.testing.assert_close(value, one["trained"][n], rtol=1e-4, atol=1e-5, msg=f"step {t} {n}")
        update = max((v - init[0][n]).abs().max().item() for n, v in ranks[0]["trained"].items())
        assert update > 1e-3  # the comparison is not vacuous
        if one["ema"] is not None:
            for n, value in ranks[0]["ema"].items():
                torch.testing.assert_close(value, one["ema"][n], rtol=1e-4, atol=1e-5, msg=f"EMA step {t} {n}")


def check_privacy(folder, keys, steps, status):
    rep = json.loads((folder / "privacy.json").read_text())
    q = 3 / len(keys)
    assert rep["num_training_cases"] == len(keys) and rep["sampling_rate"] == pytest.approx(q, rel=1e-12)
    assert rep["steps"] == steps and rep["status"] == status
    assert rep["epsilon"] == pytest.approx(opacus_epsilon(rep["noise_multiplier"], q, steps, rep["delta"]), rel=1e-12)
    assert rep["epsilon"] <= rep["target_epsilon"]
    return rep


def test_lora_and_k2_under_ddp_step_as_one_process(root, run_a, training_keys):
    rec, folder = run_a, fold(root, "A")
    check_shards(rec, training_keys, steps=(1, 2))
    replay(root, "A", CFG_A)
    check_steps_against_one_process(rec, steps=(1, 2))
    assert {n.rsplit(".", 2)[-2] for n in load(rec, "step001_rank0.pt")["trained"]} >= {"lora_a", "lora_b"}
    assert journal_lines(folder) == (1, 2)  # one session and one line per step, not per rank
    rep = check_privacy(folder, training_keys, steps=2, status="finished")
    single = json.loads((fold(root, "A_replay") / "privacy.json").read_text())
    assert (single["epsilon"], single["noise_multiplier"], single["steps"]) == \
        (rep["epsilon"], rep["noise_multiplier"], rep["steps"])
    ends = [json.loads((rec / f"end_rank{r}.json").read_text()) for r in (0, 1)]
    assert ends[0] == ends[1] == {"steps": 2, "status": "finished", "epoch": 1}
    # nnU-Net's final validation: each rank predicted its half of the validation cases, rank 0 scored them
    assert len(list((folder / "validation").glob("*.nii.gz"))) == 2 and (folder / "validation/summary.json").exists()


def test_killed_rank_resumes_with_crashed_step_counted_and_budget_stop(root, run_a, training_keys):
    public = fold(root, "A") / "checkpoint_final.pth"
    folder = fold(root, "B")
    crashed, rec = ddp_train(root, "B", CFG_B, "-pretrained_weights", str(public), NNUNET_DP_TEST_KILL_RANK="1:3",
                             NNUNET_DP_TEST_SKIP_VALIDATION="1")
    assert crashed.returncode != 0, crashed.stderr[-4000:]
    assert journal_lines(folder) == (1, 3)  # rank 0 journaled step 3 before its all-reduce waited for rank 1
    latest = torch.load(folder / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    assert latest["dp_state"]["ledger"]["history"][0][2] == 2
    # projection public: rank 1 would compute another subspace (another public seed), yet uses rank 0's
    bases = [load(rec, f"projection_rank{r}.pt") for r in (0, 1)]
    assert bases[0].shape[1] == 4 and torch.equal(bases[0], bases[1])
    check_shards(rec, training_keys, steps=(1, 2))
    one = replay(root, "B", CFG_B, "-pretrained_weights", str(public))
    # one process computes the same subspace (cosines of the principal angles; the replay then uses rank 0's basis)
    cosines = torch.linalg.svdvals(load(one, "projection_rank0.pt").double().T @ bases[0].double())
    assert cosines.min() > 0.99, cosines
    check_steps_against_one_process(rec, steps=(1, 2))

    resumed, rec = ddp_train(root, "B_resumed", CFG_B, "--c", NNUNET_DP_TEST_SKIP_VALIDATION="1")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    ends = [json.loads((rec / f"end_rank{r}.json").read_text()) for r in (0, 1)]
    assert ends[0] == ends[1] == {"steps": 6, "status": "stopped: privacy budget spent", "epoch": 3}
    assert sorted(p.name for p in rec.glob("step*_rank0.pt")) == [f"step00{t}_rank0.pt" for t in (4, 5, 6)]
    assert journal_lines(folder) == (2, 6)
    check_privacy(folder, training_keys, steps=6, status="stopped: privacy budget spent")
    log = "\n".join(p.read_text() for p in folder.glob("training_log_*.txt"))
    assert "DP: 1 steps ran after the checkpoint this run resumes from (a crash)" in log

    out = root / "pred_B"
    run(["nnUNetv2_predict", "-i", str(root / "raw" / f"Dataset{DS}_Test{DS}" / "imagesTs"), "-o", str(out),
         "-d", str(DS), "-c", "2d", "-f", "0", "-tr", TRAINER, "-device", "cpu", "-npp", "1", "-nps", "1"],
        nnunet_env(root, nnUNet_results=str(root / "res_B")))
    assert len(list(out.glob("*.nii.gz"))) == 1
