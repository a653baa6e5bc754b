"""Per-epoch pseudo Dice (nnU-Net's validation of each epoch) of training runs, read from their logs, as one plot.

    python benchmarks/finetune_curves.py OUT.png "label=RUN/log.txt" ["label=RUN/log.txt" ...]

Made docs/img/finetune_curves.png from the nnUNetv2_dp_experiment run logs of docs/results.md.
"""
from __future__ import annotations

import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

_PSEUDO = re.compile(r"Pseudo dice \[(.*)\]")
_NUMBER = re.compile(r"\(([-0-9.e]+)\)")


def pseudo_dice(path: str) -> list[float]:
    """Mean over classes of each epoch's `Pseudo dice [np.float32(x), ...]` line."""
    values = []
    with open(path) as f:
        for line in f:
            if (m := _PSEUDO.search(line)) is not None:
                nums = [float(x) for x in _NUMBER.findall(m.group(1))]
                values.append(sum(nums) / len(nums))
    return values


def main(argv: list[str]) -> None:
    if len(argv) < 2 or any("=" not in a for a in argv[1:]):
        sys.exit(__doc__)
    fig, ax = plt.subplots(figsize=(10, 4))
    for label, path in (a.split("=", 1) for a in argv[1:]):
        values = pseudo_dice(path)
        ax.plot(range(len(values)), values, marker="o", ms=3, label=label)
        print(label, [round(v, 3) for v in values])
    ax.set_xlabel("epoch")
    ax.set_ylabel("pseudo Dice (validation patches)")
    ax.set_ylim(-0.02, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(argv[0], dpi=110)


if __name__ == "__main__":
    main(sys.argv[1:])
