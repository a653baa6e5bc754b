"""nnUNetv2_dp_experiment, the fine-tuning levers of a DP run: `trainable`, `augmentations_per_case` and
`ema_decay`, one or more values each (--trainable, --augmentations-per-case, --ema-decay), and --seeds K.

None of the levers costs privacy: the unit stays the case and the sensitivity C. Each value is checked with the DP
trainers' own DPConfig before any work; a run's settings file gets a lever's key only where it differs from the
trainers' default, so run names and settings files of a grid without levers stay as they were.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nnunet_dp.config import TRAINABLE, DPConfig
from nnunet_dp.errors import DPConfigError
from nnunet_dp.experiment.errors import ExperimentError

_DEFAULT = DPConfig()
NO_EMA = ("none", "null", "off")  # --ema-decay words for "no average" (the trainers' default)


@dataclass(frozen=True)
class Levers:
    """One combination of the levers; the defaults are the DP trainers' (DPConfig)."""

    trainable: str = _DEFAULT.trainable
    augmentations_per_case: int = _DEFAULT.augmentations_per_case
    ema_decay: float | None = _DEFAULT.ema_decay
    lora_rank: int | None = None  # with trainable lora (None: the trainers' default rank)
    projection_dim: int | None = None  # projection public with this k (None: no projection)
    morph: str = _DEFAULT.morph_in_training  # DP-Morph inside training (close / open on every foreground class)

    def settings(self) -> dict[str, Any]:
        """The nnUNet_dp_config keys of the levers that differ from the trainers' defaults."""
        out: dict[str, Any] = {}
        if self.trainable != _DEFAULT.trainable:
            out["trainable"] = self.trainable
        if self.trainable == "lora" and self.lora_rank is not None:
            out["lora_rank"] = self.lora_rank
        if self.projection_dim is not None:
            out.update(projection="public", projection_dim=self.projection_dim)
        if self.morph != _DEFAULT.morph_in_training:
            out["morph_in_training"] = self.morph
        if self.augmentations_per_case != _DEFAULT.augmentations_per_case:
            out["augmentations_per_case"] = self.augmentations_per_case
        if self.ema_decay != _DEFAULT.ema_decay:
            out["ema_decay"] = self.ema_decay
        return out

    @property
    def suffix(self) -> str:
        """Run-name part of the non-default levers: '_norm_bias_k4_ema0.999' ('' for the defaults)."""
        s = self.settings()
        parts = [s["trainable"] + (str(s["lora_rank"]) if "lora_rank" in s else "")] if "trainable" in s else []
        parts += [f"proj{s['projection_dim']}"] if "projection_dim" in s else []
        parts += [f"morph{s['morph_in_training']}"] if "morph_in_training" in s else []
        parts += [f"k{s['augmentations_per_case']}"] if "augmentations_per_case" in s else []
        parts += [f"ema{s['ema_decay']:g}"] if "ema_decay" in s else []
        return "".join(f"_{p}" for p in parts)

    @property
    def label(self) -> str:
        """'defaults', or e.g. 'norm_bias, K=4, EMA 0.999' (tables)."""
        s = self.settings()
        parts = [s["trainable"] + (f" r={s['lora_rank']}" if "lora_rank" in s else "")] if "trainable" in s else []
        parts += [f"projection k={s['projection_dim']}"] if "projection_dim" in s else []
        parts += [f"DP-Morph in training: {s['morph_in_training']}"] if "morph_in_training" in s else []
        parts += [f"K={s['augmentations_per_case']}"] if "augmentations_per_case" in s else []
        parts += [f"EMA {s['ema_decay']:g}"] if "ema_decay" in s else []
        return ", ".join(parts) or "defaults"


DEFAULT_LEVERS = Levers()


def _through_dpconfig(option: str, key: str, value: Any, allowed: str) -> None:
    """The DP trainers' own check of one value; its refusal as an error naming the option."""
    try:
        DPConfig.from_mapping({key: value}, source=option)
    except DPConfigError as error:
        raise ExperimentError(option, value, f"{allowed} ({error.allowed})",
                         f"Each value becomes the DP setting '{key}' of the runs it names.") from error


def ema_value(text: str | float | None) -> float | None:
    """--ema-decay's value: none/null/off (no average) or a number."""
    if text is None or (isinstance(text, str) and text.strip().lower() in NO_EMA):
        return None
    try:
        return float(text)
    except (TypeError, ValueError) as error:
        raise ExperimentError("--ema-decay", text, "'none' or a number in (0, 1), e.g. 0.999",
                         "Give one or more values: --ema-decay none 0.999.") from error


