"""The core (nnunet_dp without nnunet_dp.nnunet) never imports nnunetv2."""
import subprocess
import sys
from pathlib import Path

import nnunet_dp

# every core module, subpackages included (all but nnunet_dp.nnunet), found on disk so none can be forgotten here
ROOT = Path(nnunet_dp.__file__).parent
CORE = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts) for p in ROOT.rglob("*.py")
              if p.relative_to(ROOT).parts[0] != "nnunet" and p.stem != "__init__")


def test_core_list_is_complete():
    assert {"ema", "advise", "bk_groups", "per_sample", "run", "optim", "journal", "release", "audit.estimator",
            "audit.canaries", "audit.mia"} <= set(CORE)


def test_core_does_not_import_nnunetv2():
    code = ("import sys\n" + "".join(f"import nnunet_dp.{m}\n" for m in CORE) +
            "bad = [m for m in sys.modules if m.startswith(('nnunetv2', 'batchgenerators', 'dynamic_network'))]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)
