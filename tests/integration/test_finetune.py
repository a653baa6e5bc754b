"""Setting `trainable` on real nnU-Net networks, the DP step with frozen parameters, and the pretrained-weights record
(nnU-Net's own load_pretrained_weights does the loading)."""
import hashlib
import json
from pathlib import Path

import pytest
import torch
from nets import batch, nnunet_loss, tiny_unet
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import nn

from nnunet_dp.config import DPConfig
from nnunet_dp.errors import DPConfigError
from nnunet_dp.nnunet import finetune, selection
from nnunet_dp.nnunet.finetune import pretrained_record, pretrained_weights_arg, report_extra, transfer_heads
from nnunet_dp.nnunet.plans import dp_architecture
from nnunet_dp.nnunet.selection import freeze_, select_trainable
from nnunet_dp.run import DPRun, make_plan

RESENC = {"network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
          "arch_kwargs": {"n_stages": 3, "features_per_stage": [8, 16, 32], "conv_op": "torch.nn.modules.conv.Conv2d",
                          "kernel_sizes": [[3, 3]] * 3, "strides": [[1, 1], [2, 2], [2, 2]],
                          "n_blocks_per_stage": [1, 2, 2], "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
                          "norm_op": "torch.nn.modules.batchnorm.BatchNorm2d",
                          "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None,
                          "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                          "nonlin_kwargs": {"inplace": True}},
          "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


def plans_network() -> nn.Module:
    """nnU-Net's ResidualEncoderUNet from plans, with the DP trainer's GroupNorm conversion."""
    arch = dp_architecture(RESENC, norm_conversion="batchnorm", num_groups=4)
    return get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], 1, 3,
                                  allow_init=True, deep_supervision=True)


def ids(params) -> set[int]:
    return {id(p) for p in params}


def by_module_type(net: nn.Module) -> set[int]:
    """Independent enumeration: norm affine parameters, conv biases, segmentation heads; and every parameter of the
    network belongs to a conv, a transposed conv or a norm layer (so nothing else could have been missed)."""
    expected, owned = set(), set()
    for m in net.modules():
        own = list(m.parameters(recurse=False))
        owned |= ids(own)
        if isinstance(m, (nn.InstanceNorm2d, nn.GroupNorm)):
            expected |= ids(own)
        elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            expected |= ({id(m.bias)} if m.bias is not None else set())
        else:
            assert not own, type(m)
    expected |= ids(net.decoder.seg_layers.parameters())
    assert owned == ids(net.parameters())
    return expected


@pytest.mark.parametrize("make", [lambda: tiny_unet(2), plans_network], ids=["PlainConvUNet", "ResidualEncoderUNet"])
def test_norm_bias_picks_norm_affine_biases_and_seg_heads(make):
    net = make()
    sel = select_trainable(net, "norm_bias")
    assert ids(sel.trained) == by_module_type(net)
    assert sel.num_trained == sum(p.numel() for p in sel.trained) < sel.num_parameters
    assert sel.num_parameters == sum(p.numel() for p in net.parameters())
    assert f"{sel.num_trained} of {sel.num_parameters} parameters trained" in sel.summary()
    assert any(".seg_layers." in n for n, p in net.named_parameters() if id(p) in ids(sel.trained))


@pytest.mark.parametrize("make", [lambda: tiny_unet(2), plans_network], ids=["PlainConvUNet", "ResidualEncoderUNet"])
def test_decoder_picks_decoder_stages_transposed_convs_and_heads_not_the_encoder(make):
    net = make()
    sel = select_trainable(net, "decoder")
    d = net.decoder
    expected = ids(d.stages.parameters()) | ids(d.transpconvs.parameters()) | ids(d.seg_layers.parameters())
    assert ids(sel.trained) == expected and not ids(sel.trained) & ids(net.encoder.parameters())
    assert ids(net.encoder.parameters()) | expected == ids(net.parameters())  # decoder.encoder is the same encoder
    assert select_trainable(net, "all").num_trained == sel.num_parameters


@pytest.mark.parametrize("make", [lambda: tiny_unet(2), plans_network], ids=["PlainConvUNet", "ResidualEncoderUNet"])
def test_heads_pick_the_segmentation_heads_only(make):
    net = make()
    sel = select_trainable(net, "heads")
    assert ids(sel.trained) == ids(net.decoder.seg_layers.parameters())
    assert all(isinstance(m, (nn.Conv2d, nn.Conv3d)) for m in net.decoder.seg_layers)  # 1x1 convolutions
    assert sel.num_trained == sum(p.numel() for p in net.decoder.seg_layers.parameters()) < sel.num_parameters