def _distinct(option: str, values: Sequence[Any], label: Any) -> list[Any]:
    unique = list(dict.fromkeys(values))
    if len({label(v) for v in unique}) < len(unique):
        raise ExperimentError(option, list(values), "values that differ in their first 6 significant digits (run names)")
    if not unique:
        raise ExperimentError(option, list(values), "at least one value")
    return unique


def lever_grid(trainable: Sequence[str] = (_DEFAULT.trainable,), augmentations: Sequence[int] = (1,),
               ema: Sequence[str | float | None] = (None,), *, dp_rules: bool = True, lora_ranks: Sequence[int] = (),
               projection_dims: Sequence[int] = (), morph: Sequence[str] = ("none",)) -> list[Levers]:
    """The cross product trainable × augmentations_per_case × ema_decay, in the given orders, every value checked
    through DPConfig. Non-default values need DP rules (the non-private reference is never given DP levers)."""
    for value in trainable:
        _through_dpconfig("--trainable", "trainable", value, f"one or more of {list(TRAINABLE)}")
    for value in augmentations:
        _through_dpconfig("--augmentations-per-case", "augmentations_per_case", value, "one or more integers")
    decays = [ema_value(v) for v in ema]
    for value in decays:
        _through_dpconfig("--ema-decay", "ema_decay", value, "'none' or numbers in (0, 1)")
    trainable = _distinct("--trainable", trainable, str)
    augmentations = _distinct("--augmentations-per-case", augmentations, int)
    decays = _distinct("--ema-decay", decays, lambda d: "none" if d is None else f"{d:g}")
    for rank in lora_ranks:
        _through_dpconfig("--lora-ranks", "lora_rank", rank, "one or more integers >= 1")
    for dim in projection_dims:
        _through_dpconfig("--projection-dims", "projection_dim", dim, "one or more integers >= 1")
    for value in morph:
        _through_dpconfig("--morph-in-training", "morph_in_training", value, "one or more of none, close, open")
    morphs = _distinct("--morph-in-training", morph, str)
    ranks = [None] if not lora_ranks else _distinct("--lora-ranks", lora_ranks, int)
    grid = [Levers(t, k, d, lora_rank=r, morph=m) for t in trainable for r in (ranks if t == "lora" else [None])
            for k in augmentations for d in decays for m in morphs]
    # projection: every parameter trained, the noise in the public subspace (and on the heads the public model lacks)
    dims = _distinct("--projection-dims", projection_dims, int) if projection_dims else []
    grid += [Levers("all", k, d, projection_dim=p) for p in dims for k in augmentations for d in decays]
    if not dp_rules and any(lev != DEFAULT_LEVERS for lev in grid):
        option = next(o for o, vals, default in (("--trainable", trainable, _DEFAULT.trainable),
                                                 ("--augmentations-per-case", augmentations, 1),
                                                 ("--ema-decay", decays, None)) if vals != [default])
        raise ExperimentError(option, [lev.label for lev in grid], "DP rules in --rules too (the non-private reference "
                         "is never given DP levers)", "Add a DP rule to --rules, or drop the option.")
    return grid


def reference_grid(trainable: Sequence[str] = (_DEFAULT.trainable,), *, reference: bool = True,
                   lora_rank: int | None = None) -> list[Levers]:
    """--reference-trainable: the non-private references, always `all` first (nnU-Net's ordinary training, the
    reference every ratio divides by), then one per other value, e.g. `norm_bias` (the DP setting's selection trained
    without noise: what that subset can hold at all). Checked through DPConfig like --trainable; values other than
    `all` need the reference in --rules."""
    for value in trainable:
        _through_dpconfig("--reference-trainable", "trainable", value, f"one or more of {list(TRAINABLE)}")
    unique = [_DEFAULT.trainable, *(t for t in _distinct("--reference-trainable", trainable, str)
                                    if t != _DEFAULT.trainable)]
    if not reference and unique != [_DEFAULT.trainable]:
        raise ExperimentError("--reference-trainable", list(trainable), "'nonprivate' in --rules too (it names the "
                              "non-private reference's trained parameters)", "Add nonprivate to --rules, or drop the "
                              "option.")
    return [Levers(trainable=t, lora_rank=lora_rank if t == "lora" else None) for t in unique]


def check_seeds(seeds: Any) -> int:
    """--seeds K: an integer >= 1 (each run repeated K times)."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ExperimentError("--seeds", seeds, "an integer >= 1 (each run is repeated K times: fresh OS entropy per "
                         "repeat, or seed --seed + k - 1 under --reproducible)", "Use --seeds 3, say.")
    return seeds
