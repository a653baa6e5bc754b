"""The README and the documentation pages match the tree: every relative link resolves, every file path they name
exists, and the invariants page names tests that exist."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
PATH = re.compile(r"(?<![\w/.$-])((?:nnunet_dp|benchmarks|postprocessing|tests|trainers|docs)/[\w/.-]+\.(?:py|sh|json|md|png))")


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        if not (page.parent / target.split("#")[0]).exists():
            broken.append(target)
    assert not broken, f"{page.name}: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_file_paths_named_exist(page):
    missing = sorted({p for p in PATH.findall(page.read_text()) if not (ROOT / p).exists()
                      and not (ROOT / "tests" / p.removeprefix("tests/")).exists()})
    assert not missing, f"{page.name} names files that do not exist: {missing}"


def test_invariants_page_names_existing_tests():
    text = (ROOT / "docs" / "invariants.md").read_text()
    missing = []
    for path, name in re.findall(r"((?:[a-z]+/)?test_\w+\.py)(?:::(\w+))?", text):
        file = ROOT / "tests" / path
        if not file.exists():
            missing.append(path)
        elif name and f"def {name}(" not in file.read_text():
            missing.append(f"{path}::{name}")
    assert not missing, missing
