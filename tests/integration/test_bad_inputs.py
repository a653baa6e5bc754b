"""Bad-input sweep: each bad input to a command stops with a message that names the setting, file or value, and
leaves nothing a later run would take for a good result (privacy.json, dp_config.json, postprocessing.pkl,
summary.json, results.csv: absent, or unchanged when an earlier good run wrote them).

One tiny 2D dataset is planned and preprocessed, and a DP fold folder made from it, once and in this process (module
fixture); the commands run in-process through their main() or the trainer hooks nnUNetv2_train calls, except `--val`,
which runs nnUNetv2_train as a user does.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import types
from dataclasses import dataclass
from multiprocessing.pool import ThreadPool
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from e2e import run

from nnunet_dp.config import ENV_VAR, DPConfig
from nnunet_dp.errors import DPConfigError
from nnunet_dp.locations import trainer_folder
from nnunet_dp.nnunet.report import write_privacy
from nnunet_dp.synthetic import make_dataset

DS, NAME = 981, "Dataset981_BadInputs"
TRAINER_DIR = "nnUNetTrainerDP__nnUNetPlans__2d"
# a valid run: sigma given (no calibration), q = 3/6 on the 6 training cases of fold 0
GOOD = {"target_epsilon": None, "noise_multiplier": 1.0, "expected_batch_size": 3, "num_epochs": 1,
        "num_iterations_per_epoch": 1, "num_val_iterations_per_epoch": 0}
OUTPUTS = ("privacy.json", "dp_config.json", "checkpoint_final.pth", "checkpoint_latest.pth")


@dataclass(frozen=True)
class Tiny:
    root: Path
    raw: Path
    pre: Path  # $nnUNet_preprocessed/Dataset981_BadInputs
    trained: Path  # an nnUNet_results folder whose nnUNetTrainerDP fold 0 started and finished (GOOD, no step)
    ckpt: Path  # its checkpoint_final.pth
    other_plans_ckpt: Path  # the same from a wider network (other plans)
    nnunet_ckpt: Path  # what nnU-Net's own nnUNetTrainer writes: no DP state, no DP settings
    truncated_ckpt: Path  # the first half of `ckpt`


def _environment(root: Path) -> dict[str, str]:
    return {"nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "pre"),
            "nnUNet_results": str(root / "res"), "nnUNet_extTrainer": trainer_folder(), "nnUNet_compile": "f",
            "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1", "OMP_NUM_THREADS": "1"}


def _preprocess(mp: pytest.MonkeyPatch, dataset_id: int) -> None:
    """nnU-Net's fingerprint, planning and preprocessing, in this process: nnU-Net's spawn pools start a Python per
    worker that imports torch and nnU-Net again (tens of seconds on 2 busy cores); a thread pool runs the same
    functions. The planner sets torch's thread count from nnUNet_n_proc_DA, so that is 1 while it runs."""
    from nnunetv2.experiment_planning import plan_and_preprocess_api as api
    from nnunetv2.experiment_planning.dataset_fingerprint import fingerprint_extractor
    from nnunetv2.preprocessing.preprocessors import default_preprocessor

    threads = types.SimpleNamespace(get_context=lambda *_: types.SimpleNamespace(Pool=ThreadPool))
    for module in (fingerprint_extractor, default_preprocessor):
        mp.setattr(module, "multiprocessing", threads)
    mp.setenv("nnUNet_n_proc_DA", "1")
    api.extract_fingerprints([dataset_id], num_processes=1)
    api.plan_experiments([dataset_id])
    api.preprocess([dataset_id], configurations=("2d",), num_processes=(1,))
    mp.setenv("nnUNet_n_proc_DA", "0")


def _write_settings(folder: Path, settings: dict) -> Path:
    path = folder / f"dp_{abs(hash(json.dumps(settings, sort_keys=True)))}.json"
    path.write_text(json.dumps(settings))
    return path


def make_trainer(pre: Path, mp: pytest.MonkeyPatch, settings: dict, *, cls=None, plans_edit=None):
    """A DP trainer as nnUNetv2_train builds it (plans and dataset.json of the preprocessed folder, fold 0, CPU), with
    these settings in the nnUNet_dp_config file."""
    from nnunet_dp.nnunet.trainer import nnUNetTrainerDP

    mp.setenv(ENV_VAR, str(_write_settings(pre.parent.parent, settings)))
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    if plans_edit is not None:
        plans_edit(plans)
    plans["continue_training"] = False
    dataset_json = json.loads((pre / "dataset.json").read_text())
    return (cls or nnUNetTrainerDP)(plans, "2d", 0, dataset_json, device=torch.device("cpu"))


