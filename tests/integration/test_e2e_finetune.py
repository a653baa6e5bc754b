"""End to end, as a user runs it: a public (non-DP, BatchNorm) nnU-Net model, then nnUNetv2_train -pretrained_weights
with a DP trainer (trainable norm_bias, ema_decay, 2 augmentations per case), interrupted and resumed with --c, then
nnUNetv2_predict -chk checkpoint_final.pth."""
from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
from e2e import nnunet_env, prepare, run
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from nnunet_dp.config import DPConfig
from nnunet_dp.nnunet.finetune import PRETRAINED_ASSUMPTION
from nnunet_dp.nnunet.plans import apply_dp_to_configuration
from nnunet_dp.nnunet.selection import select_trainable
from nnunet_dp.optim import FINETUNE_DRIFT, default_lr

DS = 993
CFG = {"num_epochs": 2, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1, "expected_batch_size": 3,
       "target_epsilon": 8.0, "save_every": 1, "trainable": "norm_bias", "ema_decay": 0.9,
       "augmentations_per_case": 2}


def fold(root, trainer):
    return root / "res" / f"Dataset{DS}_Test{DS}" / f"{trainer}__nnUNetPlans__2d" / "fold_0"


def train(root, trainer, cfg, *args, check=True, **env):
    return run(["nnUNetv2_train", str(DS), "2d", "0", "-tr", trainer, "-device", "cpu", *args],
               nnunet_env(root, cfg, **env), check=check)


@pytest.fixture(scope="module")
def public(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    prepare(root, dataset_id=DS, shape=(32, 32), configuration="2d")
    train(root, "nnUNetTrainer_DPTestPublicBN", None)
    return root, fold(root, "nnUNetTrainer_DPTestPublicBN") / "checkpoint_final.pth"


def plans_net(folder):
    """The network nnU-Net builds from the DP run's plans."""
    arch = json.loads((folder.parent / "plans.json").read_text())["configurations"]["2d"]["architecture"]
    classes = len(json.loads((folder.parent / "dataset.json").read_text())["labels"])
    return get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], 1,
                                  classes, allow_init=True, deep_supervision=True)


def trained_keys(folder) -> set[str]:
    """state_dict keys (aliases included) of the parameters norm_bias trains."""
    net = plans_net(folder)
    chosen = {id(p) for p in select_trainable(net, "norm_bias").trained}
    return {k for k, v in net.state_dict(keep_vars=True).items() if id(v) in chosen}


