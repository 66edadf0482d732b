from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest

from joynode.inference.engine import configure_environment
from tests.factories import NodeHome, make_home

# The node's vLLM environment (passive OpenMP threads among it) before any test loads torch.
configure_environment(kv_cache_gib=1.0)


@pytest.fixture
def home(tmp_path: Path) -> NodeHome:
    return make_home(tmp_path / "node")


@pytest.fixture(autouse=True)
def _collect_garbage_in_the_test_that_made_it() -> Iterator[None]:
    """Unclosed resources are reported by the test that leaked them, not a later one."""
    yield
    gc.collect()
