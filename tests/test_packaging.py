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
    assert {"nnunet_dp.audit", "nnunet_dp.nnunet.audit", "nnunet_dp.nnunet.experiment"} <= on_disk
    assert on_disk == setup_packages()
