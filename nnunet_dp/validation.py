"""Model checks before private training. Returns every problem found, not only the first."""
from __future__ import annotations

from torch import nn

# Layers that combine information across the samples of a batch (or keep statistics of private data outside the
# DP mechanism). Each entry: type -> why it is refused.
_SAMPLE_MIXING: tuple[tuple[type, str], ...] = (
    (nn.modules.batchnorm._BatchNorm, ("BatchNorm normalises with batch statistics (couples cases); use GroupNorm "
                                      "(setting norm_conversion) or InstanceNorm")),
    (nn.SyncBatchNorm, "SyncBatchNorm couples cases across ranks"),
)


def find_problems(model: nn.Module) -> list[str]:
    """Every reason why `model` cannot be trained with per-case DP: sample-mixing layers, norm layers that keep
    running statistics of private data, frozen parameters. An empty list means the model is fine."""
    problems: list[str] = []
    for name, module in model.named_modules():
        for kind, why in _SAMPLE_MIXING:
            if isinstance(module, kind):
                problems.append(f"layer '{name}' ({type(module).__name__}): {why}")
                break
        else:
            if isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats:
                problems.append(f"layer '{name}' ({type(module).__name__}) has track_running_stats=True: its running "
                                f"statistics are computed from private cases without noise; use "
                                f"track_running_stats=False")
    for name, p in model.named_parameters():
        if not p.requires_grad:
            problems.append(f"parameter '{name}' is frozen (requires_grad=False): every parameter must receive a "
                            f"private gradient; unfreeze it or remove it from the model")
    return problems
