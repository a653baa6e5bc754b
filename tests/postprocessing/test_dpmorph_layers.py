"""The pure DP-Morph modules never import nnU-Net or torch (only folders/determine/cli do)."""
from __future__ import annotations

import subprocess
import sys

PURE = ["morphology", "refine", "search", "privacy", "report", "errors"]
FORBIDDEN = ("nnunetv2", "torch", "batchgenerators", "dynamic_network_architectures")


def test_pure_modules_do_not_import_nnunet_or_torch():
    code = ("import sys\n" + "".join(f"import nnunet_dp.postprocessing.{m}\n" for m in PURE)
            + f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
            + "print(bad[:5])\nsys.exit(1 if bad else 0)\n")
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
