"""benchmarks/finetune_displacement.py: displacement norms and cosines against numpy on made-up checkpoints, and its
noise-alone closed form against nnU-Net's own optimizer and poly schedule stepping on pure noise."""
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

_SPEC = importlib.util.spec_from_file_location(
    "finetune_displacement", Path(__file__).resolve().parents[2] / "benchmarks" / "finetune_displacement.py")
fd = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(fd)


class _Net(torch.nn.Module):
    """Names one tensor twice, as nnU-Net's decoder.encoder and all_modules do."""

    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Linear(30, 20)
        self.decoder = torch.nn.Module()
        self.decoder.encoder = self.encoder
        self.decoder.seg_layers = torch.nn.Linear(20, 2)
        self.frozen = torch.nn.Linear(5, 5)


def _save(path: Path, net: torch.nn.Module) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"network_weights": net.state_dict()}, path)


def _run(exp: Path, name: str, rule: str, net: torch.nn.Module, **extra) -> None:
    model = exp / "runs" / name / "model"
    _save(model / "fold_0" / "checkpoint_final.pth", net)
    (exp / "runs" / name / "result.json").write_text(json.dumps(
        {"run": name, "rule": rule, "trainable": "all", "status": "finished", "model_folder": str(model), **extra}))


def test_norms_and_cosines_are_numpys_over_each_tensor_once_heads_left_out(tmp_path):
    torch.manual_seed(0)
    public = _Net()
    _save(tmp_path / "public" / "checkpoint_final.pth", public)
    (tmp_path / "runs" / "public_alone").mkdir(parents=True)
    (tmp_path / "runs" / "public_alone" / "result.json").write_text(json.dumps(
        {"run": "public_alone", "checkpoint": str(tmp_path / "public" / "checkpoint_final.pth")}))
    moved = {}
    for name, rule in (("nonprivate_s1", "nonprivate"), ("nonprivate_s2", "nonprivate"), ("flat_eps8_s1", "flat")):
        net = _Net()
        net.load_state_dict(public.state_dict())
        with torch.no_grad():
            for p in (net.encoder.weight, net.encoder.bias, net.decoder.seg_layers.weight):
                p.add_(torch.randn_like(p))
            if rule == "nonprivate":
                net.frozen.weight.add_(1.0)
        moved[name] = np.concatenate([(getattr(net, m).state_dict()[k] - getattr(public, m).state_dict()[k])
                                      .numpy().ravel().astype(np.float64)
                                      for m, k in (("encoder", "weight"), ("encoder", "bias"), ("frozen", "weight"),
                                                   ("frozen", "bias"))])
        _run(tmp_path, name, rule, net, lr_used=None if rule == "nonprivate" else 0.01, noise_multiplier=None)
    deltas, w0, results = fd.displacements(str(tmp_path))
    w0_np = np.concatenate([public.state_dict()[k].numpy().ravel() for k in
                            ("encoder.weight", "encoder.bias", "frozen.weight", "frozen.bias")])
    assert w0.numel() == w0_np.size == 20 * 30 + 20 + 25 + 5  # decoder.encoder.* once, seg_layers not at all
    assert float(w0.norm()) == pytest.approx(np.linalg.norm(w0_np))
    for name, v in moved.items():
        assert float(deltas[name].norm()) == pytest.approx(np.linalg.norm(v))
    a, b = moved["flat_eps8_s1"], moved["nonprivate_s1"]
    assert fd.cosine(deltas["flat_eps8_s1"], deltas["nonprivate_s1"]) == pytest.approx(
        a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    text = fd.table(deltas, w0, results, {"num_epochs": 2, "num_iterations_per_epoch": 3})
    assert "| flat_eps8_s1 | 0.01 | 620 |" in text  # the frozen Linear did not move: 620 trained coordinates; nonprivate moved its weight too (+25)
    assert "| nonprivate_s1 | – | 645 |" in text and f"{a @ b / np.linalg.norm(a) / np.linalg.norm(b):+.4f}" in text


def test_noise_alone_closed_form_matches_nnunets_sgd_and_poly_schedule_on_pure_noise():
    """Independent reference: torch's SGD (momentum 0.9, Nesterov, as the DP trainers build it) and nnU-Net's
    PolyLRScheduler stepped once per epoch, fed gradients that are the DP noise alone (σC/(qN) per coordinate)."""
    d, epochs, steps, lr, sigma, batch = 50_000, 8, 10, 0.003, 3.0, 25.0
    torch.manual_seed(1)
    w = torch.zeros(d, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([w], lr=lr, momentum=0.9, nesterov=True)
    sched = PolyLRScheduler(opt, lr, epochs)
    for e in range(epochs):
        sched.step(e)
        for _ in range(steps):
            w.grad = torch.randn(d, dtype=torch.float64) * sigma / batch
            opt.step()
    predicted = fd.noise_displacement({"noise_multiplier": sigma, "clip_norm": 1.0, "expected_batch_size": batch,
                                       "lr_used": lr}, epochs, steps, d, momentum=0.9)
    assert float(w.detach().norm()) == pytest.approx(predicted, rel=0.02)
    assert predicted < sigma / batch / 0.1 * lr * math.sqrt(d * epochs * steps)  # the poly decay lowers it
    plain = fd.noise_displacement({"noise_multiplier": sigma, "clip_norm": 1.0, "expected_batch_size": batch,
                                   "lr_used": lr}, 1, 4000, d, momentum=0.0, nesterov=False)
    assert plain == pytest.approx(sigma / batch * lr * math.sqrt(d * 4000))  # no momentum, no decay: closed form
