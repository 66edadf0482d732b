from __future__ import annotations

from pathlib import Path

import pytest

from tests.factories import NodeHome, make_home


@pytest.fixture
def home(tmp_path: Path) -> NodeHome:
    return make_home(tmp_path / "node")
