"""Real vLLM engines shared by the whole test session: the tiny model, and SmolLM2.

Starting vLLM takes seconds, so each engine lives for the session on its own
asyncio thread; each test (its own trio run) borrows it through
``InferenceService(engines=...)``, which never stops a borrowed engine.
SmolLM2 comes in three engines for the verification tests: float32, bfloat16
(another "hardware"), and float32 on other weights (a lying executor).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Literal

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


SMOLLM2_MAX_MODEL_LEN = 512


@pytest.fixture(scope="session")
def smollm2_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "smollm2"
    prepare("smollm2", out, report=lambda _: None)
    return out


def other_weights(model: Path, out: Path) -> Path:
    """A copy of ``model`` whose MLP weights carry seeded noise: a different model that
    shares the tokenizer and shapes, as a node cutting corners or cheating would serve."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(model, out)
    weights = load_file(str(model / "model.safetensors"))
    noise = torch.Generator().manual_seed(7)
    for name, tensor in weights.items():
        if "mlp" in name and tensor.ndim == 2:
            scale = tensor.float().std() * 0.5
            tensor += (torch.randn(tensor.shape, generator=noise) * scale).to(tensor.dtype)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def smollm2_engine(path: Path, dtype: Literal["float32", "bfloat16"]) -> VllmEngine:
    engine = VllmEngine(EngineSpec(path, dtype, "auto", 8, SMOLLM2_MAX_MODEL_LEN, 1.0))
    trio.run(engine.start)
    return engine


@pytest.fixture(scope="module")
def smollm2_engines(
    smollm2_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, VllmEngine]]:
    """``f32``, ``bf16`` and ``other`` (float32 on other weights) SmolLM2 engines, for
    one module: stopped before the next starts its own (test_verification_processes's
    five nodes each load SmolLM2, and with these three still up a node's vLLM found
    too little memory for its KV cache)."""
    other = other_weights(smollm2_model, tmp_path_factory.mktemp("models") / "smollm2-other")
    engines = {
        "f32": smollm2_engine(smollm2_model, "float32"),
        "bf16": smollm2_engine(smollm2_model, "bfloat16"),
        "other": smollm2_engine(other, "float32"),
    }
    yield engines
    for engine in engines.values():
        trio.run(engine.stop)
