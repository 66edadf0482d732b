from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.factories import NodeHome, make_home


@pytest.fixture
def home(tmp_path: Path) -> NodeHome:
    return make_home(tmp_path / "node")


@pytest.fixture(autouse=True)
def _collect_garbage_in_the_test_that_made_it() -> Iterator[None]:
    """Unclosed resources are reported by the test that leaked them, not a later one."""
    yield
    gc.collect()
