"""``joynode verify calibrate``: measure honest disagreement, and propose a prefill policy.

An executor in one dtype answers a fixed set of prompts (greedy, then seeded
sampling); a verifier in another dtype scores each answer by prefill, as a
committee member would. What honest members disagree on sets the tolerance:

- ``margin_nats``: twice the widest greedy gap seen (at least 0.5), so
  rounding differences of other hardware stay well inside it;
- ``max_outside``: twice the largest fraction of greedy positions beyond that
  margin (at least 2 %);
- ``max_outside_sampled``: one and a half times the largest fraction of
  sampled positions beyond it (at least 30 %, at most 60 %: a different
  model's draw puts three quarters or more there).

The result goes into the model's ``[[inference.models]]`` entry and its
registration, so that every member applies the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from prometheus_client import CollectorRegistry

from joynode.config import Dtype, InferenceSection, ModelEntry
from joynode.consensus.verification import gaps_below_top
from joynode.inference.engine import EngineSpec, VllmEngine
from joynode.inference.service import InferenceClient, InferenceService
from joynode.messages import InferenceRequest, SamplingSpec

PROMPTS = (
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "Explain photosynthesis in one sentence.",
    "List three prime numbers:",
    "Once upon a time,",
    "The quick brown fox",
    "What is 17 times 23?",
    "Translate 'good morning' to Spanish:",
    "A recipe for pancakes:",
    "The history of Rome began",
    "In machine learning, overfitting means",
    "Name the planets of the solar system:",
    "Why is the sky blue?",
    "import numpy as np\n",
    "Dear hiring manager,",
)
SAMPLED_TEMPERATURE = 0.7


@dataclass(frozen=True)
class Calibration:
    executor: str
    verifier: str
    prompts: int
    positions: int
    greedy_worst_gap: float
    differing_outputs: int  # greedy outputs the verifier's own generation would not match
    margin_nats: float
    max_outside: float
    max_outside_sampled: float
    greedy_worst_outside: float
    sampled_worst_outside: float

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))

    def toml(self) -> str:
        return (
            'verification = "prefill"\n'
            f"margin_nats = {self.margin_nats}\n"
            f"max_outside = {self.max_outside}\n"
            f"max_outside_sampled = {self.max_outside_sampled}\n"
        )


async def calibrate(
    path: Path,
    executor_dtype: Dtype,
    verifier_dtype: Dtype,
    max_tokens: int,
    report: Callable[[str], None],
) -> Calibration:
    """Run the prompts on ``path`` in both dtypes and derive the tolerance."""
    greedy = SamplingSpec(max_tokens=max_tokens)
    sampled = SamplingSpec(max_tokens=max_tokens, temperature=SAMPLED_TEMPERATURE, seed=1)
    greedy_gaps: list[list[float]] = []
    sampled_gaps: list[list[float]] = []
    differing = 0
    async with (
        _engine(path, executor_dtype, max_tokens) as executor_engine,
        _engine(path, verifier_dtype, max_tokens) as verifier_engine,
        serving(path, executor_engine) as executor,
        serving(path, verifier_engine) as verifier,
    ):
        for i, prompt in enumerate(PROMPTS):
            report(f"prompt {i + 1} of {len(PROMPTS)}")
            for sampling, found in ((greedy, greedy_gaps), (sampled, sampled_gaps)):
                claimed = (await executor.complete("model", prompt, None, sampling)).token_ids
                scores = await verifier.score("model", prompt, None, claimed)
                found.append(gaps_below_top(scores, sampling.temperature))
                if sampling is greedy:
                    own = await verifier.complete("model", prompt, None, greedy)
                    differing += own.token_ids != claimed
    worst = max((g for gaps in greedy_gaps for g in gaps), default=0.0)
    margin = max(0.5, math.ceil(worst * 2 * 10) / 10)

    def beyond(runs: list[list[float]]) -> float:
        return max((sum(g > margin for g in gaps) / len(gaps) for gaps in runs if gaps), default=0)

    greedy_outside, sampled_outside = beyond(greedy_gaps), beyond(sampled_gaps)
    return Calibration(
        executor=executor_dtype,
        verifier=verifier_dtype,
        prompts=len(PROMPTS),
        positions=sum(map(len, greedy_gaps)),
        greedy_worst_gap=round(worst, 4),
        differing_outputs=differing,
        margin_nats=margin,
        max_outside=round(max(0.02, greedy_outside * 2), 3),
        max_outside_sampled=round(min(0.6, max(0.3, sampled_outside * 1.5)), 3),
        greedy_worst_outside=round(greedy_outside, 4),
        sampled_worst_outside=round(sampled_outside, 4),
    )


@asynccontextmanager
async def serving(path: Path, engine: VllmEngine) -> AsyncIterator[InferenceClient]:
    """An inference actor serving ``path`` as ``model`` on ``engine`` (borrowed, not stopped)."""
    send, receive = trio.open_memory_channel[InferenceRequest](8)
    settings = InferenceSection(
        models=[ModelEntry(name="model", path=path)],
        max_num_seqs=engine.spec.max_num_seqs,
        max_model_len=engine.spec.max_model_len,
    )
    service = InferenceService(settings, CollectorRegistry(), receive, engines={"model": engine})
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        yield InferenceClient(send)
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def _engine(path: Path, dtype: Dtype, max_tokens: int) -> AsyncIterator[VllmEngine]:
    engine = VllmEngine(EngineSpec(path, dtype, "auto", 4, 256 + max_tokens * 2, 1.0))
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()