def _wider(plans: dict) -> None:
    plans["configurations"]["2d"]["architecture"]["arch_kwargs"]["features_per_stage"] = [16, 32, 64, 128]


def _save_checkpoint(trainer, path: Path) -> None:
    trainer.initialize()
    trainer._dp_setup()
    trainer.save_checkpoint(str(path))


def _train_without_steps(pre: Path, mp: pytest.MonkeyPatch, results: Path) -> Path:
    """What nnUNetv2_train leaves in a fold folder (dp_config.json, privacy.json, plans, checkpoint_final.pth), with
    the trainer's own hooks and no step: training steps cost time and add nothing to these checks."""
    mp.setenv("nnUNet_results", str(results))
    trainer = make_trainer(pre, mp, GOOD)
    trainer.on_train_start()
    trainer.save_checkpoint(str(Path(trainer.output_folder) / "checkpoint_final.pth"))
    journal = getattr(trainer.dp_run, "journal", None)
    if journal is not None:
        journal.close()
    return Path(trainer.output_folder) / "checkpoint_final.pth"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
    root = tmp_path_factory.mktemp("bad_inputs")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in _environment(root).items():
            mp.setenv(key, value)
        mp.delenv(ENV_VAR, raising=False)
        make_dataset(str(root / "raw"), dataset_id=DS, name="BadInputs", num_train=8, num_test=0, shape=(32, 32),
                     seed=DS)
        _preprocess(mp, DS)
        pre, store = root / "pre" / NAME, root / "checkpoints"
        store.mkdir()
        ckpt, other = _train_without_steps(pre, mp, root / "trained"), store / "other_plans.pth"
        mp.setenv("nnUNet_results", str(root / "res"))
        _save_checkpoint(make_trainer(pre, mp, GOOD, plans_edit=_wider), other)
        content = torch.load(ckpt, map_location="cpu", weights_only=False)
        plain = {k: v for k, v in content.items() if k not in ("dp_state", "dp_config")}
        torch.save({**plain, "trainer_name": "nnUNetTrainer"}, store / "nnunet_trainer.pth")
        (store / "truncated.pth").write_bytes(ckpt.read_bytes()[:ckpt.stat().st_size // 2])
        shutil.rmtree(root / "res")  # the trainers' logs; each test uses its own nnUNet_results
        mp.delenv(ENV_VAR, raising=False)
        yield Tiny(root, root / "raw" / NAME, pre, root / "trained", ckpt, other, store / "nnunet_trainer.pth",
                   store / "truncated.pth")


@pytest.fixture
def env(tiny, tmp_path, monkeypatch) -> pytest.MonkeyPatch:
    """The module's nnU-Net folders, with nnUNet_results of this test alone and no nnUNet_dp_config."""
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "res"))
    monkeypatch.delenv(ENV_VAR, raising=False)
    return monkeypatch


def fold_folder(tmp_path: Path) -> Path:
    return tmp_path / "res" / NAME / TRAINER_DIR / "fold_0"


def no_outputs(folder: Path, names=OUTPUTS) -> bool:
    return not any((folder / n).exists() for n in names)


def exit_message(main, argv: list[str] | None, capsys) -> str:
    """Run a command's main(); it must stop with a non-zero exit. Its message (sys.exit text or argparse's stderr)."""
    with pytest.raises(SystemExit) as e:
        main(argv) if argv is not None else main()
    code = e.value.code
    assert code not in (0, None)
    return code if isinstance(code, str) else capsys.readouterr().err


def mentions(message: str, *fragments: str) -> None:
    missing = [f for f in fragments if f.lower() not in message.lower()]
    assert not missing, f"message lacks {missing}:\n{message}"


