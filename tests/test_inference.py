"""The inference actor on a real vLLM engine (CPU, tiny model)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pydantic
import pytest
import trio
from prometheus_client import CollectorRegistry

from joynode.inference.engine import STOP_TIMEOUT_S, EngineSpec, VllmEngine
from joynode.inference.models import model_id, prepare
from joynode.inference.service import InferenceClient, InferenceService, tokenize_request
from joynode.messages import (
    ChatMessage,
    FailureCode,
    InferenceEvent,
    InferenceFailed,
    InferenceRequest,
    InferenceResult,
    SamplingSpec,
    TokenDelta,
    output_hash,
)
from tests.factories import descendants, wait_for
from tests.inference_fixtures import TINY_MAX_MODEL_LEN, tiny_engine, tiny_model, tiny_settings

__all__ = ["tiny_engine", "tiny_model"]  # fixtures used by name below

GREEDY_16 = SamplingSpec(max_tokens=16, ignore_eos=True)
PROMPTS = [
    "The capital of France is",
    "Hello world",
    "Once upon a time",
    "Python is",
    "Numbers: 0 1 2",
    "The quick brown fox",
    "vLLM is a",
    "Trio and asyncio",
]


@asynccontextmanager
async def inference(
    tiny_model: Path, tiny_engine: VllmEngine, **overrides: Any
) -> AsyncIterator[tuple[InferenceService, InferenceClient]]:
    send, receive = trio.open_memory_channel[InferenceRequest](64)
    service = InferenceService(
        tiny_settings(tiny_model, **overrides),
        CollectorRegistry(),
        receive,
        engines={"tiny": tiny_engine},
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        yield service, InferenceClient(send)
        nursery.cancel_scope.cancel()


async def test_streams_deltas_then_the_whole_result(
    tiny_model: Path, tiny_engine: VllmEngine
) -> None:
    async with inference(tiny_model, tiny_engine) as (service, client):
        events = []
        async with client.stream("tiny", "The capital of France is", None, GREEDY_16) as channel:
            async for event in channel:
                events.append(event)
    *deltas, result = events
    assert len(deltas) >= 2
    assert all(isinstance(d, TokenDelta) for d in deltas)
    assert isinstance(result, InferenceResult)
    streamed = [t for d in deltas if isinstance(d, TokenDelta) for t in d.token_ids]
    assert list(result.token_ids) == streamed
    assert len(result.token_ids) == 16
    assert result.finish_reason == "length"
    assert result.text == "".join(d.text for d in deltas if isinstance(d, TokenDelta))
    assert result.model_id == service.models["tiny"].model_id
    assert result.output_hash == output_hash(result.token_ids)
    assert 0 < result.first_token_s <= result.total_s


async def test_cancelling_the_requester_aborts_the_vllm_request(
    tiny_model: Path, tiny_engine: VllmEngine
) -> None:
    long = SamplingSpec(max_tokens=200, ignore_eos=True)
    async with inference(tiny_model, tiny_engine) as (service, client):
        received = 0
        with trio.move_on_after(30):
            async with client.stream("tiny", "Once upon a time", None, long) as channel:
                async for _ in channel:
                    received += 1
                    if received == 3:
                        break
        assert received == 3
        await wait_for(lambda: service.models["tiny"].inflight == 0, 5, "request released")
        unfinished = await tiny_engine.unfinished_requests()
        assert unfinished == 0
        # The engine serves the next request normally.
        assert len((await client.complete("tiny", "Hello", sampling=GREEDY_16)).token_ids) == 16


async def test_full_queue_answers_busy_at_once(tiny_model: Path, tiny_engine: VllmEngine) -> None:
    long = SamplingSpec(max_tokens=150, ignore_eos=True)
    async with inference(tiny_model, tiny_engine, max_queue=2) as (service, client):
        results: dict[int, Any] = {}

        async def ask(index: int) -> None:
            try:
                results[index] = await client.complete("tiny", PROMPTS[index], sampling=long)
            except InferenceFailed as exc:
                results[index] = exc.failure

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, 0)
            nursery.start_soon(ask, 1)
            await wait_for(lambda: service.models["tiny"].inflight == 2, 10, "two admitted")
            began = trio.current_time()
            await ask(2)
            assert trio.current_time() - began < 1.0
        assert isinstance(results[0], InferenceResult)
        assert isinstance(results[1], InferenceResult)
        assert results[2].code is FailureCode.BUSY
        assert "try again later" in results[2].message


@pytest.mark.parametrize(
    ("model", "prompt", "messages", "sampling", "code", "text"),
    [
        ("nope", "hi", None, GREEDY_16, FailureCode.UNKNOWN_MODEL, "unknown model 'nope'"),
        ("tiny", None, None, GREEDY_16, FailureCode.INVALID_REQUEST, "either prompt or messages"),
        (
            "tiny",
            "hi",
            None,
            SamplingSpec(max_tokens=201),
            FailureCode.INVALID_REQUEST,
            "over the limit of 200",
        ),
        (
            "tiny",
            "The capital of France is " * 40,
            None,
            SamplingSpec(max_tokens=100),
            FailureCode.PROMPT_TOO_LONG,
            f"exceeds tiny's {TINY_MAX_MODEL_LEN}",
        ),
        ("tiny", "", None, GREEDY_16, FailureCode.INVALID_REQUEST, "empty prompt"),
    ],
)
async def test_bad_requests_are_refused_with_nothing_queued(
    tiny_model: Path,
    tiny_engine: VllmEngine,
    model: str,
    prompt: str | None,
    messages: tuple[ChatMessage, ...] | None,
    sampling: SamplingSpec,
    code: FailureCode,
    text: str,
) -> None:
    async with inference(tiny_model, tiny_engine) as (service, client):
        with pytest.raises(InferenceFailed) as info:
            await client.complete(model, prompt, messages, sampling)
        assert info.value.failure.code is code
        assert text in info.value.failure.message
        await wait_for(lambda: service.models["tiny"].inflight == 0, 5, "nothing in flight")
        assert await tiny_engine.unfinished_requests() == 0


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"temperature": 0.8}, "needs a seed"),
        ({"max_tokens": 0}, "greater than or equal to 1"),
        ({"top_p": 0}, "greater than 0"),
        ({"temperature": 3, "seed": 1}, "less than or equal to 2"),
        ({"best_of": 3}, "Extra inputs are not permitted"),
    ],
)
def test_bad_sampling_parameters_are_rejected(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=message):
        SamplingSpec(**fields)


async def test_greedy_outputs_are_identical_across_runs_and_batch_sizes(
    tiny_model: Path, tiny_engine: VllmEngine
) -> None:
    sampling = SamplingSpec(max_tokens=24, ignore_eos=True)
    async with inference(tiny_model, tiny_engine) as (_, client):
        alone = [
            (await client.complete("tiny", PROMPTS[0], sampling=sampling)).token_ids
            for _ in range(3)
        ]
        batched: dict[int, tuple[int, ...]] = {}

        async def run(index: int) -> None:
            batched[index] = (
                await client.complete("tiny", PROMPTS[index], sampling=sampling)
            ).token_ids

        async with trio.open_nursery() as nursery:
            for index in range(8):
                nursery.start_soon(run, index)
    assert alone[0] == alone[1] == alone[2]
    assert batched[0] == alone[0]
    assert len(set(batched.values())) > 1  # different prompts, different outputs


async def test_seeded_sampling_is_reproducible(tiny_model: Path, tiny_engine: VllmEngine) -> None:
    async with inference(tiny_model, tiny_engine) as (_, client):
        runs = [
            (
                await client.complete(
                    "tiny",
                    "Hello",
                    sampling=SamplingSpec(
                        max_tokens=16, temperature=1.0, seed=seed, ignore_eos=True
                    ),
                )
            ).token_ids
            for seed in (7, 7, 8)
        ]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


async def test_greedy_ids_equal_hugging_face_transformers(
    tiny_model: Path, tiny_engine: VllmEngine
) -> None:
    async with inference(tiny_model, tiny_engine) as (_, client):
        ours = {
            p: (await client.complete("tiny", p, sampling=GREEDY_16)).token_ids for p in PROMPTS[:4]
        }

    def transformers_greedy() -> dict[str, tuple[int, ...]]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tiny_model)
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
        out = {}
        for prompt in PROMPTS[:4]:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                generated = model.generate(
                    ids, max_new_tokens=16, min_new_tokens=16, do_sample=False
                )
            out[prompt] = tuple(int(t) for t in generated[0, ids.shape[1] :])
        return out

    assert await trio.to_thread.run_sync(transformers_greedy) == ours


async def test_chat_messages_go_through_the_chat_template(
    tiny_model: Path, tiny_engine: VllmEngine
) -> None:
    turns = [ChatMessage(role="system", content="be brief"), ChatMessage(role="user", content="hi")]
    async with inference(tiny_model, tiny_engine) as (_, client):
        chat = await client.complete("tiny", messages=turns, sampling=GREEDY_16)
        rendered = "system: be brief\nuser: hi\nassistant:"
        plain = await client.complete("tiny", rendered, sampling=GREEDY_16)
    assert chat.token_ids == plain.token_ids
    assert chat.prompt_tokens == plain.prompt_tokens


def test_a_tokenizer_without_a_chat_template_refuses_chat_by_name(
    tmp_path: Path, tiny_model: Path
) -> None:
    """What ``_prompt_ids`` turns into "has no chat template; send a plain prompt"."""
    from transformers import AutoTokenizer

    bare = tmp_path / "bare"
    shutil.copytree(tiny_model, bare)
    (bare / "chat_template.jinja").unlink()
    tokenizer = AutoTokenizer.from_pretrained(bare)
    chat = InferenceRequest(
        "tiny",
        None,
        (ChatMessage(role="user", content="hi"),),
        GREEDY_16,
        trio.open_memory_channel[InferenceEvent](1)[0],
    )
    with pytest.raises(Exception, match="chat_template"):
        tokenize_request(tokenizer, chat)
    plain = dataclasses.replace(chat, prompt="hi", messages=None)
    assert tokenize_request(tokenizer, plain)  # a plain prompt still tokenizes


def test_tiny_model_is_byte_identical_when_prepared_again(tmp_path: Path, tiny_model: Path) -> None:
    again = tmp_path / "tiny"
    assert prepare("tiny", again, report=lambda _: None) == model_id(tiny_model)
    assert sorted(p.name for p in again.iterdir()) == sorted(p.name for p in tiny_model.iterdir())


async def test_stop_keeps_its_deadline_when_vllm_hangs_and_leaves_no_engine_core(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vllm.v1.engine.async_llm import AsyncLLM

    before = {p.pid for p in descendants(os.getpid())}
    engine = VllmEngine(
        EngineSpec(tiny_model, "float32", "auto", 4, TINY_MAX_MODEL_LEN, kv_cache_gib=0.25)
    )
    await engine.start()
    started = [p for p in descendants(os.getpid()) if p.pid not in before]
    (core,) = [p for p in started if "EngineCore" in p.command]
    hang_s = 2 * STOP_TIMEOUT_S

    def hung_shutdown(self: AsyncLLM, timeout: float | None = None) -> None:
        time.sleep(hang_s)  # vLLM stuck in its shutdown, its engine core untouched

    monkeypatch.setattr(AsyncLLM, "shutdown", hung_shutdown)
    began = trio.current_time()
    await engine.stop()
    assert trio.current_time() - began < STOP_TIMEOUT_S + 0.5
    # Once vLLM's thread gets to end, the engine core ends with it (it is tied to that thread).
    await wait_for(lambda: not core.alive(), hang_s + 30, "the engine core gone")
