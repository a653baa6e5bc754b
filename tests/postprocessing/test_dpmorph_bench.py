"""Smoke test of the morphology benchmark (--quick; no timing assertions)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_morphology.py"


def test_quick_benchmark_runs_and_reports_identical_outputs():
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--radii", "1", "3"], check=False,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert sum("identical: yes" in line for line in lines) == 8  # opening and closing, two radii, two volumes
    assert sum("all within the radius of the border: yes" in line for line in lines) == 4
    assert lines[-1] == "all outputs identical / as documented: yes"
