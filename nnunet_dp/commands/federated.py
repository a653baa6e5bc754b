"""nnUNetv2_dp_federated: federated DP training of nnU-Net on Flower (docs/federated.md).

This module parses the options; the work is nnunet_dp.federated.command's (its docstring says how)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from nnunet_dp.commands._args import add_device, device_of
from nnunet_dp.federated import require_flwr
from nnunet_dp.federated.command import build_app, experiment_of, site_map_of, source_of
from nnunet_dp.federated.split import materialise_site


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
        s.add_argument("--target-epsilon", "--epsilon", dest="epsilon", type=float, default=8.0, metavar="EPS",
                       help="target epsilon per site. Default 8")
        s.add_argument("--delta", type=float, default=1e-5, help="delta. Default 1e-5")
        s.add_argument("--expected-batch-size", type=float, default=4.0, help="expected batch per site. Default 4")
        s.add_argument("--mode", choices=("local", "distributed"), default="local", help="(app) noise mode")
        s.add_argument("--pretrained", default=None, help="public nnU-Net checkpoint to start from")
        s.add_argument("--nonprivate-lr", type=float, default=0.1, metavar="LR",
                       help="(simulate) lr of the non-private arms (nonprivate_pooled, the public model). Default 0.1")
        s.add_argument("--repeats", type=int, default=1, help="(simulate) repeats of every arm. Default 1")
        s.add_argument("--arms", nargs="+", default=None, help="(simulate) subset of: site federated_local "
                       "federated_distributed central nonprivate public. Default: all")
        add_device(s)
        s.add_argument("--sampling-rate", type=float, default=None, help="(app, distributed) the common q")
        s.add_argument("--sites-root", default=None, help="(app) site folders for `flwr run` in simulation")
    r = sub.add_parser("report")
    r.add_argument("--federation", required=True, help="the server's federation.json")
    r.add_argument("--site", nargs="+", required=True, metavar="NAME=FOLDER", help="each site's fold folder")
    r.add_argument("--colluding", type=int, default=0, help="sites assumed to collude with the server (secagg)")
    r.add_argument("--delta", type=float, default=1e-5, help="delta of the release. Default 1e-5")
    r.add_argument("-o", default=None, help="write federated_privacy.json here (default: print)")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.command != "report":
        args.device = device_of(args)
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
    source, identifier = source_of(args)
    if args.command == "app":
        require_flwr()
        return build_app(args, source)
    site_map = site_map_of(args, source, identifier)
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

    exp = experiment_of(args, source, site_map)
    run_experiment(exp)
    with open(os.path.join(args.o, "results.md")) as f:
        print(f.read())


if __name__ == "__main__":  # pragma: no cover
    main()