def test_unknown_layout_is_refused_naming_the_setting():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.GroupNorm(1, 2))
    with pytest.raises(DPConfigError, match=r"'trainable' = 'decoder'.*`\.encoder` and `\.decoder`"):
        select_trainable(net, "decoder")
    with pytest.raises(DPConfigError, match=r"'trainable' = 'norm_bias'.*decoder\.seg_layers"):
        select_trainable(net, "norm_bias")
    with pytest.raises(DPConfigError, match="'trainable' = 'head'"):
        select_trainable(net, "head")  # type: ignore[arg-type]


@pytest.mark.parametrize("strategy", ["loop", "bk"])
def test_frozen_parameters_get_no_gradient_no_noise_no_update(strategy):
    net = tiny_unet(2).double()
    sel = select_trainable(net, "norm_bias")
    freeze_(net, sel)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    cfg = DPConfig(noise_multiplier=1e3, target_epsilon=None, expected_batch_size=2)  # noise would dominate
    run = DPRun(make_plan(cfg, rule="flat", num_training_cases=10, plans_batch_size=2), device=torch.device("cpu"),
                seed=0, strategy=strategy)
    x, y = batch(2, 3)
    # an optimizer over every parameter, with weight decay: only the engine decides what gets a gradient
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        run.private_step(net, nnunet_loss(), x, y)
        frozen = [n for n, p in net.named_parameters() if not p.requires_grad]
        assert frozen and all(p.grad is None for p in net.parameters() if not p.requires_grad)
        assert all(p.grad is not None and p.grad.abs().max() > 1 for p in sel.trained)  # the noise is there
        opt.step()
    after = dict(net.named_parameters())
    assert all(torch.equal(after[n], before[n]) for n in frozen)
    assert all(not torch.equal(p, before[n]) for n, p in after.items() if p.requires_grad)


def test_pretrained_weights_arg_reads_only_the_full_option():
    argv = ["7", "2d", "0", "-p", "nnUNetPlans", "-tr", "nnUNetTrainerDP", "-pretrained_weights", "/a/b.pth"]
    assert pretrained_weights_arg(argv) == "/a/b.pth"
    assert pretrained_weights_arg(["7", "2d", "0", "-pretrained_weights=/c.pth", "--c"]) == "/c.pth"
    assert pretrained_weights_arg(["7", "2d", "0", "-p", "nnUNetPlans", "-device", "cpu"]) is None  # -p: no prefix
    assert pretrained_weights_arg(["7", "2d", "0", "-pnnUNetPlans", "-pretrained_weights=/d.pth"]) == "/d.pth"
    assert pretrained_weights_arg(["7", "2d", "0", "-pre", "/d.pth"]) is None  # ambiguous: nnU-Net refuses it too


def public_checkpoint(path, dataset_name="Dataset001_Public"):
    """A public nnU-Net checkpoint of a BatchNorm network (running statistics included)."""
    public = tiny_unet(2, norm=nn.BatchNorm2d, seed=3)
    public.train()(torch.randn(4, 1, 16, 16))  # running statistics move away from their defaults
    torch.save({"network_weights": public.state_dict(), "trainer_name": "nnUNetTrainer",
                "init_args": {"plans": {"dataset_name": dataset_name}, "dataset_json": {"name": "Public"}}}, path)
    return public.state_dict()


