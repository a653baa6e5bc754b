"""DPConfig: every DP setting, its default, JSON loading from env var ``nnUNet_dp_config`` and validation.

Validation happens here, at the boundary: each bad value stops with the key, the value and what is allowed.
Checks that need the dataset (delta < 1/N, sampling rate <= 1) run in ``DPConfig.check_against_dataset``.

Longer than ~300 lines on purpose: every setting, its default and its check sit in this one file, so that a new
setting cannot be added without its validation.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from nnunet_dp.errors import DPConfigError

ENV_VAR = "nnUNet_dp_config"
# Only accountants that give an upper bound on epsilon (docs/invariants.md, invariant 6). opacus' "gdp" (the CLT approximation of
# Gaussian DP) under-reports: at delta 1e-5, sigma 1, q 0.1, 50 steps it gives 4.01 against PRV's 5.16 and RDP's 5.88.
AccountantName = Literal["rdp", "prv"]
NormConversion = Literal["batchnorm", "all"]
Strategy = Literal["auto", "loop", "bk"]
ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")
REFUSED_ACCOUNTANTS = {"gdp": "opacus' Gaussian-DP accountant is a central-limit approximation that under-reports "
                              "epsilon (it is no upper bound); use 'rdp' (default) or 'prv'"}
SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes seeds below 2**63 (unsigned 64-bit wraps into negatives)
NORM_CONVERSIONS: tuple[str, ...] = ("batchnorm", "all")
STRATEGIES: tuple[str, ...] = ("auto", "loop", "bk")
Trainable = Literal["all", "norm_bias", "decoder", "heads", "lora"]
Projection = Literal["none", "public"]
MorphMode = Literal["none", "close", "open", "adaptive"]
MORPH_MODES: tuple[str, ...] = ("none", "close", "open", "adaptive")
PROJECTIONS: tuple[str, ...] = ("none", "public")
TRAINABLE: tuple[str, ...] = ("all", "norm_bias", "decoder", "heads", "lora")
MAX_AUGMENTATIONS_PER_CASE = 64  # De et al. 2022 saw diminishing returns after 8-16; more only multiplies the cost


@dataclass(frozen=True)
class DPConfig:
    """Effective DP settings. ``None`` means "take nnU-Net's / the plans' value" where documented."""

    target_epsilon: float | None = 8.0
    delta: float = 1e-5
    noise_multiplier: float | None = None
    clip_norm: float = 1.0
    expected_batch_size: float | None = None
    sampling_rate: float | None = None
    num_epochs: int = 50
    num_iterations_per_epoch: int = 50
    num_val_iterations_per_epoch: int = 10
    initial_lr: float | None = None  # None: nnunet_dp.optim.default_lr (from sigma, C, qN and the planned steps)
    momentum: float = 0.9  # SGD momentum (nnU-Net's 0.99 remembers ~100 steps: too long for a noisy, short DP run)
    nesterov: bool = True
    accountant: AccountantName = "rdp"
    autos_gamma: float = 0.01
    nsgd_r: float = 0.1
    psac_r: float = 0.1
    norm_conversion: NormConversion = "batchnorm"
    group_norm_groups: int = 8
    per_sample_strategy: Strategy = "auto"
    oversample_foreground_percent: float = 0.33
    alignment_every: int = 0
    # repr=False: nnU-Net's debug.json stores str() of every trainer attribute; the seed must not reach any file
    seed: int | None = dataclasses.field(default=None, repr=False)
    save_every: int = 10
    # fine-tuning levers; none of them costs privacy: the unit stays the case, the sensitivity C
    trainable: Trainable = "all"  # which parameters DP-SGD trains; the others stay frozen (no gradient, noise, update)
    lora_rank: int = 4  # trainable lora: rank r of the adapters on every convolution (nnunet_dp.lora)
    # projection public: case gradients projected on the top-projection_dim subspace of public-case gradients at the
    # public model (nnunet_dp.projection); needs -pretrained_weights; projection_samples public patches estimate it
    projection: Projection = "none"
    projection_dim: int = 64
    projection_samples: int = 256
    projection_data: str | None = None  # preprocessed public cases; null: the public checkpoint's dataset
    # DP-Morph inside training (nnunet_dp.morph): opening/closing of each foreground class's logits in the network,
    # before the loss and at inference; adaptive: per class from morph_classes {"1": "close", "2": ["open", 5]}
    morph_in_training: MorphMode = "none"
    morph_kernel: int | list[int] = 3
    morph_classes: dict[str, Any] | None = None
    augmentations_per_case: int = 1  # K patches per sampled case, their gradients averaged before the rule scales it
    ema_decay: float | None = None  # exponential moving average of the weights (post-processing); null = off
    # -pretrained_weights: also copy the public segmentation heads (nnU-Net never does) when the checkpoint's labels
    # equal this dataset's and the shapes fit; public weights, so no privacy cost
    transfer_heads: bool = True

    def __post_init__(self) -> None:
        for check in _CHECKS:
            check(self)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = ENV_VAR, **overrides: Any) -> DPConfig:
        """Build from a JSON-like mapping; unknown keys stop with the list of known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in values.items() if k != "private_randomness"}  # written by release_dict
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise DPConfigError(key, values[key], f"unknown key; {hint}known keys are {', '.join(sorted(known))}",
                                    source)
        merged = {**overrides, **dict(values)}
        try:
            return cls(**merged)
        except DPConfigError as e:  # a bad value: name the file it came from
            raise DPConfigError(e.key, e.value, e.allowed, source, e.fix) from None
        except TypeError as e:  # pragma: no cover - dataclass signature errors are programming errors
            raise DPConfigError("?", merged, str(e), source) from e

    @classmethod
    def from_env(cls, **overrides: Any) -> DPConfig:
        """Read the JSON file named by ``nnUNet_dp_config`` (if set) on top of ``overrides`` (class defaults)."""
        path = os.environ.get(ENV_VAR)
        if not path:
            return cls.from_mapping({}, source="defaults", **overrides)
        if not os.path.isfile(path):
            raise DPConfigError(ENV_VAR, path, "the path of an existing JSON file", "environment")
        with open(path) as f:
            try:
                values = json.load(f)
            except json.JSONDecodeError as e:
                raise DPConfigError(ENV_VAR, path, f"valid JSON ({e})", "environment") from e
        if not isinstance(values, dict):
            raise DPConfigError(ENV_VAR, path, "a JSON object {\"key\": value, ...}", "environment")
        return cls.from_mapping(values, source=path, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """Every setting, the seed included: for use in memory only, never for a file (see `release_dict`)."""
        return dataclasses.asdict(self)

    @property
    def private_randomness(self) -> bool:
        """False when a seed makes noise and sampling reproducible (an explicit "reproducible, not private" mode)."""
        return self.seed is None

    def release_dict(self) -> dict[str, Any]:
        """The settings as written to dp_config.json and checkpoints: the seed is replaced by whether one was used
        (docs/invariants.md, invariant 8: a seed regenerates all noise, so it never goes into a file)."""
        out = {k: v for k, v in self.to_dict().items() if k != "seed"}
        out["private_randomness"] = self.private_randomness
        return out

    def morph_ops(self, num_classes: int, dims: int) -> dict[str, list]:
        """morph_in_training as the network's per-class operations {"label": [op, kernel per axis]} (empty: none)."""
        def kernel(k: int | list[int]) -> list[int]:
            sizes = k if isinstance(k, list) else [k] * dims
            if len(sizes) != dims:
                raise DPConfigError("morph_kernel", k, f"one size or {dims} sizes (one per axis of this configuration)")
            return sizes
        if self.morph_in_training == "none":
            return {}
        if self.morph_in_training in ("open", "close"):
            return {str(c): [self.morph_in_training, kernel(self.morph_kernel)] for c in range(1, num_classes)}
        out = {}
        for label, entry in (self.morph_classes or {}).items():
            op, k = (entry, self.morph_kernel) if isinstance(entry, str) else (entry[0], entry[1] if len(entry) > 1
                                                                             else self.morph_kernel)
            if int(label) >= num_classes:
                raise DPConfigError("morph_classes", {label: entry}, f"labels of this dataset: 1..{num_classes - 1}")
            out[str(int(label))] = [op, kernel(k)]
        return out

    def sampling_rate_for(self, num_cases: int, plans_batch_size: int) -> float:
        """q = sampling_rate if set, else expected_batch_size (default: the plans' batch size) / N."""
        if self.sampling_rate is not None:
            return float(self.sampling_rate)
        ebs = self.expected_batch_size if self.expected_batch_size is not None else plans_batch_size
        return float(ebs) / num_cases

    def check_against_dataset(self, num_cases: int, plans_batch_size: int) -> None:
        """Checks that need N: delta < 1/N and 0 < q <= 1."""
        if num_cases < 1:
            raise DPConfigError("num_training_cases", num_cases, "at least one training case", "dataset split")
        check_delta(self.delta, num_cases)
        q = self.sampling_rate_for(num_cases, plans_batch_size)
        if not 0 < q <= 1:
            key = "sampling_rate" if self.sampling_rate is not None else "expected_batch_size"
            raise DPConfigError(key, getattr(self, key) or plans_batch_size,
                                f"a sampling rate q = expected_batch_size / N in (0, 1]; got q = {q:.4g} "
                                f"with N = {num_cases}")


def check_delta(delta: float, num_cases: int, *, key: str = "delta", source: str = ENV_VAR) -> None:
    """delta < 1/N: a larger delta allows a mechanism that publishes one whole case (the trainer and
    nnUNetv2_dp_privacy --delta give this same message)."""
    if not delta < 1.0 / num_cases:
        raise DPConfigError(key, delta, f"0 < delta < 1/N = {1.0 / num_cases:.3g} (N = {num_cases} training cases); "
                            "use a smaller delta", source)


def _positive(name: str, allow_none: bool = False, integer: bool = False):
    def check(cfg: DPConfig) -> None:
        v = getattr(cfg, name)
        if v is None and allow_none:
            return
        kind = "an integer" if integer else "a number"
        ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
        if isinstance(v, bool) or not ok_type or not math.isfinite(v) or v <= 0:
            raise DPConfigError(name, v, f"{kind} > 0" + (" or null" if allow_none else ""))
    return check


def _choice(name: str, allowed: tuple[str, ...]):
    def check(cfg: DPConfig) -> None:
        v = getattr(cfg, name)
        if v not in allowed:
            raise DPConfigError(name, v, f"one of {', '.join(repr(a) for a in allowed)}")
    return check


def _unit_interval(name: str, lo_open: bool, hi_open: bool, allow_none: bool = False):
    def check(cfg: DPConfig) -> None:
        v = getattr(cfg, name)
        if v is None and allow_none:
            return
        bad = isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
        bad = bad or (v <= 0 if lo_open else v < 0) or (v >= 1 if hi_open else v > 1)
        if bad:
            interval = ("(" if lo_open else "[") + "0, 1" + (")" if hi_open else "]")
            raise DPConfigError(name, v, f"a number in {interval}" + (" or null" if allow_none else ""))
    return check


def _nonneg_int(name: str, allow_none: bool = False):
    def check(cfg: DPConfig) -> None:
        v = getattr(cfg, name)
        if v is None and allow_none:
            return
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise DPConfigError(name, v, "an integer >= 0" + (" or null" if allow_none else ""))
    return check


def _momentum(cfg: DPConfig) -> None:
    v = cfg.momentum
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v < 1:
        raise DPConfigError("momentum", v, "a number in [0, 1) (default 0.9)")


def _transfer_heads(cfg: DPConfig) -> None:
    if not isinstance(cfg.transfer_heads, bool):
        raise DPConfigError("transfer_heads", cfg.transfer_heads, "true or false (default true)")


def _nesterov(cfg: DPConfig) -> None:
    if not isinstance(cfg.nesterov, bool):
        raise DPConfigError("nesterov", cfg.nesterov, "true or false (default true)")
    if cfg.nesterov and cfg.momentum == 0:
        raise DPConfigError("nesterov", cfg.nesterov, "false when momentum is 0 (Nesterov needs momentum)")


def _augmentations(cfg: DPConfig) -> None:
    v = cfg.augmentations_per_case
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_AUGMENTATIONS_PER_CASE:
        raise DPConfigError("augmentations_per_case", v, f"an integer in [1, {MAX_AUGMENTATIONS_PER_CASE}] (default 1: "
                            "one patch per sampled case; K > 1 averages K augmented patches of the case)")


def _seed(cfg: DPConfig) -> None:
    v = cfg.seed
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= SEED_MAX):
        raise DPConfigError("seed", v, "null (default: fresh OS entropy, private) or an integer in [0, 2**63 - 1] "
                            "(reproducible, not private: anyone who knows the seed can regenerate the noise)")


