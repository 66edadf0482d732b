"""Prefill verification: the judging rules, and real SmolLM2 engines in other dtypes.

The engine tests answer a set of prompts with a float32 executor and check
its outputs with bfloat16 verifiers (one prefill pass each): every honest
answer passes the tolerant check, while exact replication across the two
dtypes disagrees on some of the same prompts. Outputs of other weights,
truncated and padded outputs are refused.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from prometheus_client import CollectorRegistry

from joynode import wire
from joynode.config import InferenceSection, ModelEntry
from joynode.consensus.verification import judge, length_problem
from joynode.inference.engine import VllmEngine
from joynode.inference.service import InferenceClient, InferenceService
from joynode.messages import ClaimScores, InferenceRequest, SamplingSpec
from tests.inference_fixtures import SMOLLM2_MAX_MODEL_LEN, smollm2_engines, smollm2_model

__all__ = ["smollm2_engines", "smollm2_model"]

PREFILL = wire.Verification.of("prefill", 1.0, 0.02, 0.5)
EOS = frozenset({2})


def scores(gaps: list[float], ranks: list[int] | None = None) -> ClaimScores:
    """Scores whose claimed tokens sit ``gaps`` nats below the verifier's top-1."""
    return ClaimScores(
        model="m",
        token_logprobs=tuple(-1.0 - g for g in gaps),
        top_logprobs=tuple(-1.0 for _ in gaps),
        ranks=tuple(ranks or [1 if g == 0 else 2 for g in gaps]),
        eos_token_ids=EOS,
        prompt_tokens=3,
        total_s=0.0,
    )


GREEDY_8 = SamplingSpec(max_tokens=8, ignore_eos=True)


def test_greedy_claims_pass_within_the_margin_and_the_allowed_fraction() -> None:
    claimed = [5] * 8
    assert judge(PREFILL, GREEDY_8, claimed, scores([0.0] * 8)).accepted
    assert judge(PREFILL, GREEDY_8, claimed, scores([0.9, 0.3, 0, 0, 0, 0, 0, 0.99])).accepted
    refused = judge(PREFILL, GREEDY_8, claimed, scores([0, 0, 1.5, 0, 0, 0, 0, 0]))
    assert not refused.accepted  # 2 % of 8 positions is 0 allowed
    assert "1 of 8 positions beyond the margin" in refused.reason
    lenient = wire.Verification.of("prefill", 1.0, 0.25, 0.5)  # 2 of 8 allowed
    assert judge(lenient, GREEDY_8, claimed, scores([0, 0, 5.0, 0, 0, 0, 9.0, 0])).accepted
    assert not judge(lenient, GREEDY_8, claimed, scores([0, 3, 5.0, 0, 0, 0, 9.0, 0])).accepted


def test_sampled_claims_are_judged_on_the_tempered_gap_and_the_top_k_cut() -> None:
    sampled = SamplingSpec(max_tokens=4, temperature=2.0, seed=1, ignore_eos=True)
    # 1.8 nats raw is 0.9 at temperature 2: inside a 1-nat margin; half may be outside.
    assert judge(PREFILL, sampled, [5] * 4, scores([1.8, 1.9, 0, 0])).accepted
    assert judge(PREFILL, sampled, [5] * 4, scores([2.2, 9.0, 0, 0])).accepted
    assert not judge(PREFILL, sampled, [5] * 4, scores([2.2, 9.0, 2.1, 0])).accepted
    top_2 = SamplingSpec(max_tokens=4, temperature=2.0, top_k=2, seed=1, ignore_eos=True)
    past_the_cut = scores([0.1, 0.1, 0.1, 0], ranks=[3, 3, 3, 1])
    assert not judge(PREFILL, top_2, [5] * 4, past_the_cut).accepted


def test_outputs_of_the_wrong_length_are_refused_whatever_their_tokens() -> None:
    stop = SamplingSpec(max_tokens=6)
    assert length_problem([5, 6, 2], stop, EOS) == ""  # ended by EOS
    assert length_problem([5] * 6, stop, EOS) == ""  # ran to max_tokens
    assert "truncated" in length_problem([5, 6, 7], stop, EOS)
    assert "after its end-of-sequence" in length_problem([5, 2, 7], stop, EOS)
    assert "over 6" in length_problem([5] * 7, stop, EOS)
    assert "empty" in length_problem([], stop, EOS)
    assert "stops at 5 of 8" in length_problem([5] * 5, GREEDY_8, EOS)
    verdict = judge(PREFILL, stop, [5, 6, 7], scores([0, 0, 0]))
    assert not verdict.accepted
    assert "truncated" in verdict.reason


