"""Helpers for end-to-end tests: a tiny synthetic nnU-Net dataset, planned and preprocessed once per session."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from nnunet_dp.locations import trainer_folder
from nnunet_dp.synthetic import make_dataset

HERE = Path(__file__).parent
BIN = Path(sys.executable).parent


def nnunet_env(root: Path, dp_config: dict | None = None, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "pre"), nnUNet_results=str(root / "res"),
               nnUNet_extTrainer=os.pathsep.join([trainer_folder(), str(HERE / "ext_trainers")]),
               nnUNet_n_proc_DA="0", nnUNet_def_n_proc="1", nnUNet_compile="f",
               OMP_NUM_THREADS=os.environ["OMP_NUM_THREADS"])  # 1 under pytest-xdist: conftest.py
    if dp_config is not None:
        path = root / f"dp_{abs(hash(json.dumps(dp_config, sort_keys=True)))}.json"
        path.write_text(json.dumps(dp_config))
        env["nnUNet_dp_config"] = str(path)
    env.update(extra)
    return env


def run(cmd: list[str], env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    exe = str(BIN / cmd[0]) if (BIN / cmd[0]).exists() else cmd[0]
    proc = subprocess.run([exe, *cmd[1:]], check=False, env=env, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def prepare(root: Path, *, dataset_id: int, shape: tuple[int, ...], configuration: str, num_train: int = 12,
            num_test: int = 2) -> None:
    make_dataset(str(root / "raw"), dataset_id=dataset_id, name=f"Test{dataset_id}", num_train=num_train,
                 num_test=num_test, shape=shape, seed=dataset_id)
    run(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", configuration, "-np", "2"],
        nnunet_env(root, nnUNet_n_proc_DA="1"))
