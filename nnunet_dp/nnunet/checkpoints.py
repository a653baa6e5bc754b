"""What a DP checkpoint may hold: the files meant for release carry no unnoised statistic of the private cases.

nnU-Net stores its logger in every checkpoint: per epoch the mean training loss of the sampled private cases, the
validation loss and pseudo Dice, their moving average, the best of it (`_best_ema`) and the epoch start/end
timestamps (whose spacing depends on how many cases were sampled). None of that is noised. `checkpoint_latest.pth`
keeps it (nnU-Net's `--c` continues the curves from it; it is private, like the training log and progress.png);
`checkpoint_final.pth` and `checkpoint_best.pth`, the files a user releases, get an empty logger instead
(docs/invariants.md, invariant 7). nnU-Net still loads them (`nnUNetv2_predict`, `--val`, `-pretrained_weights`, `--c`).
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

RELEASABLE_CHECKPOINTS: tuple[str, ...] = ("checkpoint_final.pth", "checkpoint_best.pth")
# nnU-Net 2.8's LocalLogger keys (nnunetv2.training.logging.nnunet_logger.LocalLogger.my_fantastic_logging)
LOGGER_KEYS: tuple[str, ...] = ("mean_fg_dice", "ema_fg_dice", "dice_per_class_or_region", "train_losses",
                                "val_losses", "lrs", "epoch_start_timestamps", "epoch_end_timestamps")
RELEASE_MARK = "dp_release"  # True in a checkpoint written for release (its logger is empty)
PRIVATE_ENTRIES: tuple[str, ...] = ("dp_dropped",)  # unnoised counts kept in checkpoint_latest only


def is_releasable(filename: str) -> bool:
    """Whether nnU-Net writes `filename` as a checkpoint a user may release (final, best)."""
    return filename.replace("\\", "/").rsplit("/", 1)[-1] in RELEASABLE_CHECKPOINTS


def empty_logging(keys: Any = LOGGER_KEYS) -> dict[str, list]:
    """An nnU-Net logger checkpoint with no value: what a releasable checkpoint stores under 'logging'."""
    return {k: [] for k in keys}


def for_release(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """A copy of `checkpoint` without the logger's values, `_best_ema` and the unnoised counts."""
    out = {k: v for k, v in checkpoint.items() if k not in PRIVATE_ENTRIES}
    logging = checkpoint.get("logging")
    out["logging"] = empty_logging(logging.keys() if isinstance(logging, dict) else LOGGER_KEYS)
    out["_best_ema"] = None
    out[RELEASE_MARK] = True
    return out


def unreleasable(checkpoint: dict[str, Any]) -> list[str]:
    """The entries of `checkpoint` that are unnoised statistics of the private cases (empty: fit for release)."""
    problems = []
    logging = checkpoint.get("logging")
    if isinstance(logging, dict):
        problems += [f"logging.{k} ({len(v)} values)" for k, v in logging.items() if isinstance(v, list) and v]
    elif logging is not None:
        problems.append(f"logging ({type(logging).__name__})")
    if checkpoint.get("_best_ema") is not None:
        problems.append("_best_ema")
    problems += [k for k in PRIVATE_ENTRIES if k in checkpoint]
    return problems


def padded_logging(logging: dict[str, Any] | None, epochs: int) -> dict[str, list]:
    """The logger a training resumed from a release checkpoint continues: one NaN per epoch already run, so that
    nnU-Net's one-value-per-epoch lists stay aligned (its moving-average pseudo Dice restarts: `restart_ema`)."""
    keys = logging.keys() if isinstance(logging, dict) and logging else LOGGER_KEYS
    return {k: [math.nan] * epochs for k in keys}


def restart_ema(ema: list, mean: list) -> None:
    """After a resume from a release checkpoint the moving average of the pseudo Dice (`ema`, nnU-Net's list, changed
    in place) has no past: nnU-Net would carry NaN forever (0.9 * NaN + ...). Start it again from the epoch's own
    pseudo Dice (`mean`)."""
    if ema and mean and len(ema) == len(mean) and isinstance(ema[-1], float) and math.isnan(ema[-1]):
        ema[-1] = mean[-1]


def walk(obj: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(path, value) of every leaf of nested dicts/lists/tuples (tensors and arrays are leaves)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from walk(v, f"{path}[{i}]")
    else:
        yield path, obj


def build(trainer: Any, filename: str) -> dict[str, Any]:
    """The checkpoint nnUNetTrainerDP writes to `filename`: nnU-Net's entries, the DP state (plan and ledger: never a
    noise generator state or seed), the settings, the records; for final/best without the private entries."""
    from nnunet_dp.nnunet.finetune import checkpoint_weights
    from nnunet_dp.nnunet.selection import lora_entries

    net = trainer._plain_network()
    checkpoint = {
        **checkpoint_weights(net, trainer.dp_ema, filename),  # raw / EMA (finetune)
        "optimizer_state": trainer.optimizer.state_dict(),
        "grad_scaler_state": None,
        "logging": trainer.logger.get_checkpoint(),
        "_best_ema": trainer._best_ema,
        "current_epoch": trainer.current_epoch + 1,
        "init_args": trainer.my_init_kwargs,
        "trainer_name": trainer.__class__.__name__,
        "inference_allowed_mirroring_axes": trainer.inference_allowed_mirroring_axes,
        "dp_state": trainer._dp_setup().state_dict(),
        "dp_config": trainer.dp_config.release_dict(),
        "dp_pretrained": trainer.dp_pretrained,
        "dp_initial_lr": trainer.initial_lr, "dp_lr_rule": trainer.dp_lr_rule,
        "dp_dropped": trainer.dp_dropped,  # unnoised count: checkpoint_latest only
        **lora_entries(net),  # the adapters' factors (trainable lora), for --c
    }
    return for_release(checkpoint) if is_releasable(filename) else checkpoint


def restore_private_counters(trainer: Any, checkpoint: dict) -> None:
    """The dropped-case count and nnU-Net's logger continue from checkpoint_latest; a release checkpoint (final/best)
    holds neither, so the logger restarts with NaN for the epochs run and the count is unknown."""
    if checkpoint.get(RELEASE_MARK):
        trainer.logger.load_checkpoint(padded_logging(checkpoint.get("logging"), trainer.current_epoch))
        trainer.dp_dropped = None
        trainer.print_to_log_file("DP: resumed from a release checkpoint (no training curves, no dropped-case count): "
                                  "the curves restart here and the count of dropped cases is unknown")
    else:
        trainer.dp_dropped = int(checkpoint.get("dp_dropped") or 0)
