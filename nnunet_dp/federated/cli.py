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
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from nnunet_dp.federated import FederatedError, require_flwr
from nnunet_dp.federated.split import SiteMap, materialise_site, preprocessed_cases, read_site_map, split_sites

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


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-d", required=True, help="dataset name or id (nnUNet_preprocessed must hold it, preprocessed)")
    p.add_argument("-c", default="2d", help="configuration. Default: 2d")
    p.add_argument("-p", default="nnUNetPlans_dp", help="plans name (from nnUNetv2_dp_plan). Default: nnUNetPlans_dp")
    p.add_argument("--sites", type=int, default=3, help="number of sites K. Default: 3")
    p.add_argument("-o", required=True, help="output folder")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nnUNetv2_dp_federated", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("split", "simulate", "app"):
        s = sub.add_parser(name)
        _common(s)
        s.add_argument("--site-map", default=None, help='JSON {"sites": {"A": [case, ...]}, "test": [...]}')
        s.add_argument("--test-fraction", type=float, default=0.2, help="patients held out centrally. Default 0.2")
        s.add_argument("--public-fraction", type=float, default=0.0, help="(simulate) part of the other patients "
                       "taken as public data: a non-private model trained on them starts every arm. Default 0")
        s.add_argument("--seed", type=int, default=0, help="seed of the split (public). Default 0")
        s.add_argument("--rounds", type=int, default=10, help="federated rounds. Default 10")
        s.add_argument("--local-steps", type=int, default=5, help="DP steps per site per round. Default 5")
        s.add_argument("--epsilon", type=float, default=8.0, help="target epsilon per site. Default 8")
        s.add_argument("--delta", type=float, default=1e-5, help="delta. Default 1e-5")
        s.add_argument("--expected-batch-size", type=float, default=4.0, help="expected batch per site. Default 4")
        s.add_argument("--mode", choices=("local", "distributed"), default="local", help="(app) noise mode")
        s.add_argument("--pretrained", default=None, help="public nnU-Net checkpoint to start from")
        s.add_argument("--repeats", type=int, default=1, help="(simulate) repeats of every arm. Default 1")
        s.add_argument("--arms", nargs="+", default=None, help="(simulate) subset of: site federated_local "
                       "federated_distributed central nonprivate public. Default: all")
        s.add_argument("--device", default="cpu", help="cpu or cuda. Default cpu")
        s.add_argument("--sampling-rate", type=float, default=None, help="(app, distributed) the common q")
        s.add_argument("--sites-root", default=None, help="(app) site folders for `flwr run` in simulation")
    r = sub.add_parser("report")
    r.add_argument("--federation", required=True, help="the server's federation.json")
    r.add_argument("--site", nargs="+", required=True, metavar="NAME=FOLDER", help="each site's fold folder")
    r.add_argument("--colluding", type=int, default=0, help="sites assumed to collude with the server (secagg)")
    r.add_argument("--delta", type=float, default=1e-5)
    r.add_argument("-o", default=None, help="write federated_privacy.json here (default: print)")
    return p


def _source(args: argparse.Namespace) -> tuple[str, str]:
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    source = os.path.join(str(nnUNet_preprocessed), maybe_convert_to_dataset_name(args.d))
    plans_file = os.path.join(source, f"{args.p}.json")
    if not os.path.isfile(plans_file):
        raise FederatedError("-p", args.p, f"a plans file in {source}", "Run nnUNetv2_dp_plan and nnUNetv2_preprocess.")
    with open(plans_file) as f:
        return source, json.load(f)["configurations"][args.c]["data_identifier"]


def _site_map(args: argparse.Namespace, source: str, identifier: str) -> SiteMap:
    cases = preprocessed_cases(source, identifier)
    if args.site_map:
        return read_site_map(args.site_map, cases)
    return split_sites(cases, num_sites=args.sites, test_fraction=args.test_fraction, seed=args.seed,
                       public_fraction=args.public_fraction)


def _experiment(args: argparse.Namespace, source: str, site_map: SiteMap) -> Experiment:
    from nnunet_dp.federated.simulate import ARMS, Experiment

    arms = tuple(args.arms or ARMS)
    bad = [a for a in arms if a not in ARMS]
    if bad:
        raise FederatedError("--arms", bad, f"names among {ARMS}")
    return Experiment(source=source, configuration=args.c, plans_name=args.p, site_map=site_map, output=args.o,
                      rounds=args.rounds, local_steps=args.local_steps, epsilon=args.epsilon, delta=args.delta,
                      expected_batch_size=args.expected_batch_size, repeats=args.repeats, arms=arms,
                      pretrained=args.pretrained, device=args.device)


def _app(args: argparse.Namespace, source: str) -> None:
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


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "report":
        from nnunet_dp.federated.accounting import federated_report

        with open(args.federation) as f:
            federation = json.load(f)
        sites = dict(s.split("=", 1) for s in args.site)
        text = json.dumps(federated_report(federation, sites, delta=args.delta, colluding=args.colluding), indent=1)
        if args.o is None:
            print(text)
            return
        with open(os.path.join(args.o, "federated_privacy.json"), "w") as f:
            f.write(text)
        return
    source, identifier = _source(args)
    if args.command == "app":
        require_flwr()
        return _app(args, source)
    site_map = _site_map(args, source, identifier)
    print(f"Split of {os.path.basename(source)}: {site_map.counts()}")
    os.makedirs(args.o, exist_ok=True)
    with open(os.path.join(args.o, "site_map.json"), "w") as f:
        json.dump(site_map.to_json(), f, indent=1)
    if args.command == "split":
        for name, cases in site_map.sites.items():
            materialise_site(source, os.path.join(args.o, "sites", name), cases, data_identifier=identifier,
                             plans_name=args.p)
        print(f"Site folders in {args.o}/sites/<site>/nnUNet_preprocessed; the map in {args.o}/site_map.json")
        return
    require_flwr()
    from nnunet_dp.federated.results import run_experiment

    exp = _experiment(args, source, site_map)
    run_experiment(exp)
    with open(os.path.join(args.o, "results.md")) as f:
        print(f.read())


if __name__ == "__main__":  # pragma: no cover
    main()
