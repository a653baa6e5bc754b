"""Trainer pieces without a training: DDP oversampling, the dropped-case stop, where settings come from."""
import json
from types import SimpleNamespace

import pytest
from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as nnunet_trainer_module

from nnunet_dp.config import DPConfig
from nnunet_dp.errors import DPDivergedError
from nnunet_dp.nnunet.resume import check_dropped, load_dp_config
from nnunet_dp.nnunet.trainer import nnUNetTrainerDP


def test_ddp_keeps_the_configured_per_case_oversampling(monkeypatch):
    """nnU-Net recomputes oversampling per rank from its fixed batch split; under DP each case decides for itself."""
    monkeypatch.setattr(nnunet_trainer_module.dist, "get_world_size", lambda: 4)
    monkeypatch.setattr(nnunet_trainer_module.dist, "get_rank", lambda: 3)
    plain = nnunet_trainer_module.nnUNetTrainer.__new__(nnunet_trainer_module.nnUNetTrainer)
    dp = nnUNetTrainerDP.__new__(nnUNetTrainerDP)
    for t in (plain, dp):
        t.is_ddp, t.configuration_manager, t.oversample_foreground_percent = True, SimpleNamespace(batch_size=8), 0.33
    dp.dp_config = DPConfig(oversample_foreground_percent=0.33)
    plain._set_batch_size_and_oversample()
    dp._set_batch_size_and_oversample()
    assert plain.oversample_foreground_percent != pytest.approx(0.33)  # what nnU-Net does to the last rank
    assert dp.oversample_foreground_percent == pytest.approx(0.33) and dp.batch_size == plain.batch_size == 2


def test_most_cases_dropped_stops_with_a_clear_error():
    check_dropped(0, 0, 3)
    check_dropped(2, 2, 3)  # fewer than 3: not yet
    check_dropped(5, 10, 3)  # half: not most
    with pytest.raises(DPDivergedError, match=r"6 of the 10 cases sampled in epoch 3 .*NaN/inf"):
        check_dropped(6, 10, 3)


def test_settings_from_env_else_the_fold_folder_else_defaults(tmp_path, monkeypatch):
    monkeypatch.delenv("nnUNet_dp_config", raising=False)
    cfg, source = load_dp_config(str(tmp_path), {"target_epsilon": 1.0})
    assert cfg.target_epsilon == 1.0 and "defaults" in source
    saved = {"trainer": "nnUNetTrainerDP", "rule": "flat", **DPConfig(clip_norm=0.3, seed=7).release_dict()}
    (tmp_path / "dp_config.json").write_text(json.dumps(saved))
    cfg, source = load_dp_config(str(tmp_path), {})
    assert cfg.clip_norm == 0.3 and cfg.seed is None and "dp_config.json" in source
    env = tmp_path / "env.json"
    env.write_text(json.dumps({"clip_norm": 0.7}))
    monkeypatch.setenv("nnUNet_dp_config", str(env))
    cfg, source = load_dp_config(str(tmp_path), {})
    assert cfg.clip_norm == 0.7 and source == str(env)