# ---- DP settings: the nnUNet_dp_config JSON, read by DPConfig.from_env as the trainer's __init__ does ----------------
NAN, INF = float("nan"), float("inf")
SETTINGS = [
    pytest.param({"clip_norm": -1.0}, ["'clip_norm'", "-1.0", "> 0"], id="clip_norm-negative"),
    pytest.param({"clip_norm": 0}, ["'clip_norm'", "= 0", "> 0"], id="clip_norm-zero"),
    pytest.param({"clip_norm": NAN}, ["'clip_norm'", "nan", "> 0"], id="clip_norm-nan"),
    pytest.param({"clip_norm": "1.0"}, ["'clip_norm'", "'1.0'", "a number"], id="clip_norm-string"),
    pytest.param({"clip_norm": True}, ["'clip_norm'", "True", "a number"], id="clip_norm-bool"),
    pytest.param({"clip_norm": None}, ["'clip_norm'", "None", "a number"], id="clip_norm-null"),
    pytest.param({"target_epsilon": -8}, ["'target_epsilon'", "-8", "> 0"], id="target_epsilon-negative"),
    pytest.param({"target_epsilon": "8"}, ["'target_epsilon'", "'8'", "a number"], id="target_epsilon-string"),
    pytest.param({"target_epsilon": INF}, ["'target_epsilon'", "inf", "> 0"], id="target_epsilon-inf"),
    pytest.param({"delta": 1.0}, ["'delta'", "1.0", "(0, 1)"], id="delta-one"),
    pytest.param({"delta": 0}, ["'delta'", "= 0", "(0, 1)"], id="delta-zero"),
    pytest.param({"num_epochs": 2.5}, ["'num_epochs'", "2.5", "integer"], id="num_epochs-float"),
    pytest.param({"num_epochs": True}, ["'num_epochs'", "True", "integer"], id="num_epochs-bool"),
    pytest.param({"expected_batch_size": -3}, ["'expected_batch_size'", "-3", "> 0"],
                 id="expected_batch_size-negative"),
    pytest.param({"accountant": "moments"}, ["'accountant'", "'moments'", "'rdp'"], id="accountant-unknown"),
    pytest.param({"per_sample_strategy": "opacus"}, ["'per_sample_strategy'", "'opacus'", "'bk'"],
                 id="per_sample_strategy-unknown"),
    pytest.param({"target_epsilion": 3}, ["'target_epsilion'", "unknown key", "target_epsilon"], id="unknown-key"),
    pytest.param({"seed": -1}, ["'seed'", "-1", "integer"], id="seed-negative"),
    pytest.param({"seed": "42"}, ["'seed'", "'42'", "integer"], id="seed-string"),
    pytest.param({"sampling_rate": 0.1, "expected_batch_size": 3}, ["'sampling_rate'", "expected_batch_size"],
                 id="sampling_rate-and-expected_batch_size"),
    pytest.param({"target_epsilon": None}, ["'target_epsilon'", "noise_multiplier"], id="no-epsilon-and-no-sigma"),
    pytest.param({"seed": 2 ** 63}, ["'seed'", str(2 ** 63), "2**63 - 1"], id="seed-too-large"),
]


@pytest.mark.parametrize("values,fragments", SETTINGS)
def test_bad_setting(tmp_path, monkeypatch, values, fragments):
    path = tmp_path / "dp.json"
    path.write_text(json.dumps(values))  # NaN and Infinity as Python's json writes and reads them
    monkeypatch.setenv(ENV_VAR, str(path))
    with pytest.raises(DPConfigError) as e:
        DPConfig.from_env()
    mentions(str(e.value), *fragments)
    assert ENV_VAR in str(e.value) or str(path) in str(e.value)  # where the value came from


@pytest.mark.parametrize("text,fragments", [
    pytest.param("[1, 2]", ["JSON object"], id="config-not-an-object"),
    pytest.param("{clip_norm: 1}", ["valid JSON"], id="config-invalid-json"),
    pytest.param("", ["valid JSON"], id="config-empty-file"),
    pytest.param(None, ["existing JSON file"], id="config-missing-file"),
])
def test_bad_settings_file(tmp_path, monkeypatch, text, fragments):
    path = tmp_path / "dp.json"
    if text is not None:
        path.write_text(text)
    monkeypatch.setenv(ENV_VAR, str(path))
    with pytest.raises(DPConfigError) as e:
        DPConfig.from_env()
    mentions(str(e.value), ENV_VAR, str(path), *fragments)


# ---- settings that need the dataset (N = 6 training cases): the trainer's start, as nnUNetv2_train runs it -----------
@pytest.mark.parametrize("values,fragments", [
    pytest.param({"delta": 0.2}, ["'delta'", "0.2", "1/N", "N = 6"], id="delta-at-least-1/N"),
    pytest.param({"expected_batch_size": 50}, ["'expected_batch_size'", "50", "N = 6"],
                 id="expected_batch_size-above-N"),
])
def test_bad_setting_for_the_dataset_stops_training_before_any_output(tiny, env, tmp_path, values, fragments):
    trainer = make_trainer(tiny.pre, env, {**GOOD, **values})
    with pytest.raises(DPConfigError) as e:
        trainer.on_train_start()
    mentions(str(e.value), *fragments)
    assert no_outputs(fold_folder(tmp_path))


# ---- the trainer: models, checkpoints, data --------------------------------------------------------------------------
def _reflect_padding_trainer():
    from nnunet_dp.nnunet.trainer import nnUNetTrainerDP

    class nnUNetTrainerDP_ReflectPadding(nnUNetTrainerDP):
        """A network 'bk' cannot handle (a reflect-padded convolution) that is otherwise fine for DP."""

        @staticmethod
        def build_network_architecture(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                       enable_deep_supervision=True):
            net = nnUNetTrainerDP.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                             num_output_channels, enable_deep_supervision)
            next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d)).padding_mode = "reflect"
            return net

    return nnUNetTrainerDP_ReflectPadding