def test_policies_travel_as_integers_and_replicate_needs_no_tolerance() -> None:
    assert wire.Verification("prefill", 1000, 200, 5000) == PREFILL
    assert wire.Verification.of("replicate", 5.0, 0.5, 0.5) == wire.REPLICATE
    assert "margin 1.0 nats" in PREFILL.describe()


# ---- real engines

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "Explain photosynthesis in one sentence.",
    "List three prime numbers:",
    "Once upon a time,",
    "What is 17 times 23?",
    "Why is the sky blue?",
]
GREEDY_32 = SamplingSpec(max_tokens=32)


@asynccontextmanager
async def serving(model: Path, engine: VllmEngine) -> AsyncIterator[InferenceClient]:
    """An inference actor serving ``model`` on ``engine`` (whatever its dtype or weights)."""
    send, receive = trio.open_memory_channel[InferenceRequest](16)
    settings = InferenceSection(
        models=[ModelEntry(name="smollm2", path=model)],
        max_num_seqs=8,
        max_model_len=SMOLLM2_MAX_MODEL_LEN,
    )
    service = InferenceService(settings, CollectorRegistry(), receive, engines={"smollm2": engine})
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        yield InferenceClient(send)
        nursery.cancel_scope.cancel()


async def outputs(client: InferenceClient, sampling: SamplingSpec) -> list[tuple[int, ...]]:
    found: list[tuple[int, ...]] = []
    for prompt in PROMPTS:
        found.append((await client.complete("smollm2", prompt, None, sampling)).token_ids)
    return found


@pytest.mark.slow
async def test_a_bf16_verifier_certifies_every_f32_answer_that_replication_would_not(
    smollm2_model: Path, smollm2_engines: dict[str, VllmEngine]
) -> None:
    async with (
        serving(smollm2_model, smollm2_engines["f32"]) as executor,
        serving(smollm2_model, smollm2_engines["bf16"]) as verifier,
    ):
        claimed = await outputs(executor, GREEDY_32)
        replicated = await outputs(verifier, GREEDY_32)
        verdicts = []
        for prompt, tokens in zip(PROMPTS, claimed, strict=True):
            scored = await verifier.score("smollm2", prompt, None, tokens)
            verdicts.append(judge(PREFILL, GREEDY_32, tokens, scored))
    assert all(v.accepted for v in verdicts), [v.reason for v in verdicts]
    # The same answers, regenerated in bfloat16: some differ in a token or more.
    differing = [p for p, a, b in zip(PROMPTS, claimed, replicated, strict=True) if a != b]
    assert differing, "float32 and bfloat16 agreed exactly on every prompt"
    assert max(v.worst_gap for v in verdicts) < PREFILL.margin_milli / 1000


@pytest.mark.slow
async def test_other_weights_truncated_and_padded_outputs_are_refused(
    smollm2_model: Path, smollm2_engines: dict[str, VllmEngine]
) -> None:
    async with (
        serving(smollm2_model, smollm2_engines["other"]) as liar,
        serving(smollm2_model, smollm2_engines["f32"]) as honest,
        serving(smollm2_model, smollm2_engines["bf16"]) as verifier,
    ):
        lies = await outputs(liar, GREEDY_32)
        truths = await outputs(honest, GREEDY_32)
        for prompt, tokens, truth in zip(PROMPTS, lies, truths, strict=True):
            for checker in (verifier, honest):
                scored = await checker.score("smollm2", prompt, None, tokens)
                verdict = judge(PREFILL, GREEDY_32, tokens, scored)
                assert not verdict.accepted, (prompt, verdict)
            cut = truth[: len(truth) // 2]
            padded = (*truth, *truth[:4]) if len(truth) == 32 else (*truth, 17, 42)
            for forged in (cut, padded):
                scored = await verifier.score("smollm2", prompt, None, forged)
                assert not judge(PREFILL, GREEDY_32, forged, scored).accepted, (prompt, forged)


@pytest.mark.slow
async def test_seeded_sampling_is_verified_and_other_weights_sampling_is_not(
    smollm2_model: Path, smollm2_engines: dict[str, VllmEngine]
) -> None:
    sampled = SamplingSpec(max_tokens=32, temperature=0.7, seed=11)
    async with (
        serving(smollm2_model, smollm2_engines["other"]) as liar,
        serving(smollm2_model, smollm2_engines["f32"]) as executor,
        serving(smollm2_model, smollm2_engines["bf16"]) as verifier,
    ):
        honest = await outputs(executor, sampled)
        lies = await outputs(liar, sampled)
        for prompt, tokens, lie in zip(PROMPTS, honest, lies, strict=True):
            scored = await verifier.score("smollm2", prompt, None, tokens)
            verdict = judge(PREFILL, sampled, tokens, scored)
            assert verdict.accepted, (prompt, verdict)
            scored = await verifier.score("smollm2", prompt, None, lie)
            assert not judge(PREFILL, sampled, lie, scored).accepted, prompt
