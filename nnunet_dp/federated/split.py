"""Sites from one nnU-Net dataset (experiments on one machine): a seeded split by patient, or a site map file.

A site map is JSON: {"sites": {"site_a": [case, ...], ...}, "test": [case, ...], "public": [case, ...]} ("public":
optional, cases treated as public data for pretraining a starting model in experiments; in no site). Sites are disjoint (a patient at
two sites would be protected twice with two budgets: not covered, docs/federated.md). Each site gets its own
nnUNet_preprocessed folder holding only its cases (symlinks to the preprocessed files), the server's plans and
dataset.json: what a hospital has after running nnUNetv2_preprocess with the server's plans on its own data.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from nnunet_dp.federated import FederatedError

POOLED = "pooled"  # all sites' cases together: the central-DP and non-private references of an experiment
PUBLIC = "public"  # an experiment's public part: pretraining of the starting model


@dataclass(frozen=True)
class SiteMap:
    sites: dict[str, list[str]]
    test: list[str]
    public: list[str] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict:
        return {"sites": self.sites, "test": self.test, "public": self.public}

    def counts(self) -> str:
        parts = [f"{name}: {len(cases)} patients" for name, cases in self.sites.items()]
        public = f"; public (pretraining): {len(self.public)}" if self.public else ""
        return ", ".join(parts) + f"; test (held out centrally): {len(self.test)}" + public


def split_sites(cases: Sequence[str], *, num_sites: int, test_fraction: float, seed: int,
                fractions: Sequence[float] | None = None, public_fraction: float = 0.0) -> SiteMap:
    """Seeded, disjoint split of patients into a held-out test part, a public part (`public_fraction` of the rest,
    for pretraining in experiments) and `num_sites` sites (equal sizes, or the given relative `fractions`).
    Independent of the order of `cases`."""
    ids = sorted(set(cases))
    if not isinstance(num_sites, int) or num_sites < 1:
        raise FederatedError("--sites", num_sites, "an integer >= 1")
    if not 0 <= test_fraction < 1:
        raise FederatedError("--test-fraction", test_fraction, "a number in [0, 1)")
    weights = np.ones(num_sites) if fractions is None else np.asarray(fractions, dtype=float)
    if len(weights) != num_sites or (weights <= 0).any():
        raise FederatedError("--site-fractions", list(weights), f"{num_sites} positive numbers, one per site")
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    n_test = round(test_fraction * len(ids))
    if not 0 <= public_fraction < 1:
        raise FederatedError("--public-fraction", public_fraction, "a number in [0, 1)")
    n_public = round(public_fraction * (len(ids) - n_test))
    public, rest = order[n_test:n_test + n_public], order[n_test + n_public:]
    if len(rest) < 2 * num_sites:
        raise FederatedError("--sites", num_sites, f"at most {len(rest) // 2} for {len(rest)} training patients "
                             "(each site needs at least 2)", "Use fewer sites or a smaller --test-fraction.")
    bounds = np.round(np.cumsum(weights) / weights.sum() * len(rest)).astype(int)
    starts = np.concatenate([[0], bounds[:-1]])
    sites = {f"site_{k}": sorted(rest[a:b]) for k, (a, b) in enumerate(zip(starts, bounds))}
    return SiteMap(sites=sites, test=sorted(order[:n_test]), public=sorted(public))


def read_site_map(path: str, known: Sequence[str]) -> SiteMap:
    """A site map file, checked: known cases, disjoint sites, each site with at least 2 patients."""
    with open(path) as f:
        raw = json.load(f)
    if not isinstance(raw, dict) or not isinstance(raw.get("sites"), dict):
        raise FederatedError("--site-map", path, 'JSON {"sites": {"name": [case, ...]}, "test": [case, ...]}')
    sites = {str(k): sorted(map(str, v)) for k, v in raw["sites"].items()}
    test, public = sorted(map(str, raw.get("test", []))), sorted(map(str, raw.get("public", [])))
    seen: dict[str, str] = {}
    for name, cases in [*sites.items(), ("test", test), ("public", public)]:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in (POOLED, PUBLIC) and name in sites:
            raise FederatedError("--site-map", name, f"site names of letters, digits, _ . - (not '{POOLED}' or '{PUBLIC}')")
        for case in cases:
            if case in seen:
                raise FederatedError("--site-map", case, f"each patient at one site only (also in {seen[case]})",
                                     "A patient at two sites is not covered by either site's epsilon.")
            seen[case] = name
        if name not in ("test", "public") and len(cases) < 2:
            raise FederatedError("--site-map", f"{name}: {len(cases)} cases", "at least 2 cases per site")
    unknown = sorted(set(seen) - set(known))
    if unknown:
        raise FederatedError("--site-map", unknown[:5], "case identifiers of the preprocessed dataset")
    return SiteMap(sites=sites, test=test, public=public)


def case_files(folder: str, case: str) -> list[str]:
    """The preprocessed files of one case in a configuration's data folder (.b2nd/.npz/.npy/.pkl, seg included)."""
    names = [n for n in os.listdir(folder) if n.split(".")[0] in (case, f"{case}_seg")]
    if not any(n.endswith(".pkl") for n in names):
        raise FederatedError("case", case, f"a case preprocessed in {folder}")
    return sorted(names)


def _link(src: str, dst: str) -> None:
    if os.path.lexists(dst):
        os.remove(dst)
    os.symlink(os.path.abspath(src), dst)


def materialise_site(source: str, target_root: str, cases: Sequence[str], *, data_identifier: str,
                     plans_name: str) -> str:
    """`target_root`/nnUNet_preprocessed/<dataset> holding only `cases` (symlinks into `source`, the preprocessed
    dataset folder), the plans and dataset.json. Returns that dataset folder."""
    target = os.path.join(target_root, "nnUNet_preprocessed", os.path.basename(os.path.normpath(source)))
    data_src, data_dst = os.path.join(source, data_identifier), os.path.join(target, data_identifier)
    if os.path.isdir(data_dst):
        shutil.rmtree(data_dst)
    os.makedirs(data_dst)
    for case in cases:
        for name in case_files(data_src, case):
            _link(os.path.join(data_src, name), os.path.join(data_dst, name))
    for name in (f"{plans_name}.json", "dataset.json"):
        shutil.copyfile(os.path.join(source, name), os.path.join(target, name))
    return target


def preprocessed_cases(source: str, data_identifier: str) -> list[str]:
    folder = os.path.join(source, data_identifier)
    if not os.path.isdir(folder):
        raise FederatedError("preprocessed data", folder, "an existing folder",
                             "Run nnUNetv2_preprocess -d D -plans_name PLANS -c C first.")
    return sorted({n[:-4] for n in os.listdir(folder) if n.endswith(".pkl")})