def test_bk_on_an_unsupported_model_stops_before_training(tiny, env, tmp_path):
    trainer = make_trainer(tiny.pre, env, {**GOOD, "per_sample_strategy": "bk"}, cls=_reflect_padding_trainer())
    with pytest.raises(Exception) as e:  # any error naming the setting
        trainer.on_train_start()
    mentions(str(e.value), "per_sample_strategy", "bk", "padding")
    assert no_outputs(fold_folder(tmp_path))


def _resume_from(tiny, env, tmp_path, checkpoint: Path):
    """nnUNetv2_train --c: the fold's checkpoint_latest.pth is this file; the trainer's load_checkpoint reads it."""
    fold = fold_folder(tmp_path)
    fold.mkdir(parents=True)
    shutil.copy(checkpoint, fold / "checkpoint_latest.pth")
    trainer = make_trainer(tiny.pre, env, GOOD)
    with pytest.raises(Exception) as e:  # torch, nnU-Net or nnunet-dp errors alike
        trainer.load_checkpoint(str(fold / "checkpoint_latest.pth"))
    assert no_outputs(fold, ("privacy.json", "dp_config.json", "checkpoint_final.pth"))
    return str(e.value)


def test_resume_from_a_checkpoint_of_another_trainer(tiny, env, tmp_path):
    mentions(_resume_from(tiny, env, tmp_path, tiny.nnunet_ckpt), "no privacy ledger", "without --c")


def test_resume_from_a_truncated_checkpoint(tiny, env, tmp_path):
    mentions(_resume_from(tiny, env, tmp_path, tiny.truncated_ckpt), "checkpoint_latest.pth")


def test_resume_from_a_checkpoint_with_other_plans(tiny, env, tmp_path):
    mentions(_resume_from(tiny, env, tmp_path, tiny.other_plans_ckpt), "checkpoint_latest.pth", "plans")


def _trainer_and_batch(tiny, env, data: torch.Tensor, seg: torch.Tensor, keys: list[str]):
    """An initialised trainer and a batch as its loader gives one (deep-supervision targets), for train_step."""
    trainer = make_trainer(tiny.pre, env, GOOD)
    trainer.initialize()
    trainer._dp_setup()
    scales = trainer._get_deep_supervision_scales()
    target = [torch.nn.functional.interpolate(seg, size=[round(32 * f) for f in s], mode="nearest") for s in scales]
    return trainer, {"data": data, "target": target, "keys": np.array(keys)}


def test_nan_images_stop_training(tiny, env):
    """Cases with NaN voxels contribute nothing (docs/invariants.md, invariant 4); when most of an epoch's cases do, training
    stops with a message that points at the data (the steps taken stay counted)."""
    data = torch.randn(4, 1, 32, 32)
    data[:, 0, 3, 3] = NAN
    trainer, batch = _trainer_and_batch(tiny, env, data, torch.ones(4, 1, 32, 32), [f"case_nan{i}" for i in range(4)])
    with pytest.raises(Exception) as e:
        trainer.on_train_epoch_end([trainer.train_step(batch)])
    mentions(str(e.value), "nan", "non-finite")


def test_nan_image_in_training_is_counted_not_named_in_the_log(tiny, env):
    """The log gives the number of dropped cases, never which (that would say which patient's gradient
    was not finite: data-dependent output outside epsilon)."""
    data = torch.randn(2, 1, 32, 32)
    data[0, 0, 3, 3] = NAN
    trainer, batch = _trainer_and_batch(tiny, env, data, torch.ones(2, 1, 32, 32), ["case_nan", "case_ok"])
    trainer.on_train_epoch_end([trainer.train_step(batch)])
    log = Path(trainer.log_file).read_text()
    mentions(log, "non-finite", "1 of 2 sampled cases dropped")
    assert "case_nan" not in log


