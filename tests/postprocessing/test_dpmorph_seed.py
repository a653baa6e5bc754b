"""Invariant 8 for DP-Morph: a private selection writes no seed and no generator state (postprocessing.json,
postprocessing_scores.json, postprocessing.pkl, console); unseeded it draws fresh OS entropy; -seed is an explicit
"reproducible, not private" mode that the json states."""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from nnunet_dp.postprocessing import search
from nnunet_dp.postprocessing.determine import determine_dp_morph
from nnunet_dp.postprocessing.search import make_candidates, select

from nnunet_dp.commands.determine_postprocessing import build_parser, main
from nnunet_dp.errors import DPError

SEED = 918273645  # distinctive, so its digits can be searched for in every file
KEY_PARTS = ("seed", "rng", "state")
GENERATOR_TYPES = (np.random.Generator, np.random.BitGenerator, np.random.SeedSequence, np.random.RandomState)


def leaks(value: Any, secrets: set[str], where: str = "") -> list[str]:
    """Every place in a (json or unpickled) value with a seed-like key, a generator object or a secret's digits."""
    found = []
    if isinstance(value, GENERATOR_TYPES):
        found.append(f"{where}: {type(value).__name__}")
    elif isinstance(value, dict):
        for key, item in value.items():
            if any(part in str(key).lower() for part in KEY_PARTS):
                found.append(f"{where}/{key}: key")
            found += leaks(key, secrets, f"{where}/{key}[key]") + leaks(item, secrets, f"{where}/{key}")
    elif isinstance(value, (list, tuple, set)):
        for i, item in enumerate(value):
            found += leaks(item, secrets, f"{where}[{i}]")
    elif callable(value):
        found += leaks(f"{value.__module__}.{value.__qualname__}", secrets, where)
    else:
        found += [f"{where}: {value!r} holds {s}" for s in secrets if s in str(value)]
    return found


def files_in(root: Path) -> dict[Path, float]:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def written_leaks(root: Path, before: dict[Path, float], secrets: set[str]) -> list[str]:
    """Search every file written or changed under root since `before`: parsed json/pkl and the raw text."""
    written = [p for p, t in files_in(root).items() if before.get(p) != t]
    assert written, "the run wrote nothing"
    found = []
    for path in written:
        raw = path.read_bytes()
        found += [f"{path.name}: bytes hold {s}" for s in secrets if s.encode() in raw]
        if path.suffix == ".json":
            found += leaks(json.loads(raw), secrets, path.name)
        elif path.suffix == ".pkl":
            found += leaks(pickle.loads(raw), secrets, path.name)
    return found


@pytest.fixture
def drawn(monkeypatch) -> dict[str, list]:
    """Spy on the generators the exponential mechanism gets (entropy, state) and on every np.random.default_rng call."""
    draws: dict[str, list] = {"generators": [], "default_rng_calls": []}
    real_mechanism, real_default_rng = search.exponential_mechanism, np.random.default_rng

    def mechanism(utilities, *, epsilon, sensitivity, rng):
        if not any(g["rng"] is rng for g in draws["generators"]):
            state = rng.bit_generator.state["state"]
            draws["generators"].append({"rng": rng, "entropy": rng.bit_generator.seed_seq.entropy,
                                        "state": [state["state"], state["inc"]]})
        return real_mechanism(utilities, epsilon=epsilon, sensitivity=sensitivity, rng=rng)

    def default_rng(*args, **kwargs):
        draws["default_rng_calls"].append((args, kwargs))
        return real_default_rng(*args, **kwargs)

    monkeypatch.setattr(search, "exponential_mechanism", mechanism)
    monkeypatch.setattr(np.random, "default_rng", default_rng)
    return draws


def secrets_of(draws: dict[str, list], seed: int | None) -> set[str]:
    numbers = [g["entropy"] for g in draws["generators"]] + [s for g in draws["generators"] for s in g["state"]]
    return {str(n) for n in numbers} | ({str(seed)} if seed is not None else set())


def run_private(model: dict[str, Path], out: Path, seed: int | None) -> None:
    args = ["-i", str(model["validation"]), "-ref", str(model["gt"]), "-np", "1", "-radii", "1", "-planes",
            "volumetric", "-epsilon_select", "2", "-o", str(out)]
    main(args + (["-seed", str(seed)] if seed is not None else []))


@pytest.mark.parametrize("seed", [None, SEED], ids=["private", "seeded"])
def test_private_selection_writes_no_seed_or_generator_state(tiny_model, tmp_path, capfd, drawn, seed):
    before = files_in(tmp_path)
    run_private(tiny_model, tmp_path / "pp", seed)
    secrets = secrets_of(drawn, seed)
    assert len(drawn["generators"]) == 1 and len(secrets) >= 3
    assert written_leaks(tmp_path, before, secrets) == []
    console = "".join(capfd.readouterr())
    assert [s for s in secrets if s in console] == []
    privacy = json.loads((tmp_path / "pp" / "postprocessing.json").read_text())["dp_morph"]["privacy"]
    assert privacy["private_selection"] is True and privacy["epsilon_select"] == 2.0
    assert privacy["private_randomness"] is (seed is None)
    seeded_notes = [a for a in privacy["assumptions"] if "reproducible" in a and "does not hold" in a]
    assert len(seeded_notes) == (seed is not None)
    assert ("NOT private" in console) == (seed is not None)


def test_unseeded_runs_build_their_generator_from_os_entropy(tiny_model, tmp_path, drawn):
    for run in range(2):
        run_private(tiny_model, tmp_path / f"pp_{run}", None)
    assert drawn["default_rng_calls"] == [((None,), {})] * 2
    entropies = [g["entropy"] for g in drawn["generators"]]
    assert len(entropies) == 2 and entropies[0] != entropies[1] and min(entropies) > 2 ** 64


def test_unseeded_choices_vary_and_seeded_choices_repeat():
    from nnunet_dp.postprocessing.privacy import selection_generator

    candidates = make_candidates(["opening", "closing"], [1, 2], ["volumetric"])
    alone = every = np.full((4, len(candidates), 3), 0.5)  # equal utilities: each choice uniform over 5 candidates
    labels = (1, 2, 3)

    def choose(seed: int | None) -> tuple[int, ...]:
        selection = select(alone, every, labels, candidates, mode="adaptive", epsilon_select=1e-6,
                           rng=selection_generator(seed))
        return tuple(selection.chosen.values())

    assert len({choose(None) for _ in range(20)}) > 1  # all 20 alike has probability 125 ** -19
    assert len({choose(SEED) for _ in range(5)}) == 1


def test_seed_needs_epsilon_select_and_is_a_non_negative_integer(tiny_model):
    validation, gt = str(tiny_model["validation"]), str(tiny_model["gt"])
    with pytest.raises(DPError, match="seed = 5.*only together with -epsilon_select"):
        determine_dp_morph(validation, gt, num_processes=1, seed=5)
    for bad in (-1, True, 1.5):
        with pytest.raises(DPError, match="seed"):
            determine_dp_morph(validation, gt, num_processes=1, epsilon_select=1.0, seed=bad)


def test_seed_help_says_reproducible_not_private():
    action = next(a for a in build_parser()._actions if "-seed" in a.option_strings)
    assert "NOT private" in action.help and "private_randomness" in action.help and "recorded" not in action.help