def _accountant(cfg: DPConfig) -> None:
    if cfg.accountant in REFUSED_ACCOUNTANTS:
        raise DPConfigError("accountant", cfg.accountant, REFUSED_ACCOUNTANTS[cfg.accountant])
    _choice("accountant", ACCOUNTANTS)(cfg)


def _lora_combination(cfg: DPConfig) -> None:
    if cfg.trainable == "lora" and cfg.ema_decay is not None:
        raise DPConfigError("ema_decay", cfg.ema_decay, "null with trainable 'lora' (the average of two factors is not "
                            "the factor of the averaged product; average a merged network instead, or use another "
                            "trainable)")


def _projection(cfg: DPConfig) -> None:
    _choice("projection", PROJECTIONS)(cfg)
    if cfg.projection == "public" and cfg.trainable == "lora":
        raise DPConfigError("projection", cfg.projection, "'none' with trainable 'lora' (the public network has no "
                            "adapters to take public gradients of); project 'all', 'decoder' or 'norm_bias'")
    if cfg.projection_samples < cfg.projection_dim:
        raise DPConfigError("projection_samples", cfg.projection_samples, f">= projection_dim = {cfg.projection_dim} "
                            "(a k-dimensional subspace needs at least k public gradients)")
    if cfg.projection_data is not None and not isinstance(cfg.projection_data, str):
        raise DPConfigError("projection_data", cfg.projection_data, "null or the path of a preprocessed folder")


