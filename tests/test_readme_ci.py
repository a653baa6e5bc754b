"""What the README says is what CI runs: .ci/run contains the README's test command verbatim."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_readme_test_command():
    readme = (ROOT / "README.md").read_text().splitlines()
    head = readme[:next(i for i, line in enumerate(readme) if line.startswith("## "))]  # before the first section
    commands = [line.strip() for line in head if line.startswith("    ")]
    assert len(commands) == 2, "the README starts with two commands: the demo and the tests"
    demo, tests = commands
    assert "nnUNetv2_dp_demo" in demo and "pytest" in tests
    assert tests in (ROOT / ".ci" / "run").read_text()