def test_dropped_count_is_private_and_survives_a_resume(tiny, env):
    """The count of dropped cases is an unnoised function of the private cases: it stays in the log and in
    checkpoint_latest (so a --c continues it), never in privacy.json or the release checkpoints."""
    data = torch.randn(2, 1, 32, 32)
    data[0, 0, 3, 3] = NAN
    trainer, batch = _trainer_and_batch(tiny, env, data, torch.ones(2, 1, 32, 32), ["case_nan", "case_ok"])
    trainer.on_train_start()
    trainer.on_train_epoch_end([trainer.train_step(batch)])
    assert trainer.dp_dropped == 1
    write_privacy(trainer)
    folder = Path(trainer.output_folder)
    privacy = json.loads((folder / "privacy.json").read_text())
    assert "dropped_cases" not in privacy and not any("1 of 2" in a for a in privacy["assumptions"])
    trainer.save_checkpoint(str(folder / "checkpoint_latest.pth"))
    trainer.save_checkpoint(str(folder / "checkpoint_final.pth"))
    trainer.dp_run.journal.close()
    final = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert "dp_dropped" not in final
    resumed = make_trainer(tiny.pre, env, GOOD)
    resumed.load_checkpoint(str(folder / "checkpoint_latest.pth"))
    assert resumed.dp_dropped == 1


def test_label_outside_the_classes_in_a_training_step(tiny, env):
    seg = torch.ones(2, 1, 32, 32)
    seg[0, 0, :4, :4] = 7
    trainer, batch = _trainer_and_batch(tiny, env, torch.randn(2, 1, 32, 32), seg, ["case_bad", "case_ok"])
    with pytest.raises(Exception) as e:
        trainer.train_step(batch)
    mentions(str(e.value), "case_bad", "7")


def test_val_without_the_original_settings(tiny, tmp_path):
    shutil.copytree(tiny.trained, tmp_path / "res")
    fold = fold_folder(tmp_path)
    env = {**os.environ, **_environment(tiny.root), "nnUNet_results": str(tmp_path / "res")}
    env.pop(ENV_VAR, None)  # the settings file of the training is gone
    proc = run(["nnUNetv2_train", str(DS), "2d", "0", "-tr", "nnUNetTrainerDP", "-device", "cpu", "--val"], env,
               check=False)
    if proc.returncode == 0:  # validation with the fold's own settings (dp_config.json)
        assert (fold / "validation" / "summary.json").is_file()
    else:  # or a message that says what --val needs
        mentions(proc.stderr[-3000:], "--val", ENV_VAR)
        assert not (fold / "validation" / "summary.json").exists()


# ---- nnUNetv2_dp_privacy ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content,fragments", [
    pytest.param(None, ["does not exist", "fold_0"], id="privacy-missing-folder"),
    pytest.param("", ["No privacy.json", "fold_0"], id="privacy-folder-without-privacy.json"),
    pytest.param('{"epsilon": 1.2, "del', ["privacy.json", "JSON"], id="privacy-json-truncated",
                 ),
    pytest.param("{}", ["privacy.json", "epsilon"], id="privacy-json-without-epsilon",
                 ),
])
def test_privacy_summary_of_a_bad_folder(tmp_path, monkeypatch, capsys, content, fragments):
    from nnunet_dp.commands.privacy import main as privacy_main

    folder = tmp_path / "fold_0"
    if content is not None:
        folder.mkdir()
        if content:
            (folder / "privacy.json").write_text(content)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    monkeypatch.setattr(sys, "argv", ["nnUNetv2_dp_privacy", str(folder)])
    mentions(exit_message(privacy_main, None, capsys), *fragments)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


# ---- nnUNetv2_dp_determine_postprocessing ----------------------------------------------------------------------------
def _write_label_map(path: Path, array: np.ndarray, like: Path) -> None:
    image = sitk.GetImageFromArray(array)
    reference = sitk.ReadImage(str(like))
    if array.shape == sitk.GetArrayFromImage(reference).shape:
        image.CopyInformation(reference)
    sitk.WriteImage(image, str(path))


def _edit_case(folder: Path, name: str, edit) -> None:
    path = folder / name
    _write_label_map(path, edit(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))), path)


def _with_label_5(a):
    return np.where(a == 2, 5, a).astype(np.uint8)


def _with_nan(a):  # ITK's NIfTI reader turns NaN/inf voxels into 0, so this case is written as .nrrd
    out = a.astype(np.float32)
    out[0, 0, 0] = NAN
    return out


def _fractional(a):
    return np.where(a == 1, 1.5, a).astype(np.float32)


def _smaller(a):
    return a[:, :16, :16]


