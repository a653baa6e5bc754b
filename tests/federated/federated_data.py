"""A tiny preprocessed dataset for the federated tests: synthetic 32x32 binary cases, plans from nnUNetv2_dp_plan
(data-independent), preprocessed case by case in this process (nnU-Net's spawn pool would start a Python per
worker), split into sites by nnunet_dp.federated.split."""
from __future__ import annotations

import json
import os
from pathlib import Path

from nnunet_dp.commands import plan as dp_plan
from nnunet_dp.federated.split import SiteMap, materialise_site, split_sites
from nnunet_dp.synthetic import make_dataset

DS = 975
NAME = f"Dataset{DS}_Fed{DS}"
PLANS = "nnUNetPlans_dp"
CONF = "2d"


def preprocess(root: Path, num_train: int = 12) -> Path:
    """raw + nnUNetv2_dp_plan + per-case preprocessing under `root`; returns the preprocessed dataset folder."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    make_dataset(str(root / "raw"), dataset_id=DS, name=f"Fed{DS}", num_train=num_train, num_test=0, shape=(32, 32),
                 binary=True, seed=DS)
    old = {k: os.environ.get(k) for k in ("nnUNet_raw", "nnUNet_preprocessed")}
    os.environ.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "pre"))
    try:
        dp_plan.main(["-d", NAME, "-c", CONF, "--spacing", "1", "1", "--patch-size", "32", "32", "--normalization",
                      "zscore-per-image", "-p", PLANS, "--features", "4"])
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    pre = root / "pre" / NAME
    plans = load_json(str(pre / f"{PLANS}.json"))
    manager = PlansManager(plans)
    conf = manager.get_configuration(CONF)
    dataset_json = load_json(str(pre / "dataset.json"))
    out = pre / conf.data_identifier
    out.mkdir(parents=True, exist_ok=True)
    cases = get_filenames_of_train_images_and_targets(str(root / "raw" / NAME), dataset_json)
    prep = DefaultPreprocessor(verbose=False)
    for key, files in cases.items():
        prep.run_case_save(str(out / key), files["images"], files["label"], manager, conf, dataset_json)
    return pre


def make_sites(root: Path, pre: Path, num_sites: int = 2, test_fraction: float = 0.0) -> SiteMap:
    plans = json.loads((pre / f"{PLANS}.json").read_text())
    identifier = plans["configurations"][CONF]["data_identifier"]
    cases = sorted({p.name[:-4] for p in (pre / identifier).glob("*.pkl")})
    site_map = split_sites(cases, num_sites=num_sites, test_fraction=test_fraction, seed=0)
    for name, site_cases in site_map.sites.items():
        materialise_site(str(pre), str(root / "sites" / name), site_cases, data_identifier=identifier,
                         plans_name=PLANS)
    return site_map


def plans(pre: Path) -> dict:
    return json.loads((pre / f"{PLANS}.json").read_text())
