"""Real local deployment (opt-in, ~2 minutes on 2 cores; NNUNET_DP_DEPLOY_TEST=1): one SuperLink, one SuperNode per
site beside its own folder, `flwr run` of the app `nnUNetv2_dp_federated app` writes: the commands of
docs/federated.md. Processes are started in their own process groups and stopped by those ids."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="Flower is not installed: pip install 'nnunet-dp[federated]'")
if not os.environ.get("NNUNET_DP_DEPLOY_TEST"):
    pytest.skip("local deployment test: set NNUNET_DP_DEPLOY_TEST=1 (starts a SuperLink on 127.0.0.1:8000)",
                allow_module_level=True)

from federated_data import NAME, make_sites, preprocess

BIN = Path(sys.executable).parent


def _start(cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def test_flwr_run_against_a_superlink_with_one_supernode_per_site(tmp_path):
    pre = preprocess(tmp_path)
    make_sites(tmp_path, pre, num_sites=2)
    env = {**os.environ, "nnUNet_preprocessed": str(tmp_path / "pre"), "FLWR_HOME": str(tmp_path / "flwr")}
    (tmp_path / "flwr").mkdir()
    (tmp_path / "flwr" / "config.toml").write_text('[superlink]\ndefault = "local-deployment"\n\n'
                                                   '[superlink.local-deployment]\naddress = "127.0.0.1:8000"\n'
                                                   'insecure = true\n')
    subprocess.run([str(BIN / "nnUNetv2_dp_federated"), "app", "-d", NAME, "-c", "2d", "--sites", "2", "--rounds",
                    "2", "--local-steps", "1", "--expected-batch-size", "2", "-o", str(tmp_path / "app")], env=env,
                   check=True)
    procs = [_start([str(BIN / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
                     "--database", str(tmp_path / "flwr" / "state.db")], tmp_path / "superlink.log", env)]
    try:
        time.sleep(6)
        for k in range(2):
            site = tmp_path / "sites" / f"site_{k}"
            procs.append(_start([str(BIN / "flower-supernode"), "--insecure", "--superlink", "127.0.0.1:8000",
                                 "--port", str(9094 + k), "--node-config",
                                 f"site-name='site_{k}' site-folder='{site}'"], tmp_path / f"node{k}.log", env))
        time.sleep(6)
        run = subprocess.run([str(BIN / "flwr"), "run", str(tmp_path / "app"), "local-deployment", "--stream"],
                             env=env, capture_output=True, text=True, timeout=600, check=False)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        time.sleep(2)
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
    record = json.loads((tmp_path / "app" / "server" / "federation.json").read_text())
    assert [r["sites"] for r in record["rounds"]] == [["site_0", "site_1"], ["site_0", "site_1"]]
    assert (tmp_path / "app" / "server" / "nnUNetTrainer__nnUNetPlans_dp__2d" / "fold_all" /
            "checkpoint_final.pth").is_file()