def _odd_sizes(key: str, value: Any) -> list[int]:
    sizes = value if isinstance(value, list) else [value]
    if not sizes or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0 for k in sizes):
        raise DPConfigError(key, value, "an odd integer >= 1 (e.g. 3) or a list of them, one per image axis")
    return sizes


def _morph(cfg: DPConfig) -> None:
    _choice("morph_in_training", MORPH_MODES)(cfg)
    _odd_sizes("morph_kernel", cfg.morph_kernel)
    classes = cfg.morph_classes
    if cfg.morph_in_training == "adaptive" and not classes:
        raise DPConfigError("morph_classes", classes, "a mapping of foreground labels to 'open', 'close' or 'none' "
                            "(optionally [op, kernel]) with morph_in_training 'adaptive', e.g. {\"1\": \"close\", "
                            "\"2\": [\"open\", 5]}: chosen without the private cases (by you, or on public data)")
    if classes is None:
        return
    if not isinstance(classes, dict):
        raise DPConfigError("morph_classes", classes, "null or a mapping {\"label\": op or [op, kernel]}")
    for label, entry in classes.items():
        op, kernel = (entry, cfg.morph_kernel) if isinstance(entry, str) else (list(entry) + [None])[:2]
        if not str(label).isdigit() or int(label) < 1 or op not in ("none", "open", "close"):
            raise DPConfigError("morph_classes", {label: entry}, "a foreground label (integer >= 1) mapped to 'open', "
                                "'close' or 'none', or to [op, kernel]")
        _odd_sizes("morph_classes", cfg.morph_kernel if kernel is None else kernel)


