"""The synthetic domain-shift benchmark of the private-adaptation results: a public site and a private site that image
the same kind of objects (a disk, label 1, and a ring, label 2) differently.

    python benchmarks/domain_shift_data.py $nnUNet_raw            # writes Dataset971_ShiftPublic, Dataset972_ShiftPrivate
    nnUNetv2_dp_experiment -d 972 -c 2d --public-dataset 971 --rules nonprivate flat --epsilons 1 8 \
        --trainable all norm_bias heads lora --lora-ranks 2 8 --projection-dims 16 64 --seeds 3 -o shift

Public site: the package's easy appearance (ring 2.5 brighter than disk 1.5 over noise 0.6). Private site: the
contrast reversed and weaker (disk 0.9, ring 0.6), more noise (0.8), an intensity offset (which nnU-Net's z-score
removes) and objects 0.8x the size. Same labels, so the public segmentation heads transfer; different case
identifiers (public case_000.., private case_5000..), so every public case is public and none is private.
"""
from __future__ import annotations

import sys

from nnunet_dp.synthetic import Appearance, make_dataset

PUBLIC = Appearance()
PRIVATE = Appearance(intensities=(0.9, 0.6), noise=0.8, offset=0.5, radius_scale=0.8)


def main(raw: str, public_cases: int = 300, private_cases: int = 300) -> None:
    make_dataset(raw, dataset_id=971, name="ShiftPublic", num_train=public_cases, num_test=0, shape=(48, 48), seed=971,
                 appearance=PUBLIC)
    make_dataset(raw, dataset_id=972, name="ShiftPrivate", num_train=private_cases, num_test=0, shape=(48, 48),
                 seed=972, appearance=PRIVATE, first_case=5000)


if __name__ == "__main__":
    main(sys.argv[1])
