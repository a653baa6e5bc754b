"""nnUNetv2_dp_federated: federated DP training of nnU-Net on Flower (docs/federated.md).

    nnUNetv2_dp_federated split    -d D -c 2d -p PLANS --sites K -o OUT     sites by patient (or --site-map FILE)
    nnUNetv2_dp_federated simulate -d D -c 2d -p PLANS --sites K -o OUT     every arm, repeats, results table
    nnUNetv2_dp_federated app      -d D -c 2d -p PLANS --sites K -o APPDIR  a Flower app for `flwr run`
    nnUNetv2_dp_federated report   --federation F.json --site NAME=FOLD_FOLDER ...   federated_privacy.json

The dataset must be planned without data (nnUNetv2_dp_plan) and preprocessed with those plans (nnUNetv2_preprocess
-plans_name PLANS) before `split` and `simulate`. Flower itself (`simulate`, `app`) needs nnunet-dp[federated].
"""

from __future__ import annotations

import argparse
import json
import os
from typing import TYPE_CHECKING

from nnunet_dp.federated import FederatedError
from nnunet_dp.federated.split import SiteMap, preprocessed_cases, read_site_map, split_sites

if TYPE_CHECKING:
    from nnunet_dp.federated.simulate import Experiment

APP_TOML = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "nnunet-dp-federated"
version = "0.1.0"
dependencies = ["nnunet-dp[federated]"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "nnunet-dp"

[tool.flwr.app.components]
serverapp = "nnunet_dp.federated.app:server_app"
clientapp = "nnunet_dp.federated.app:client_app"

[tool.flwr.app.config]
{config}
"""


def source_of(args: argparse.Namespace) -> tuple[str, str]:
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    source = os.path.join(str(nnUNet_preprocessed), maybe_convert_to_dataset_name(args.d))
    plans_file = os.path.join(source, f"{args.p}.json")
    if not os.path.isfile(plans_file):
        raise FederatedError("-p", args.p, f"a plans file in {source}", "Run nnUNetv2_dp_plan and nnUNetv2_preprocess.")
    with open(plans_file) as f:
        return source, json.load(f)["configurations"][args.c]["data_identifier"]


def site_map_of(args: argparse.Namespace, source: str, identifier: str) -> SiteMap:
    cases = preprocessed_cases(source, identifier)
    if args.site_map:
        return read_site_map(args.site_map, cases)
    return split_sites(cases, num_sites=args.sites, test_fraction=args.test_fraction, seed=args.seed,
                       public_fraction=args.public_fraction)


def experiment_of(args: argparse.Namespace, source: str, site_map: SiteMap) -> Experiment:
    from nnunet_dp.federated.simulate import ARMS, Experiment

    arms = tuple(args.arms or ARMS)
    bad = [a for a in arms if a not in ARMS]
    if bad:
        raise FederatedError("--arms", bad, f"names among {ARMS}")
    return Experiment(source=source, configuration=args.c, plans_name=args.p, site_map=site_map, output=args.o,
                      rounds=args.rounds, local_steps=args.local_steps, epsilon=args.epsilon, delta=args.delta,
                      expected_batch_size=args.expected_batch_size, repeats=args.repeats, arms=arms,
                      pretrained=args.pretrained, device=args.device,
                      nonprivate_lr=args.nonprivate_lr)


def build_app(args: argparse.Namespace, source: str) -> None:
    config = {"plans-file": os.path.join(source, f"{args.p}.json"), "dataset-json": os.path.join(source, "dataset.json"),
              "configuration": args.c, "output": os.path.abspath(os.path.join(args.o, "server")),
              "num-sites": args.sites, "rounds": args.rounds, "local-steps": args.local_steps, "mode": args.mode,
              "settings": json.dumps({"target_epsilon": args.epsilon, "delta": args.delta,
                                      "expected_batch_size": args.expected_batch_size}),
              "pretrained": args.pretrained or "", "sampling-rate": args.sampling_rate or 0.0,
              "sites-root": os.path.abspath(args.sites_root) if args.sites_root else ""}
    if args.mode == "distributed" and not args.sampling_rate:
        raise FederatedError("--sampling-rate", None, "the sites' common q for --mode distributed")
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in config.items())
    os.makedirs(args.o, exist_ok=True)
    with open(os.path.join(args.o, "pyproject.toml"), "w") as f:
        f.write(APP_TOML.format(config=lines))
    print(f"Flower app written to {args.o}/pyproject.toml.\nStart: flwr run {args.o} <superlink connection> "
          "(docs/federated.md)")
