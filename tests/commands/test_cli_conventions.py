"""One command-line convention for every nnUNetv2_dp_* program (docs/layout.md, "User-facing names"): nnU-Net's
-d -c -f -tr -p where a command addresses a trained model, one spelling per option family (--seed,
--epsilon-select, --target-epsilon; EPS and EPOCHS as metavars), help for every option, and the same -device
default everywhere."""
from __future__ import annotations

import argparse
import importlib

import pytest
from test_packaging import PROGRAMS

ADDRESS_A_MODEL = ("privacy", "export", "advise", "alignment", "audit")
FAMILIES = {"seed": "--seed", "epsilon_select": "--epsilon-select", "target_epsilon": "--target-epsilon",
            "epsilons": "--target-epsilon"}


def parsers(program: str) -> list[argparse.ArgumentParser]:
    """The program's parser and its subcommands' parsers."""
    module = importlib.import_module(f"nnunet_dp.commands.{program}")
    top = module.build_parser()
    subs = [a for a in top._actions if isinstance(a, argparse._SubParsersAction)]
    return [top] + [p for s in subs for p in s.choices.values()]


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


@pytest.mark.parametrize("program", PROGRAMS)
def test_every_option_has_help_and_one_spelling_per_family(program):
    for parser in parsers(program):
        for action in options(parser):
            name = "/".join(action.option_strings)
            assert action.help, f"nnUNetv2_dp_{program} {name}: no help"
            if action.dest in FAMILIES:
                assert FAMILIES[action.dest] in action.option_strings, f"nnUNetv2_dp_{program} {name}"
            if "epsilon" in action.dest and action.metavar is not None:
                assert action.metavar == "EPS", f"nnUNetv2_dp_{program} {name}: metavar {action.metavar}"
            if "epoch" in action.dest and action.metavar is not None:
                assert action.metavar == "EPOCHS", f"nnUNetv2_dp_{program} {name}: metavar {action.metavar}"
            if "-device" in action.option_strings:
                assert action.default is None and set(action.choices) == {"cuda", "cpu"}, program


@pytest.mark.parametrize("program", ADDRESS_A_MODEL)
def test_commands_that_address_a_model_take_nnunets_options(program):
    for parser in parsers(program)[-1:] if program == "audit" else parsers(program):
        strings = {s for a in options(parser) for s in a.option_strings}
        assert {"-d", "-c", "-f", "-tr", "-p"} <= strings, program


def test_the_device_default_is_the_same_everywhere(monkeypatch):
    from nnunet_dp.commands import _args

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert _args.default_device() == "cpu"
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert _args.default_device() == "cuda"
