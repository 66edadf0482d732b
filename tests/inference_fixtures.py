"""One real vLLM engine on the tiny model, shared by the whole test session.

Starting vLLM takes seconds, so the engine lives for the session on its own
asyncio thread; each test (its own trio run) borrows it through
``InferenceService(engines=...)``, which never stops a borrowed engine.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from joynode.config import InferenceSection, ModelEntry
from joynode.inference.engine import EngineSpec, VllmEngine
from joynode.inference.models import prepare
from tests.factories import NodeHome

TINY_MAX_MODEL_LEN = 256


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "tiny"
    prepare("tiny", out, report=lambda _: None)
    return out


def small_engine(home: NodeHome) -> NodeHome:
    """A node home whose vLLM engines are as small as the tiny model allows."""
    home.set("inference", "max_model_len", str(TINY_MAX_MODEL_LEN))
    home.set("inference", "kv_cache_gib", "0.25")
    home.set("inference", "max_num_seqs", "4")
    return home


def tiny_settings(tiny_model: Path, **overrides: object) -> InferenceSection:
    settings = InferenceSection(
        models=[ModelEntry(name="tiny", path=tiny_model)],
        max_num_seqs=16,
        max_model_len=TINY_MAX_MODEL_LEN,
        max_tokens_limit=200,
    )
    return settings.model_copy(update=overrides)


@pytest.fixture(scope="session")
def tiny_engine(tiny_model: Path) -> Iterator[VllmEngine]:
    settings = tiny_settings(tiny_model)
    engine = VllmEngine(
        EngineSpec(
            tiny_model,
            "float32",
            "auto",
            settings.max_num_seqs,
            settings.max_model_len,
            settings.kv_cache_gib,
        )
    )
    trio.run(engine.start)
    yield engine
    trio.run(engine.stop)
