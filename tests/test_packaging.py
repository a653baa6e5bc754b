"""setup.py ships every package folder: an editable install (tests, CI) works without a listed package, a wheel or a
plain `pip install .` would silently lack it."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INSTALLED_AS = {"nnunet_dp": "nnunet_dp", "postprocessing": "nnunet_dp.postprocessing",
                "trainers": "nnunet_dp.trainers"}  # setup.py's package_dir


def setup_packages() -> set[str]:
    call = next(n for n in ast.walk(ast.parse((ROOT / "setup.py").read_text())) if isinstance(n, ast.Call)
                and getattr(n.func, "id", None) == "setup")
    packages = next(k.value for k in call.keywords if k.arg == "packages")
    return {ast.literal_eval(e) for e in packages.elts}


def test_every_package_folder_is_in_setup_py():
    on_disk = {".".join([INSTALLED_AS[top], *init.parent.relative_to(ROOT / top).parts])
               for top in INSTALLED_AS for init in (ROOT / top).rglob("__init__.py")}
    assert {"nnunet_dp.audit", "nnunet_dp.tools.audit", "nnunet_dp.experiment"} <= on_disk
    assert on_disk == setup_packages()


def test_every_data_file_the_package_reads_is_in_package_data():
    """Non-Python files inside nnunet_dp/ (the advisor's law calibration) are listed in package_data, and exist."""
    call = next(n for n in ast.walk(ast.parse((ROOT / "setup.py").read_text())) if isinstance(n, ast.Call)
                and getattr(n.func, "id", None) == "setup")
    data = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "package_data"))
    on_disk = sorted(str(p.relative_to(ROOT / "nnunet_dp")) for p in (ROOT / "nnunet_dp").rglob("*")
                     if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts)
    assert "law_calibration.json" in on_disk
    assert on_disk == sorted(data["nnunet_dp"])


# The programs users type; their names never change (docs/layout.md, "User-facing names").
PROGRAMS = ("demo", "env", "privacy", "determine_postprocessing", "alignment", "benchmark", "experiment", "advise",
            "audit", "plan", "export", "federated")


def test_every_program_is_a_thin_command_module_with_main():
    import importlib

    call = next(n for n in ast.walk(ast.parse((ROOT / "setup.py").read_text())) if isinstance(n, ast.Call)
                and getattr(n.func, "id", None) == "setup")
    entry = next(k.value for k in call.keywords if k.arg == "entry_points")
    scripts = [ast.literal_eval(e) for e in entry.values[0].elts]
    table = dict(s.split("=") for s in scripts)
    assert {f"nnUNetv2_dp_{p}" for p in PROGRAMS} <= set(table)
    for name, target in table.items():
        module, func = target.split(":")
        assert module.startswith("nnunet_dp.commands.") and func == "main", name
        assert callable(importlib.import_module(module).main), name
