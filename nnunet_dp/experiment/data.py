"""nnUNetv2_dp_experiment, the data: nnU-Net's plans and preprocessing of the dataset, and for --public-fraction F the
public part and the two derived datasets it needs.

--public-fraction F: after the held-out test split, a seeded (--seed), disjoint, case-level public part of the
remaining cases (one nnU-Net case = one patient = the privacy unit) is drawn; the rest is private (fold 0's train/val).
Both become raw datasets of symlinks in OUT/nnUNet_raw (beside a link to the user's dataset; the user's nnUNet_raw is
never written), with ids no other dataset in the experiment's own folders has. Then, with nnU-Net's own commands as
README's "Public → private" block: plan_and_preprocess the public dataset (its plans carry the budget's patch and
network), extract the private fingerprint, move the public plans into the private dataset (PUBLIC_PLANS), copy its
dataset.json into its preprocessed folder (nnU-Net's planner would; MIC-DKFZ/nnUNet#2560), preprocess the private
cases with the moved plans. Every subprocess sees only the experiment's folders (data_env), so ids cannot clash with
the user's other datasets.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from os.path import isdir, isfile, join
from typing import Any

import numpy as np

from nnunet_dp.experiment.errors import ExperimentError
from nnunet_dp.experiment.plan import link_test_cases, write_budget_plans

PUBLIC_PLANS = "nnUNetPlans_public"  # the public plans as moved into the private dataset (nnUNetv2_train -p)
PLANNED_COPY = "nnUNetPlans.planned.json"  # the public dataset's plans as nnU-Net made them (before the budget's)
MIN_PUBLIC, MIN_PRIVATE = 2, 2  # public cases; private cases (at least one training and one validation case)
DERIVED_IDS = (999, 998, 997)  # the public and private datasets take the first two that are not the user's id
_PUBLIC_STREAM = 1  # the public split's generator: np.random.default_rng([seed, 1]) (the test split's is [seed])


# ---- nnU-Net's commands -------------------------------------------------------------------------------------------
def dataset_id(name: str) -> str:
    return name[len("Dataset"):len("Dataset") + 3]


def nnunet_command(cmd: list[str], env: dict[str, str], log: str, what: str) -> None:
    from nnunet_dp.experiment.run import run_command
    from nnunet_dp.tools.demo import planning_env

    print(f"{what}: {' '.join(cmd)} (log: {log})", flush=True)
    run_command(cmd, planning_env(env), log)


def ensure_plans(name: str, configuration: str, env: dict[str, str], log: str) -> str:
    """The dataset's nnUNetPlans.json; fingerprint and plans with nnU-Net's command (no preprocessing) if missing."""
    plans_file = join(env["nnUNet_preprocessed"], name, "nnUNetPlans.json")
    if not isfile(plans_file):
        nnunet_command(["nnUNetv2_plan_and_preprocess", "-d", dataset_id(name), "-c", configuration, "--no_pp",
                        "-npfp", "2"], env, log, "Planning")
    return plans_file


def ensure_preprocessed(name: str, configuration: str, env: dict[str, str], log: str,
                        plans_name: str = "nnUNetPlans") -> str:
    """The dataset's preprocessed folder; preprocesses CONFIG with nnU-Net's command if its data are missing (plans
    first if nnUNetPlans are missing too)."""
    folder = join(env["nnUNet_preprocessed"], name)
    plans_file = ensure_plans(name, configuration, env, log) if plans_name == "nnUNetPlans" else \
        join(folder, plans_name + ".json")
    with open(plans_file) as f:
        configs = json.load(f)["configurations"]
    if configuration not in configs:
        raise ExperimentError("-c", configuration, f"a configuration of {plans_file}: {sorted(configs)}")
    data_id = configs[configuration].get("data_identifier", f"{plans_name}_{configuration}")
    if not (isdir(join(folder, data_id)) and os.listdir(join(folder, data_id))):
        nnunet_command(["nnUNetv2_preprocess", "-d", dataset_id(name), "-c", configuration, "-np", "2",
                        *(["-plans_name", plans_name] if plans_name != "nnUNetPlans" else [])], env, log,
                       "Preprocessing")
    return folder


# ---- the public part ----------------------------------------------------------------------------------------------
def public_count(fraction: float, num_cases: int) -> int:
    """round(F × M), halves up."""
    return math.floor(fraction * num_cases + 0.5)


def check_public_fraction(fraction: float, num_cases: int) -> None:
    """F in (0, 1) leaving at least MIN_PUBLIC public and MIN_PRIVATE private cases of the M non-test cases."""
    what = "the share of the non-test cases drawn as public data"
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ExperimentError("--public-fraction", fraction, f"a number strictly between 0 and 1 ({what})",
                              "E.g. --public-fraction 0.3.")
    n = public_count(fraction, num_cases)
    if n < MIN_PUBLIC or num_cases - n < MIN_PRIVATE:
        low, high = (MIN_PUBLIC - 0.5) / num_cases, (num_cases - MIN_PRIVATE + 0.5) / num_cases
        allowed = (f"{low:.3f} <= F < {high:.3f} here" if low < high else "no value: the dataset is too small")
        raise ExperimentError("--public-fraction", fraction, f"{what} leaving at least {MIN_PUBLIC} public cases and "
                              f"at least {MIN_PRIVATE} private ones (one training, one validation) of the {num_cases} "
                              f"non-test cases: {allowed} (F = {fraction:g} gives {n} public, {num_cases - n} "
                              "private)", "Choose F in that range, lower --test-fraction, or use a dataset with more "
                              "cases.")


def split_public(split: dict[str, list[str]], *, public_fraction: float, seed: int,
                 val_fraction: float = 0.2) -> dict[str, list[str]]:
    """After the held-out test split (`split`'s test stays as it is): a seeded, disjoint, case-level public part of
    the other cases (round(F × M) of them), and fold 0's validation and training cases from the private rest.
    Independent of the input order; the same seed gives the same parts."""
    rest = sorted(set(split["train"]) | set(split["val"]))
    check_public_fraction(public_fraction, len(rest))
    order = np.random.default_rng([seed, _PUBLIC_STREAM]).permutation(len(rest))
    n_public = public_count(public_fraction, len(rest))
    private = order[n_public:]
    n_val = min(max(1, round(val_fraction * len(private))), len(private) - 1)
    pick = lambda idx: sorted(rest[i] for i in idx)
    return {"test": sorted(split["test"]), "public": pick(order[:n_public]), "val": pick(private[:n_val]),
            "train": pick(private[n_val:])}


def public_mode(args: Any) -> bool:
    """The runs fine-tune from a public model trained inside the experiment (--public-fraction / --public-dataset)."""
    return args.public_fraction is not None or getattr(args, "public_dataset", None) is not None


def raw_dataset(option: str, name_or_id: str) -> tuple[str, str]:
    """(DatasetXXX_Name, its folder in nnUNet_raw) of -d or --public-dataset, with an error naming the option."""
    from nnunetv2.paths import nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        name = maybe_convert_to_dataset_name(name_or_id if not name_or_id.isdigit() else int(name_or_id))
    except RuntimeError as error:
        raise ExperimentError(option, name_or_id, "a dataset in nnUNet_raw", str(error).splitlines()[0]) from error
    raw = join(nnUNet_raw, name)
    if not isfile(join(raw, "dataset.json")) or not isdir(join(raw, "labelsTr")):
        raise ExperimentError(option, name_or_id, f"a raw dataset with dataset.json and labelsTr in {raw}")
    return name, raw


def raw_cases(raw: str) -> list[str]:
    """The case identifiers of a raw dataset (its labelsTr)."""
    with open(join(raw, "dataset.json")) as f:
        ending = json.load(f)["file_ending"]
    return sorted(f[:-len(ending)] for f in os.listdir(join(raw, "labelsTr")) if f.endswith(ending))


def split_public_dataset(split: dict[str, list[str]], public_cases: list[str], *, public_fraction: float | None,
                         seed: int, public_name: str, dataset: str) -> dict[str, list[str]]:
    """--public-dataset P: the public part's identifiers. Without shared identifiers every case of P is public; with
    them (P derived from the same patients, e.g. other labels), --public-fraction draws the public patients from -d's
    non-test cases (split_public) and P must hold them. Either way no public identifier is a private training,
    validation or test case (checked: disjoint_counts)."""
    private_side = set(split["train"]) | set(split["val"]) | set(split["test"])
    shared = sorted(set(public_cases) & private_side)
    if public_fraction is None:
        if shared:
            raise ExperimentError("--public-dataset", public_name, f"a dataset none of whose case identifiers is one of "
                                  f"{dataset}'s ({len(shared)} are, e.g. {shared[:3]})", "It holds the same patients: "
                                  "give --public-fraction F too, to draw the public patients from them by identifier.")
        return {**split, "public": sorted(public_cases)}
    parts = split_public(split, public_fraction=public_fraction, seed=seed)
    missing = sorted(set(parts["public"]) - set(public_cases))
    if missing:
        raise ExperimentError("--public-dataset", public_name, f"a dataset holding the {len(parts['public'])} public "
                              f"identifiers drawn from {dataset} ({len(missing)} missing, e.g. {missing[:3]})",
                              "Give a public dataset with the same case identifiers, or leave out --public-fraction.")
    return parts


def disjoint_counts(parts: dict[str, list[str]]) -> str:
    """The check that no public case is a private or test case, as a line to print; raises on an overlap."""
    public = set(parts["public"])
    overlap = {k: sorted(public & set(parts[k])) for k in ("train", "val", "test")}
    if any(overlap.values()):
        bad = {k: v[:3] for k, v in overlap.items() if v}
        raise ExperimentError("public part", sorted(public)[:3], f"identifiers in none of the private training, "
                              f"validation or test cases (shared: {bad})")
    return (f"public cases: {len(public)}, in none of the {len(parts['train'])} private training, "
            f"{len(parts['val'])} validation and {len(parts['test'])} test cases (checked by identifier)")


# ---- the derived datasets ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PublicData:
    """The experiment's own nnU-Net folders and the two derived datasets of --public-fraction."""

    out: str
    public: str  # DatasetXXX_<name>Public
    private: str  # DatasetYYY_<name>Private

    @property
    def raw(self) -> str:
        return join(self.out, "nnUNet_raw")

    @property
    def preprocessed(self) -> str:
        return join(self.out, "nnUNet_preprocessed")

    @property
    def results(self) -> str:
        """nnUNet_results of the public pretraining."""
        return join(self.out, "public", "nnUNet_results")

    def env(self, env: dict[str, str]) -> dict[str, str]:
        """`env` with nnU-Net's three folders in OUT: a subprocess sees no other dataset than the experiment's."""
        return {**env, "nnUNet_raw": self.raw, "nnUNet_preprocessed": self.preprocessed, "nnUNet_results": self.results}


def derived_datasets(out: str, dataset: str) -> PublicData:
    """The derived datasets' names: ids from DERIVED_IDS other than the user's. Stops if the experiment's own folders
    hold another dataset with one of these ids (nnU-Net would not know which one an id means)."""
    ids = [i for i in DERIVED_IDS if f"{i:03d}" != dataset_id(dataset)][:2]
    base = dataset[len("Dataset") + 4:]
    data = PublicData(out, f"Dataset{ids[0]:03d}_{base}Public", f"Dataset{ids[1]:03d}_{base}Private")
    for name in (data.public, data.private):
        prefix = name[:len("Dataset") + 3]
        for root in (data.raw, data.preprocessed, data.results):
            other = sorted(n for n in (os.listdir(root) if isdir(root) else []) if n.startswith(prefix) and n != name)
            if other:
                raise ExperimentError("-o", out, f"an output folder whose own nnU-Net folders hold no other dataset "
                                      f"with id {prefix[len('Dataset'):]} ({join(root, other[0])} exists; the "
                                      f"experiment names its derived dataset {name})",
                                      "Use a new output folder (-o), or remove that folder.")
    return data


def write_raw_dataset(source: str, target: str, cases: Sequence[str], file_ending: str) -> None:
    """`target` = a raw dataset of `cases` only: symlinks to `source`'s images and labels, its dataset.json with
    numTraining. Links of cases not in `cases` are removed (the folder holds links only)."""
    for sub in ("imagesTr", "labelsTr"):
        if isdir(join(target, sub)):
            shutil.rmtree(join(target, sub))
    link_test_cases(source, list(cases), file_ending, join(target, "imagesTr"), join(target, "labelsTr"))
    with open(join(source, "dataset.json")) as f:
        dataset_json = json.load(f)
    with open(join(target, "dataset.json"), "w") as f:
        json.dump({**dataset_json, "numTraining": len(cases)}, f, indent=2)


def plan_public(data: PublicData, dataset: str, raw: str, parts: dict[str, list[str]], file_ending: str,
                configuration: str, env: dict[str, str], log: str, public_raw: str | None = None) -> str:
    """The derived raw datasets, and the public dataset's plans as nnU-Net makes them (fingerprint and plans, no
    preprocessing; kept as PLANNED_COPY). Returns that plans file."""
    os.makedirs(data.raw, exist_ok=True)
    link = join(data.raw, dataset)
    if not os.path.lexists(link):
        os.symlink(os.path.abspath(raw), link)
    if public_raw is None:
        write_raw_dataset(raw, join(data.raw, data.public), parts["public"], file_ending)
    else:  # --public-dataset: its images and labels, its dataset.json (labels, file ending)
        with open(join(public_raw, "dataset.json")) as f:
            public_ending = json.load(f)["file_ending"]
        write_raw_dataset(public_raw, join(data.raw, data.public), parts["public"], public_ending)
    write_raw_dataset(raw, join(data.raw, data.private), parts["train"] + parts["val"], file_ending)
    planned = join(data.preprocessed, data.public, PLANNED_COPY)
    if not isfile(planned):
        shutil.copyfile(ensure_plans(data.public, configuration, data.env(env), log), planned + ".tmp")
        os.replace(planned + ".tmp", planned)
    return planned


def prepare_public(data: PublicData, parts: dict[str, list[str]], configuration: str, env: dict[str, str], log: str,
                   features: Sequence[int] | None, patch_size: Sequence[int] | None) -> None:
    """The public dataset's plans with the budget's patch and network, its preprocessing; the private dataset's
    fingerprint, the moved public plans (PUBLIC_PLANS), its preprocessing with them and its splits_final.json (fold
    0 = the private training and validation cases). Each step is skipped when its output exists."""
    sub_env = data.env(env)
    public, private = join(data.preprocessed, data.public), join(data.preprocessed, data.private)
    write_budget_plans(join(public, PLANNED_COPY), join(public, "nnUNetPlans.json"), configuration, features,
                       patch_size)
    ensure_preprocessed(data.public, configuration, sub_env, log)
    if not isfile(join(private, "dataset_fingerprint.json")):
        nnunet_command(["nnUNetv2_extract_fingerprint", "-d", dataset_id(data.private), "-np", "2"], sub_env, log,
                       "Private fingerprint (copied by nnU-Net's trainer; the plans do not use it)")
    moved = join(private, PUBLIC_PLANS + ".json")
    if not isfile(moved) or os.path.getmtime(moved) < os.path.getmtime(join(public, "nnUNetPlans.json")):
        nnunet_command(["nnUNetv2_move_plans_between_datasets", "-s", dataset_id(data.public), "-t",
                        dataset_id(data.private), "-sp", "nnUNetPlans", "-tp", PUBLIC_PLANS], sub_env, log,
                       "Public plans -> private dataset")
    # nnUNetv2_preprocess reads dataset.json from the preprocessed folder, which only nnU-Net's planner writes there
    # (MIC-DKFZ/nnUNet#2560): the private dataset's own (its labels), as the planner would copy it
    shutil.copyfile(join(data.raw, data.private, "dataset.json"), join(private, "dataset.json"))
    ensure_preprocessed(data.private, configuration, sub_env, log, plans_name=PUBLIC_PLANS)
    with open(join(private, "splits_final.json"), "w") as f:
        json.dump([{"train": parts["train"], "val": parts["val"]}], f, indent=1)
