"""Which parameters DP-SGD trains (setting `trainable`): every one, norms and biases (DP-BiTFiT), the decoder, the
segmentation heads only, or low-rank adapters (nnunet_dp.lora) with norms, biases and heads.

Freezing costs no privacy: frozen parameters get no gradient, no noise and no update, and the sensitivity is still
the clip norm over the trained ones (docs/invariants.md, invariant 4; privacy.json records the setting).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from nnunet_dp import lora
from nnunet_dp.config import DPConfig, Trainable
from nnunet_dp.errors import DPConfigError

_NORMS: tuple[type, ...] = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm,
                            *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))


@dataclass(frozen=True)
class Selection:
    mode: Trainable
    trained: list[nn.Parameter]  # in model.parameters() order
    num_trained: int  # scalar parameters
    num_parameters: int

    def summary(self) -> str:
        share = 100.0 * self.num_trained / max(self.num_parameters, 1)
        return (f"DP trainable={self.mode}: {self.num_trained} of {self.num_parameters} parameters trained "
                f"({share:.2f} %)")


def _layout_error(mode: str, model: nn.Module, needs: str) -> DPConfigError:
    return DPConfigError("trainable", mode, f"'all' on this network ({type(model).__name__}): '{mode}' needs {needs}, "
                         "as nnU-Net's PlainConvUNet and ResidualEncoderUNet have", "nnUNet_dp_config")


def _seg_heads(model: nn.Module, mode: str) -> list[nn.Parameter]:
    heads = getattr(getattr(model, "decoder", None), "seg_layers", None)
    if not isinstance(heads, nn.Module):
        raise _layout_error(mode, model, "the segmentation heads at `.decoder.seg_layers` (nnU-Net never transfers "
                            "them from pretrained weights, so they must train)")
    return list(heads.parameters())


def _norm_bias(model: nn.Module) -> list[nn.Parameter]:
    """Affine weights and biases of every norm layer, every bias, the segmentation heads (DP-BiTFiT style: Bu et
    al. 2024, "Differentially private bias-term fine-tuning of foundation models")."""
    chosen = [p for m in model.modules() if isinstance(m, _NORMS) for p in m.parameters(recurse=False)]
    chosen += [p for m in model.modules() for n, p in m.named_parameters(recurse=False) if n == "bias"]
    return chosen + _seg_heads(model, "norm_bias")


def _decoder(model: nn.Module) -> list[nn.Parameter]:
    """Decoder stages, transposed convolutions, segmentation heads: the decoder's parameters minus the encoder's
    (nnU-Net's UNetDecoder holds a reference to the encoder, so its .parameters() include the encoder's)."""
    encoder, decoder = getattr(model, "encoder", None), getattr(model, "decoder", None)
    if not isinstance(encoder, nn.Module) or not isinstance(decoder, nn.Module):
        raise _layout_error("decoder", model, "`.encoder` and `.decoder` submodules")
    in_encoder = {id(p) for p in encoder.parameters()}
    return [p for p in decoder.parameters() if id(p) not in in_encoder]


def _heads(model: nn.Module) -> list[nn.Parameter]:
    """The segmentation heads only (DP linear probing on the public network's features: Tramèr & Boneh 2021)."""
    return _seg_heads(model, "heads")


def _lora(model: nn.Module) -> list[nn.Parameter]:
    """The low-rank adapters' factors (nnunet_dp.lora) with the norm_bias set: norms, biases and heads."""
    factors = lora.factor_parameters(model)
    if not factors:
        raise _layout_error("lora", model, "convolutions to adapt (the adapters are added by "
                            "selection.add_lora_ before the selection)")
    return factors + _norm_bias(model)


_SELECTORS: dict[str, Callable[[nn.Module], list[nn.Parameter]]] = {
    "all": lambda model: list(model.parameters()), "norm_bias": _norm_bias, "decoder": _decoder, "heads": _heads,
    "lora": _lora}


def add_lora_(model: nn.Module, cfg: DPConfig) -> int:
    """trainable lora: adapters of rank lora_rank on every convolution but the segmentation heads (which train
    whole). Returns the number of adapted convolutions (0 for any other setting: nothing changes)."""
    if cfg.trainable != "lora":
        return 0
    _seg_heads(model, "lora")  # stops, naming the setting, when the network has no nnU-Net heads
    return len(lora.add_adapters_(model, cfg.lora_rank, skip=list(model.decoder.seg_layers.modules())))


def select_trainable(model: nn.Module, mode: Trainable) -> Selection:
    """The parameters setting `trainable` = `mode` trains (nothing is changed on the model)."""
    if mode not in _SELECTORS:
        raise DPConfigError("trainable", mode, f"one of {', '.join(repr(k) for k in _SELECTORS)}")
    chosen = {id(p) for p in _SELECTORS[mode](model)}
    trained = [p for p in model.parameters() if id(p) in chosen]
    if not trained:
        raise _layout_error(mode, model, "at least one parameter it selects")
    return Selection(mode, trained, sum(p.numel() for p in trained), sum(p.numel() for p in model.parameters()))


def freeze_(model: nn.Module, selection: Selection) -> None:
    """requires_grad=False on every parameter the selection does not train. Call before anything reads the
    network's structure (the per-case engines cache each model's trainable layers on first use)."""
    trained = {id(p) for p in selection.trained}
    for p in model.parameters():
        p.requires_grad_(id(p) in trained)


def lora_entries(model: nn.Module) -> dict[str, Any]:
    """A checkpoint's entry for the adapters (none without them): network_weights hold the merged plain network
    (what nnUNetv2_predict loads); the factors let --c continue the adapters themselves."""
    saved = lora.factors(model)
    return {"dp_lora_factors": saved} if saved else {}


def restore_lora(checkpoint: dict, model: nn.Module) -> None:
    """After nnU-Net loaded network_weights (the merged function) into the adapted network: the exact factors."""
    saved = checkpoint.get("dp_lora_factors")
    if saved is not None and lora.factor_parameters(model):
        lora.load_factors(model, saved)


def check_resume(checkpoint: dict, cfg: DPConfig) -> None:
    """A checkpoint is continued (--c) or validated (--val) with the parameters it trained: its optimizer state
    holds exactly those."""
    saved = (checkpoint.get("dp_config") or {}).get("trainable", "all")
    if saved != cfg.trainable:
        raise DPConfigError("trainable", cfg.trainable, f"the checkpoint's value {saved!r} (its optimizer state holds "
                            "the parameters that setting trains); restore it to resume or validate this training")