DPMORPH = [
    pytest.param("missing_input", [], ["-i", "missing"], id="dpmorph-missing-input-folder",
                 ),
    pytest.param("missing_input", ["plans"], ["-i", "missing", "existing folder"],
                 id="dpmorph-missing-input-folder-plans-given"),
    pytest.param("empty_input", ["plans"], ["-i", "empty"], id="dpmorph-empty-input-folder"),
    pytest.param("missing_ref", ["plans"], ["-ref", "missing", "existing folder"],
                 id="dpmorph-missing-reference-folder"),
    pytest.param("empty_ref", ["plans"], ["-ref", "reference for every prediction"],
                 id="dpmorph-empty-reference-folder"),
    pytest.param(("ref", _with_label_5), ["plans"], ["labels in reference case_000", "[5]", "dataset.json"],
                 id="dpmorph-reference-label-outside-classes"),
    pytest.param(("pred", _with_nan), ["plans"], ["labels in prediction case_000.nrrd", "[nan]"],
                 id="dpmorph-nan-in-prediction"),
    pytest.param(("pred", _fractional), ["plans"], ["labels in prediction case_000", "[1.5]"],
                 id="dpmorph-fractional-label-in-prediction"),
    pytest.param(("pred", _smaller), ["plans"], ["shape of case_000", "(1, 16, 16)"], id="dpmorph-shape-mismatch"),
    pytest.param("plans_missing", [], ["-plans_json", "no_such_plans.json", "existing file"],
                 id="dpmorph-missing-plans-file"),
    pytest.param("ok", ["plans", "-radii", "-1"], ["radii", "-1"], id="dpmorph-negative-radius"),
    pytest.param("ok", ["plans", "-np", "0"], ["-np", "0"], id="dpmorph-zero-processes"),
]


@pytest.mark.parametrize("setup,extra,fragments", DPMORPH)
def test_dpmorph_bad_input(tiny, tmp_path, capsys, setup, extra, fragments):
    from nnunet_dp.commands.determine_postprocessing import main

    pred, ref, out = tmp_path / "pred", tmp_path / "ref", tmp_path / "pp"
    ending = ".nrrd" if isinstance(setup, tuple) and setup[1] is _with_nan else ".nii.gz"
    dataset_json = tmp_path / "dataset.json"
    dataset_json.write_text(json.dumps({**json.loads((tiny.pre / "dataset.json").read_text()), "file_ending": ending}))
    for folder in (pred, ref):
        folder.mkdir()
        for case in ("case_000", "case_001", "case_002"):
            label = sitk.ReadImage(str(tiny.raw / "labelsTr" / f"{case}.nii.gz"))
            sitk.WriteImage(label, str(folder / f"{case}{ending}"))
    if isinstance(setup, tuple):
        _edit_case(pred if setup[0] == "pred" else ref, f"case_000{ending}", setup[1])
    elif setup in ("empty_input", "empty_ref"):
        for f in (pred if setup == "empty_input" else ref).iterdir():
            f.unlink()
    inputs = tmp_path / "missing" if setup == "missing_input" else pred
    refs = tmp_path / "missing" if setup == "missing_ref" else ref
    argv = ["-i", str(inputs), "-ref", str(refs), "-np", "1", "-o", str(out)]
    if "plans" in extra:
        argv += ["-plans_json", str(tiny.pre / "nnUNetPlans.json"), "-dataset_json", str(dataset_json)]
    elif setup == "plans_missing":
        argv += ["-plans_json", str(tmp_path / "no_such_plans.json"), "-dataset_json", str(dataset_json)]
    argv += [a for a in extra if a != "plans"]
    out.mkdir()
    (out / "postprocessing.pkl").write_bytes(b"an earlier choice")
    mentions(exit_message(main, argv, capsys), *fragments)
    assert (out / "postprocessing.pkl").read_bytes() == b"an earlier choice"
    assert not (out / "postprocessing.json").exists() and not (pred / "postprocessing.pkl").exists()


# ---- nnUNetv2_dp_alignment -------------------------------------------------------------------------------------------
def _broken_copy(tiny, env, tmp_path, dataset_id: int, edit) -> str:
    """A copy of the preprocessed dataset under another id whose training arrays `edit(data, seg)` changed, in an
    nnUNet_preprocessed of this test alone."""
    import blosc2

    name = f"Dataset{dataset_id}_Broken"
    target = tmp_path / "pre" / name
    shutil.copytree(tiny.pre, target)
    plans = json.loads((target / "nnUNetPlans.json").read_text())
    (target / "nnUNetPlans.json").write_text(json.dumps({**plans, "dataset_name": name}))
    for data_file in (target / "nnUNetPlans_2d").glob("*.b2nd"):
        if data_file.name.endswith("_seg.b2nd"):
            continue
        data = blosc2.open(urlpath=str(data_file), mode="a")
        seg = blosc2.open(urlpath=str(data_file.with_name(data_file.name[:-5] + "_seg.b2nd")), mode="a")
        new_data, new_seg = edit(data[:], seg[:])
        data[:], seg[:] = new_data, new_seg
    env.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    env.setenv(ENV_VAR, str(_write_settings(tmp_path, GOOD)))
    return str(dataset_id)


