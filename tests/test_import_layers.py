"""Imports point one way: core <- integration (nnunet) <- tools <- experiment <- commands. The core never imports
nnunetv2; nothing imports a layer above its own. Checked statically (every import statement, function-level ones too)
and, for nnunetv2, by importing every core module in a fresh interpreter."""
import ast
import subprocess
import sys
from pathlib import Path

import nnunet_dp

ROOT = Path(nnunet_dp.__file__).parent
# the layer of each top-level room, low to high; postprocessing (the DP-Morph plugin, nnunet_dp.postprocessing) and
# federated sit beside tools: they may use the core and the integration
LAYERS = {"core": 0, "nnunet": 1, "postprocessing": 2, "tools": 2, "federated": 2, "experiment": 3, "commands": 4}
PACKAGE_ROOTS = {"nnunet_dp": ROOT, "nnunet_dp.postprocessing": ROOT.parent / "postprocessing"}


def room_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "nnunet_dp" or len(parts) == 1:
        return "core"
    return parts[1] if parts[1] in LAYERS else "core"


def modules() -> dict[str, Path]:
    out = {}
    for name, root in PACKAGE_ROOTS.items():
        if not root.is_dir():
            continue
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            dotted = ".".join([name, *parts])
            out[dotted.removesuffix(".__init__")] = path
    return out


def imported(path: Path, module: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the module's package
                pkg = module.split(".")[: -node.level] if path.name != "__init__.py" else \
                    module.split(".")[: len(module.split(".")) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            names.add(base)
            names |= {f"{base}.{a.name}" for a in node.names}
    return {n for n in names if n.startswith("nnunet_dp")}


def test_core_list_is_complete():
    core = {m for m in modules() if room_of(m) == "core"}
    assert {"nnunet_dp.ema", "nnunet_dp.run", "nnunet_dp.release", "nnunet_dp.lora", "nnunet_dp.projection",
            "nnunet_dp.morph", "nnunet_dp.synthetic", "nnunet_dp.audit.canaries"} <= core


def test_imports_point_down():
    bad = []
    for module, path in modules().items():
        mine = LAYERS[room_of(module)]
        for target in imported(path, module):
            theirs = room_of(target)
            same_side = room_of(module) == theirs
            if not same_side and LAYERS[theirs] >= mine and not (mine == 0 and theirs == "core"):
                bad.append(f"{module} ({room_of(module)}) imports {target} ({theirs})")
    assert not bad, "\n".join(bad)


def test_core_does_not_import_nnunetv2():
    core = sorted(m for m in modules() if room_of(m) == "core")
    code = ("import sys\n" + "".join(f"import {m}\n" for m in core) +
            "bad = [m for m in sys.modules if m.startswith(('nnunetv2', 'batchgenerators', 'dynamic_network'))]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_check_catches_an_upward_import(tmp_path):
    """The checker itself: an integration module importing a command is reported."""
    path = tmp_path / "x.py"
    path.write_text("def f():\n    from nnunet_dp.commands.env import main\n")
    assert "nnunet_dp.commands.env.main" in imported(path, "nnunet_dp.nnunet.x")
    assert LAYERS[room_of("nnunet_dp.commands.env.main")] > LAYERS[room_of("nnunet_dp.nnunet.x")]