def test_finetune_from_public_weights_with_ema_interrupted_and_resumed(public):
    root, public_file = public
    file_weights = torch.load(public_file, map_location="cpu", weights_only=False)["network_weights"]
    trainer = "nnUNetTrainerDP_TestCrash"
    folder = fold(root, trainer)
    crashed = train(root, trainer, CFG, "-pretrained_weights", str(public_file), check=False,
                    NNUNET_DP_TEST_CRASH_AT="1")
    assert crashed.returncode != 0 and "simulated crash" in crashed.stderr, crashed.stderr[-3000:]
    latest = torch.load(folder / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    trained = trained_keys(folder)
    mapped = [k for k in latest["network_weights"] if k in file_weights and ".seg_layers." not in k]
    frozen = [k for k in mapped if k not in trained]
    assert frozen and trained and latest["ema_updates"] == 2 and "raw_network_weights" not in latest
    for k in frozen:  # loaded from the public file and never touched
        assert torch.equal(latest["network_weights"][k], file_weights[k]), k
    assert all(not torch.equal(latest["network_weights"][k], latest["ema_network_weights"][k]) for k in trained)

    train(root, trainer, CFG, "--c")  # nnU-Net refuses -pretrained_weights with --c: the record comes from the ckpt
    final = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    ema, raw = final["ema_network_weights"], final["raw_network_weights"]
    assert final["ema_updates"] == 4  # continued from checkpoint_latest's average, not restarted
    assert all(torch.equal(final["network_weights"][k], ema[k]) for k in ema)
    assert all(not torch.equal(raw[k], ema[k]) and not torch.equal(raw[k], file_weights[k]) for k in trained
               if k in file_weights)
    for k in frozen:
        assert torch.equal(raw[k], file_weights[k]) and torch.equal(ema[k], file_weights[k]), k

    rep = json.loads((folder / "privacy.json").read_text())
    # the fine-tuning lr rule, from the RMS of the public weights that train (heads included: transferred), in closed
    # form; recorded in privacy.json and in both checkpoints (--c continued with it)
    net = plans_net(folder)
    chosen = {id(q) for q in select_trainable(net, "norm_bias").trained}
    names = [n for n, p in net.named_parameters() if id(p) in chosen]
    rms = math.sqrt(sum(float(file_weights[n].double().pow(2).sum()) for n in names) /
                    sum(file_weights[n].numel() for n in names))
    noise = rep["noise_multiplier"] * rep["clip_norm"] / rep["expected_batch_size"]
    expected_lr = min(0.1 * FINETUNE_DRIFT * rms / (noise * math.sqrt(rep["planned_steps"])),
                      default_lr(noise_multiplier=rep["noise_multiplier"], clip_norm=rep["clip_norm"],
                                 expected_batch_size=rep["expected_batch_size"], steps=rep["planned_steps"]))
    assert rep["lr_rule"] == "fine-tuning rule" and rep["initial_lr"] == pytest.approx(expected_lr, rel=1e-9)
    assert latest["dp_initial_lr"] == pytest.approx(expected_lr, rel=1e-9) and final["dp_lr_rule"] == "fine-tuning rule"
    assert final["dp_initial_lr"] == pytest.approx(expected_lr, rel=1e-9)
    record = rep["pretrained_weights"]
    assert record["sha256"] == hashlib.sha256(public_file.read_bytes()).hexdigest()
    heads = [k for k in file_weights if ".seg_layers." in k]  # same dataset, same labels: transfer_heads copies them
    assert heads and record["heads_transferred"] is True and record["path"] == str(public_file)
    assert record["transferred"] == len(mapped) + len(heads) and not set(heads) & set(record["not_transferred"])
    assert record["plans_source_dataset"] == f"Dataset{DS}_Test{DS}" and record["other_dataset"] is False
    assert any(k.endswith("running_var") for k in record["not_transferred"])
    assert rep["trainable"] == "norm_bias" and 0 < rep["num_trained_parameters"] < rep["num_parameters"]
    assert rep["ema_decay"] == 0.9 and rep["augmentations_per_case"] == 2 and rep["steps"] == 4
    assert PRETRAINED_ASSUMPTION in rep["assumptions"]
    log = "\n".join(p.read_text() for p in folder.glob("training_log_*.txt"))
    assert "segmentation-head tensors: nnU-Net never transfers them" not in log  # they were transferred
    for line in ("DP trainable=norm_bias: ", "BatchNorm running statistics", "DP ema_decay=0.9", "DP fine-tuning lr: ",
                 f"segmentation heads transferred from the public checkpoint too ({len(heads)} tensors"):
        assert line in log

    out = root / "pred"
    run(["nnUNetv2_predict", "-i", str(root / "raw" / f"Dataset{DS}_Test{DS}" / "imagesTs"), "-o", str(out),
         "-d", str(DS), "-c", "2d", "-f", "0", "-tr", trainer, "-chk", "checkpoint_final.pth", "-device", "cpu",
         "-npp", "1", "-nps", "1"], nnunet_env(root))
    assert len(list(out.glob("*.nii.gz"))) == 2


def test_lora_from_public_weights_resumed_then_predicted_by_stock_nnunet(public):
    """trainable lora: the adapters train from the public kernels (which stay exactly as loaded), --c continues the
    factors, checkpoint_final holds the plain network (merged kernels) that nnUNetv2_predict loads unchanged."""
    from nnunet_dp import lora

    root, public_file = public
    file_weights = torch.load(public_file, map_location="cpu", weights_only=False)["network_weights"]
    cfg = {**{k: v for k, v in CFG.items() if k not in ("ema_decay", "augmentations_per_case")},
           "trainable": "lora", "lora_rank": 2}
    trainer = "nnUNetTrainerDP_TestCrash"
    folder = fold(root, trainer)
    if folder.exists():
        import shutil
        shutil.rmtree(folder)
    crashed = train(root, trainer, cfg, "-pretrained_weights", str(public_file), check=False,
                    NNUNET_DP_TEST_CRASH_AT="1")
    assert crashed.returncode != 0 and "simulated crash" in crashed.stderr, crashed.stderr[-3000:]
    latest = torch.load(folder / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    train(root, trainer, cfg, "--c")
    final = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    net = plans_net(folder)
    assert set(final["network_weights"]) == set(net.state_dict())  # the plain network's keys only
    factors, before = final["dp_lora_factors"], latest["dp_lora_factors"]
    bases = [k for k in factors if k.endswith(".base.weight")]
    assert bases and all(torch.equal(factors[k], file_weights[k.replace(".base.weight", ".weight")]) for k in bases)
    moved = [k for k in factors if ".lora_b." in k and not torch.equal(factors[k], before[k])]
    assert moved and all(before[k].abs().max() > 0 for k in moved)  # continued from the crashed run's factors
    adapted = net
    lora.add_adapters_(adapted, 2, skip=list(adapted.decoder.seg_layers.modules()))
    lora.load_factors(adapted, factors)
    merged = adapted.state_dict()
    for k in (b.replace(".base.weight", ".weight") for b in bases):
        torch.testing.assert_close(final["network_weights"][k], merged[k], rtol=0, atol=1e-6)
    rep = json.loads((folder / "privacy.json").read_text())
    assert rep["trainable"] == "lora" and rep["lora_rank"] == 2 and rep["steps"] == 4
    assert rep["num_trained_parameters"] == sum(p.numel() for p in select_trainable(adapted, "lora").trained)
    out = root / "pred_lora"
    run(["nnUNetv2_predict", "-i", str(root / "raw" / f"Dataset{DS}_Test{DS}" / "imagesTs"), "-o", str(out),
         "-d", str(DS), "-c", "2d", "-f", "0", "-tr", trainer, "-device", "cpu", "-npp", "1", "-nps", "1"],
        nnunet_env(root))
    assert len(list(out.glob("*.nii.gz"))) == 2


def test_projection_public_from_the_public_model_and_its_cases(public, monkeypatch):
    """projection public: the subspace from the public checkpoint and the preprocessed cases of its dataset, recorded
    in privacy.json (k noise dimensions: same labels, so the heads are projected too); the update of a step lies in
    that subspace; only public cases reach it."""
    from types import SimpleNamespace

    from nnunet_dp.nnunet.projection import setup_projection

    root, public_file = public
    cfg = {**{k: v for k, v in CFG.items() if k not in ("ema_decay", "augmentations_per_case")},
           "projection": "public", "projection_dim": 6, "projection_samples": 12}
    trainer = "nnUNetTrainerDP"
    train(root, trainer, cfg, "-pretrained_weights", str(public_file))
    folder = fold(root, trainer)
    rep = json.loads((folder / "privacy.json").read_text())
    record = rep["projection"]
    assert record["projection"] == "public" and record["projection_dim"] == 6 and record["public_gradients"] == 12
    assert record["unprojected_parameters"] == 0 and record["noise_dimensions"] == 6
    assert record["projected_parameters"] == rep["num_trained_parameters"] and rep["noise"]["num_trained_parameters"] == 6
    assert record["public_data"].endswith(f"Dataset{DS}_Test{DS}/nnUNetPlans_2d")
    log = "\n".join(p.read_text() for p in folder.glob("training_log_*.txt"))
    assert "DP projection=public: k=6 dimensions" in log
    # the same subspace from the same public inputs, recomputed here; a step's update lies in it
    for key, value in nnunet_env(root).items():
        if key.startswith("nnUNet"):
            monkeypatch.setenv(key, value)
    net = plans_net(folder)
    sel = select_trainable(net, "norm_bias")
    fake = SimpleNamespace(dp_config=DPConfig(**{k: v for k, v in cfg.items()}), dp_selection=sel,
                           dp_pretrained=rep["pretrained_weights"], _plain_network=lambda: net,
                           device=torch.device("cpu"))
    projection, again = setup_projection(fake)
    assert again["public_energy_captured"] == pytest.approx(record["public_energy_captured"], rel=1e-6)
    summed = [torch.randn(p.shape, dtype=torch.float64) for p in sel.trained]
    from nnunet_dp.step import privatize_
    out = privatize_(summed, noise_multiplier=1.0, sensitivity=1.0, expected_batch_size=3.0,
                     generator=torch.Generator().manual_seed(0), projection=projection)
    flat = torch.cat([t.flatten() for t in out]).double()
    basis = projection.basis.double()
    torch.testing.assert_close(basis @ (basis.T @ flat), flat, rtol=1e-5, atol=1e-6)
    # only public inputs reach the subspace: with projection_data naming a folder of 3 cases, every case read is one
    # of them, and no other preprocessed folder is opened
    import shutil

    from nnunetv2.training.dataloading import nnunet_dataset
    source = root / "pre" / f"Dataset{DS}_Test{DS}" / "nnUNetPlans_2d"
    case_of = lambda path: path.name.split(".")[0].removesuffix("_seg")
    public_cases = sorted({case_of(p) for p in source.iterdir()})[:3]
    subset = root / "public_subset"
    subset.mkdir(exist_ok=True)
    for f in source.iterdir():
        if case_of(f) in public_cases:
            shutil.copy(f, subset / f.name)
    opened, read = [], []
    real = nnunet_dataset.infer_dataset_class(str(subset))

    class Recording(real):
        def __init__(self, folder, *args, **kwargs):
            opened.append(folder)
            super().__init__(folder, *args, **kwargs)

        def load_case(self, identifier):
            read.append(identifier)
            return super().load_case(identifier)

    monkeypatch.setattr(nnunet_dataset, "infer_dataset_class", lambda folder: Recording)
    fake.dp_config = DPConfig(**{**cfg, "projection_data": str(subset), "projection_dim": 2})  # 3 distinct patches
    setup_projection(fake)
    assert opened == [str(subset)] and len(read) == 12 and set(read) <= set(public_cases)
    # (the saved network is the plain one: the lora and morph tests predict with stock nnUNetv2_predict)


def test_morph_in_training_from_public_weights_then_stock_prediction(public, monkeypatch):
    """morph_in_training close: the saved plans build nnunet_dp.morph's network (the public weights load into it as
    into the plain one), training runs, and nnUNetv2_predict applies the closing: its predictions equal the plain
    network's with the closing applied to the logits."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_dp.morph import MORPH_NETWORK_PATH

    root, public_file = public
    cfg = {**{k: v for k, v in CFG.items() if k not in ("ema_decay", "augmentations_per_case")},
           "morph_in_training": "close", "morph_kernel": 5, "num_epochs": 1}
    trainer = "nnUNetTrainerDP_AutoS"
    train(root, trainer, cfg, "-pretrained_weights", str(public_file))
    folder = fold(root, trainer)
    arch = json.loads((folder.parent / "plans.json").read_text())["configurations"]["2d"]["architecture"]
    assert arch["network_class_name"] == MORPH_NETWORK_PATH
    assert arch["arch_kwargs"]["morph_ops"] == {"1": ["close", [5, 5]], "2": ["close", [5, 5]]}
    assert json.loads((folder / "privacy.json").read_text())["morph_in_training"] == "close"
    out = root / "pred_morph"
    run(["nnUNetv2_predict", "-i", str(root / "raw" / f"Dataset{DS}_Test{DS}" / "imagesTs"), "-o", str(out),
         "-d", str(DS), "-c", "2d", "-f", "0", "-tr", trainer, "-device", "cpu", "-npp", "1", "-nps", "1"],
        nnunet_env(root))
    assert len(list(out.glob("*.nii.gz"))) == 2
    monkeypatch.setenv("nnUNet_extTrainer", nnunet_env(root)["nnUNet_extTrainer"])
    predictor = nnUNetPredictor(device=torch.device("cpu"), use_mirroring=False)
    predictor.initialize_from_trained_model_folder(str(folder.parent), use_folds=(0,))
    assert predictor.network.dp_morph_ops == {1: ("close", (5, 5)), 2: ("close", (5, 5))}


def test_advise_with_pretrained_gives_the_fine_tuning_lr(public, monkeypatch, capsys, tmp_path):
    """nnUNetv2_dp_advise --pretrained: the lr column is the trainer's fine-tuning rule, in closed form from the RMS of
    the public file's weights that norm_bias trains (heads included: same labels, transferred)."""
    from nnunet_dp.commands import advise as advise_cli

    root, public_file = public
    for key, value in nnunet_env(root, CFG).items():
        if key.startswith("nnUNet"):
            monkeypatch.setenv(key, value)
    out = tmp_path / "advice.json"
    grid = ["--batch-sizes", "3", "--epochs", "2", "4"]  # calibrations cost seconds each: a small table
    advise_cli.main(["-d", str(DS), "-c", "2d", "--pretrained", str(public_file), *grid, "--json", str(out)])
    text = capsys.readouterr().out
    report = json.loads(out.read_text())
    file_weights = torch.load(public_file, map_location="cpu", weights_only=False)["network_weights"]
    plans = json.loads((root / "pre" / f"Dataset{DS}_Test{DS}" / "nnUNetPlans.json").read_text())
    defaults = DPConfig()  # the DP trainer's plan changes (BatchNorm -> per-sample norms), then nnU-Net's builder
    apply_dp_to_configuration(plans, plans["configurations"]["2d"], "2d", norm_conversion=defaults.norm_conversion,
                              num_groups=defaults.group_norm_groups)
    arch = plans["configurations"]["2d"]["architecture"]
    net = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], 1, 2,
                                 allow_init=True, deep_supervision=True)
    chosen = {id(q) for q in select_trainable(net, "norm_bias").trained}
    names = [n for n, p in net.named_parameters() if id(p) in chosen]
    rms = math.sqrt(sum(float(file_weights[n].double().pow(2).sum()) for n in names) /
                    sum(file_weights[n].numel() for n in names))
    start = report["pretrained"]
    assert start["heads_transferred"] is True and start["weight_rms"] == pytest.approx(rms, rel=1e-9)
    assert report["trainable"] == "norm_bias" and report["num_trained_parameters"] == sum(
        file_weights[n].numel() for n in names)
    for row in [*report["rows"], *report["current"]]:
        noise = row["noise_multiplier"] * 1.0 / row["expected_batch_size"]
        expected = min(0.1 * FINETUNE_DRIFT * rms / (noise * math.sqrt(row["steps"])),
                       default_lr(noise_multiplier=row["noise_multiplier"], clip_norm=1.0,
                                  expected_batch_size=row["expected_batch_size"], steps=row["steps"]))
        assert row["lr_rule"] == "fine-tuning rule" and row["lr"] == pytest.approx(expected, rel=1e-12)
    assert "the fine-tuning rule (nnunet_dp.optim.finetune_lr) from the RMS" in text and str(public_file) in text

    # without --pretrained: the from-scratch rule, as before
    advise_cli.main(["-d", str(DS), "-c", "2d", *grid, "--json", str(out)])
    plain = json.loads(out.read_text())
    assert plain["pretrained"] is None and {r["lr_rule"] for r in plain["rows"]} == {"from-scratch rule"}
    assert all(r["lr"] == default_lr(noise_multiplier=r["noise_multiplier"], clip_norm=1.0,
                                     expected_batch_size=r["expected_batch_size"], steps=r["steps"])
               for r in plain["rows"])

    # a file that is not a checkpoint of this network, and a missing file: errors that name --pretrained
    other = tmp_path / "other.pth"
    torch.save({"network_weights": {"encoder.x": torch.zeros(1)}}, other)
    for bad, words in ((other, "not a checkpoint of this network"), (tmp_path / "none.pth", "no such file")):
        with pytest.raises(SystemExit):
            advise_cli.main(["-d", str(DS), "-c", "2d", "--pretrained", str(bad)])
        err = capsys.readouterr().err
        assert f"--pretrained {bad}" in err and words in err, err