def _privacy_target(cfg: DPConfig) -> None:
    if cfg.target_epsilon is None and cfg.noise_multiplier is None:
        raise DPConfigError("target_epsilon", None, "a number > 0 unless noise_multiplier is given "
                            "(set one of target_epsilon or noise_multiplier)")


def _one_rate(cfg: DPConfig) -> None:
    if cfg.sampling_rate is not None and cfg.expected_batch_size is not None:
        raise DPConfigError("sampling_rate", cfg.sampling_rate, "null when expected_batch_size is set "
                            "(give one of sampling_rate or expected_batch_size)")


_CHECKS = (
    _positive("target_epsilon", allow_none=True), _unit_interval("delta", True, True),
    _positive("noise_multiplier", allow_none=True), _positive("clip_norm"),
    _positive("expected_batch_size", allow_none=True), _unit_interval("sampling_rate", True, False, True),
    _positive("num_epochs", integer=True), _positive("num_iterations_per_epoch", integer=True),
    _nonneg_int("num_val_iterations_per_epoch"), _positive("initial_lr", allow_none=True), _momentum, _nesterov,
    _accountant, _positive("autos_gamma"), _positive("nsgd_r"), _positive("psac_r"),
    _choice("norm_conversion", NORM_CONVERSIONS), _positive("group_norm_groups", integer=True),
    _choice("per_sample_strategy", STRATEGIES), _unit_interval("oversample_foreground_percent", False, False),
    _nonneg_int("alignment_every"), _seed, _positive("save_every", integer=True),
    _choice("trainable", TRAINABLE), _augmentations, _unit_interval("ema_decay", True, True, allow_none=True),
    _transfer_heads, _privacy_target, _one_rate, _positive("lora_rank", integer=True), _lora_combination,
    _positive("projection_dim", integer=True), _positive("projection_samples", integer=True), _projection, _morph,
)