def test_pretrained_record_after_nnunets_own_loading(tmp_path):
    path = str(tmp_path / "public.pth")
    weights = public_checkpoint(path)
    net = tiny_unet(2, seed=1)  # InstanceNorm: no running statistics
    load_pretrained_weights(net, path)
    record, lines = pretrained_record(path, net, "Dataset002_Private")
    state = net.state_dict()
    mapped = [k for k in state if ".seg_layers." not in k]
    assert all(torch.equal(state[k], weights[k]) for k in mapped)
    assert record["sha256"] == hashlib.sha256(Path(path).read_bytes()).hexdigest()
    assert record["transferred"] == len(mapped) and record["plans_source_dataset"] == "Dataset001_Public"
    assert record["other_dataset"] is True and record["trainer_name"] == "nnUNetTrainer"
    assert set(record["not_transferred"]) == set(weights) - set(mapped)
    assert any(k.endswith("running_mean") for k in record["not_transferred"])
    assert any(".seg_layers." in k for k in record["not_transferred"])
    text = "\n".join(lines)
    assert "segmentation-head tensors" in text and "BatchNorm running statistics" in text
    json.dumps(record)  # goes into privacy.json

    extra, assumptions = report_extra(DPConfig(trainable="norm_bias"), select_trainable(net, "norm_bias"), record)
    assert extra["pretrained_weights"] is record and extra["trainable"] == "norm_bias"
    assert assumptions == [finetune.PRETRAINED_ASSUMPTION]
    assert report_extra(DPConfig(), None, None)[1] == []


LABELS = {"background": 0, "anterior": 1, "posterior": 2}


def test_transfer_heads_copies_the_public_heads_only_when_labels_and_shapes_match(tmp_path):
    """After nnU-Net's own loading (which skips the heads), transfer_heads copies exactly the '.seg_layers.' tensors
    when the checkpoint's labels equal the dataset's; otherwise nothing changes and the line says why."""
    public = tiny_unet(2, seed=3)
    path = str(tmp_path / "public.pth")
    torch.save({"network_weights": public.state_dict(), "init_args": {"dataset_json": {"labels": LABELS}}}, path)
    heads = [k for k in public.state_dict() if ".seg_layers." in k]
    assert heads

    def loaded(seed=1, num_classes=3):
        net = tiny_unet(2, seed=seed, num_classes=num_classes)
        load_pretrained_weights(net, path)
        return net, {k: v.clone() for k, v in net.state_dict().items()}

    net, before = loaded()
    assert all(not torch.equal(before[k], public.state_dict()[k]) for k in heads)  # nnU-Net left them random
    copied, line = transfer_heads(path, net, {"labels": dict(LABELS)})
    assert sorted(copied) == sorted(heads) and "transferred" in line
    after = net.state_dict()
    for k, v in after.items():
        assert torch.equal(v, public.state_dict()[k] if k in heads else before[k]), k

    for dataset_json, why in (({"labels": {**LABELS, "posterior": 3}}, "differ from this dataset's"),
                              ({"labels": {"background": 0, "x": 1, "y": 2}}, "differ from this dataset's")):
        net, before = loaded()
        copied, line = transfer_heads(path, net, dataset_json)
        assert copied == [] and why in line and "not transferred" in line
        assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    net, before = loaded(num_classes=2)  # same labels claimed, other head shapes
    copied, line = transfer_heads(path, net, {"labels": dict(LABELS)})
    assert copied == [] and "shapes differ" in line
    torch.save({"network_weights": public.state_dict()}, path)  # no labels recorded
    net, before = loaded()
    assert transfer_heads(path, net, {"labels": dict(LABELS)})[0] == []
    with pytest.raises(DPConfigError, match="transfer_heads"):
        DPConfig(transfer_heads="yes")


def test_pretrained_record_is_null_when_the_network_does_not_hold_the_file(tmp_path):
    path = str(tmp_path / "public.pth")
    public_checkpoint(path, dataset_name="Dataset002_Private")
    net = tiny_unet(2, seed=1)
    load_pretrained_weights(net, path)
    record, lines = pretrained_record(path, net, "Dataset002_Private")
    assert record["other_dataset"] is False and "name this dataset" in lines[-1]
    with torch.no_grad():
        net.encoder.stages[0][0].convs[0].conv.weight.add_(1e-3)
    record, lines = pretrained_record(path, net, "Dataset002_Private")
    # 4 keys: the conv weight and its aliases (all_modules, decoder.encoder)
    assert record is None and "differ from the file's in 4 of the" in lines[0]


def test_a_resume_keeps_the_trained_parameters():
    selection.check_resume({"dp_config": {"trainable": "decoder"}}, DPConfig(trainable="decoder"))
    selection.check_resume({"dp_config": {}}, DPConfig())  # a checkpoint from before the setting trained everything
    with pytest.raises(DPConfigError, match=r"'trainable' = 'all' .*checkpoint's value 'norm_bias'"):
        selection.check_resume({"dp_config": {"trainable": "norm_bias"}}, DPConfig())
