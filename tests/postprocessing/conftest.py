"""Fixtures of the DP-Morph tests (data builders live in dpmorph_helpers.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
from dpmorph_helpers import make_case, write_model_folder


@pytest.fixture
def tiny_model(tmp_path: Path) -> dict[str, Path]:
    return write_model_folder(tmp_path / "model", {f"case_{i:03d}": make_case(i) for i in range(4)})
