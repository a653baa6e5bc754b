"""The core (nnunet_dp without nnunet_dp.nnunet) never imports nnunetv2."""
import subprocess
import sys

CORE = ["accounting", "alignment", "alignment_report", "benchmark", "bookkeeping", "config", "errors", "layers",
        "noise", "per_sample", "plots", "rules", "run", "sampling", "step", "validation"]


def test_core_does_not_import_nnunetv2():
    code = ("import sys\n" + "".join(f"import nnunet_dp.{m}\n" for m in CORE) +
            "bad = [m for m in sys.modules if m.startswith(('nnunetv2', 'batchgenerators', 'dynamic_network'))]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)