def _nan_images(data, seg):
    data[:, :, 10:12, 10:12] = NAN
    return data, seg


def _label_7(data, seg):
    return data, np.where(seg == 2, 7, seg).astype(seg.dtype)


ALIGNMENT = [
    pytest.param(["-d", "999"], ["dataset '999' not found"], id="alignment-unknown-dataset"),
    pytest.param(["-c", "3d_lowres"], ["configuration '3d_lowres'", "nnUNetPlans.json"],
                 id="alignment-unknown-configuration"),
    pytest.param([], ["checkpoint 'checkpoint_final.pth' not found", "no fold folder"], id="alignment-no-trained-fold"),
    pytest.param(["-chk", "truncated"], ["truncated.pth", "cannot be read", "truncated"],
                 id="alignment-truncated-checkpoint"),
    pytest.param(["-chk", "nnunet"], ["nnunet_trainer.pth", "'nnUNetTrainer'", "not by a DP trainer"],
                 id="alignment-checkpoint-of-another-trainer"),
    pytest.param(["-chk", "other_plans"], ["other_plans.pth", "does not fit the network built from the plans"],
                 id="alignment-checkpoint-with-other-plans"),
    pytest.param(["-chk", "none", "broken", _nan_images], ["NaN or inf voxels", "case"], id="alignment-nan-images"),
    pytest.param(["-chk", "none", "broken", _label_7], ["label values [7]", "dataset.json", "case"],
                 id="alignment-label-outside-classes"),
    pytest.param(["-n", "0"], ["-n must be >= 1", "got 0"], id="alignment-zero-batches"),
]


@pytest.mark.parametrize("extra,fragments", ALIGNMENT)
def test_alignment_bad_input(tiny, env, tmp_path, capsys, extra, fragments):
    from nnunet_dp.commands.alignment import main

    out = tmp_path / "alignment"
    dataset = str(DS)
    if "broken" in extra:
        dataset = _broken_copy(tiny, env, tmp_path, 982, extra[-1])
        extra = extra[:extra.index("broken")]
    checkpoints = {"truncated": tiny.truncated_ckpt, "nnunet": tiny.nnunet_ckpt, "other_plans": tiny.other_plans_ckpt}
    extra = [str(checkpoints.get(a, a)) for a in extra]
    argv = ["-d", dataset, "-c", "2d", "-f", "0", "-device", "cpu", "-n", "3", "-mc", "0", "-o", str(out)]
    for option, value in zip(extra[::2], extra[1::2]):
        argv += [option, value] if option not in argv else []
        argv[argv.index(option) + 1] = value
    out.mkdir()
    earlier = {n: f"an earlier analysis: {n}".encode()
               for n in ("summary.json", "alignment.csv", "alignment_cases.csv")}
    for name, content in earlier.items():
        (out / name).write_bytes(content)
    mentions(exit_message(main, argv, capsys), *fragments)
    left = {n: (out / n).read_bytes() for n in earlier if (out / n).exists()}
    assert left in (earlier, {})  # the earlier analysis whole, or nothing: never a mixture or a partial CSV


def test_alignment_control_good_input_passes_the_checks(tiny, env, tmp_path, capsys):
    """The checks above reject bad inputs only: the same command on the good checkpoint and data writes its results."""
    from nnunet_dp.commands.alignment import main

    out = tmp_path / "alignment"
    main(["-d", str(DS), "-c", "2d", "-f", "0", "-device", "cpu", "-n", "2", "-mc", "0", "-o", str(out), "-chk",
          str(tiny.ckpt), "none"])
    assert json.loads((out / "summary.json").read_text())["num_training_cases"] == 6
    assert (out / "alignment.csv").is_file()


# ---- nnUNetv2_dp_experiment ------------------------------------------------------------------------------------------
BUDGET = {"num_epochs": 1, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1, "batch_size": 4,
          "save_every": 1, "features_per_stage": [8, 16, 32]}
EXPERIMENT = [
    pytest.param("no_raw", [], ["environment variable nnUNet_raw"], id="experiment-without-nnUNet_raw"),
    pytest.param("ok", ["-d", "999"], ["-d = '999'", "nnUNet_raw"], id="experiment-unknown-dataset"),
    pytest.param("no_cases", [], ["0 cases", "at least 4"], id="experiment-dataset-without-labelled-cases"),
    pytest.param("ok", ["--budget", "missing.json"], ["--budget", "missing.json"], id="experiment-missing-budget-file"),
    pytest.param({**BUDGET, "num_epochs": 0}, [], ["--budget", "num_epochs", "= 0", "integer >= 1"],
                 id="experiment-budget-zero-epochs"),
    pytest.param({**BUDGET, "batch_size": "4"}, [], ["--budget", "batch_size", "'4'", "integer >= 1"],
                 id="experiment-budget-string-batch-size"),
    pytest.param({**BUDGET, "features_per_stage": [8, 16]}, [], ["--budget", "features_per_stage", "at least 3"],
                 id="experiment-budget-two-stage-network"),
    pytest.param([1, 2], [], ["--budget", "JSON file with the keys"], id="experiment-budget-not-an-object"),
    pytest.param({**BUDGET, "num_epoch": 1}, [], ["--budget", "num_epoch"], id="experiment-budget-unknown-key"),
    pytest.param("ok", ["--test-fraction", "1.5"], ["--test-fraction", "1.5"], id="experiment-test-fraction-above-1"),
    pytest.param("ok", ["--epsilons", "nan"], ["--epsilons", "nan"], id="experiment-nan-epsilon"),
    pytest.param("ok", ["--rules", "clip"], ["--rules", "'clip'"], id="experiment-unknown-rule"),
    pytest.param("out_is_file", [], ["-o", "it is a file"], id="experiment-output-is-a-file"),
    pytest.param("other_seed", [], ["--seed", "same dataset"],
                 id="experiment-folder-of-another-split-seed"),
    pytest.param("ok", ["--public-fraction", "0.9"], ["--public-fraction = 0.9", "at least 2 private",
                                                      "Choose F in that range"], id="experiment-public-fraction-leaves-"
                 "too-few-private-cases"),
    pytest.param("ok", ["--public-fraction", "0"], ["--public-fraction = 0.0", "strictly between 0 and 1"],
                 id="experiment-public-fraction-zero"),
    pytest.param("ok", ["--public-fraction", "0.3", "--pretrained", "x.pth"], ["--pretrained = 'x.pth'",
                                                                               "--public-fraction", "one of the two"],
                 id="experiment-pretrained-with-public-fraction"),
    pytest.param("ok", ["--pretrained", "missing.pth"], ["--pretrained", "missing.pth", "existing nnU-Net checkpoint"],
                 id="experiment-pretrained-missing-file"),
    pytest.param("other_network_ckpt", [], ["--pretrained", "a checkpoint of the network the plans build",
                                            "network 8-16-32", "--budget small or full"],
                 id="experiment-pretrained-other-network"),
    pytest.param("ok", ["--seeds", "0"], ["--seeds = 0", "an integer >= 1"], id="experiment-zero-seeds"),
    pytest.param("ok", ["--trainable", "everything"], ["--trainable = 'everything'", "'norm_bias'"],
                 id="experiment-unknown-trainable"),
]


@pytest.mark.parametrize("setup,extra,fragments", EXPERIMENT)
def test_experiment_bad_input(tiny, env, tmp_path, capsys, setup, extra, fragments):
    from nnunet_dp.commands.experiment import main

    out, budget = tmp_path / "out", tmp_path / "budget.json"
    budget.write_text(json.dumps(setup if isinstance(setup, (dict, list)) else BUDGET))
    if setup == "no_raw":
        env.delenv("nnUNet_raw")
    elif setup == "no_cases":
        folder = tmp_path / "raw" / "Dataset984_NoCases"
        for sub in ("imagesTr", "labelsTr"):
            (folder / sub).mkdir(parents=True)
        shutil.copy(tiny.raw / "dataset.json", folder / "dataset.json")
        env.setenv("nnUNet_raw", str(tmp_path / "raw"))
    elif setup == "out_is_file":
        out.write_text("not a folder")
    elif setup == "other_seed":
        out.mkdir()
        (out / "split.json").write_text(json.dumps({"seed": 1, "test_fraction": 0.2}))
        (out / "results.csv").write_text("run,dice_mean\nflat_eps8,0.5\n")
    dataset = "984" if setup == "no_cases" else str(DS)
    argv = ["-d", dataset, "-c", "2d", "--rules", "flat", "--epsilons", "8", "--budget", str(budget), "-o", str(out),
            "-device", "cpu", "-np", "1"]
    if setup == "other_network_ckpt":  # the plans' own network; the budget narrows it to 8-16-32
        argv += ["--pretrained", str(tiny.ckpt)]
    for option, value in zip(extra[::2], extra[1::2]):
        argv += [option, value] if option not in argv else []
        argv[argv.index(option) + 1] = str(tmp_path / value) if value.endswith(".json") else value
    before = {n: (out / n).read_bytes() for n in ("results.csv", "results.md") if (out / n).is_file()}
    mentions(exit_message(main, argv, capsys), *fragments)
    after = {n: (out / n).read_bytes() for n in ("results.csv", "results.md") if out.is_dir() and (out / n).is_file()}
    assert after == before

