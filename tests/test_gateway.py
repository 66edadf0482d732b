"""The OpenAI-compatible gateway on real nodes: the official ``openai`` client and raw HTTP
get certified answers (chat and text, streamed and not, by a committee or by one node),
check them offline with eth-account, and get OpenAI's errors.

Three in-process nodes serve the session's tiny vLLM engine; a fourth serves nothing and
answers by routing its jobs to them. Members are made slow or failing by wrapping their
inference client, as tests/test_consensus.py does.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils.crypto import keccak

from joynode.gateway import apikeys
from joynode.gateway.openai_api import stream_link
from joynode.inference.engine import VllmEngine
from joynode.inference.service import InferenceClient
from joynode.messages import (
    FailureCode,
    InferenceFailed,
    InferenceFailure,
    InferenceResult,
    SamplingSpec,
    TokenDelta,
)
from joynode.node import Node
from tests.factories import LIBP2P_TEARDOWN_LEAK, running_node, wait_for
from tests.inference_fixtures import tiny_engine, tiny_model
from tests.test_consensus import Slow, committee_of, consensus_home

__all__ = ["tiny_engine", "tiny_model"]

pytestmark = LIBP2P_TEARDOWN_LEAK


def check_offline(joynet: dict[str, Any]) -> set[str]:
    """What docs/openai.md tells a client to do: the signers a certificate proves."""
    certificate = joynet["certificate"]
    words = b"".join(t.to_bytes(4, "big") for t in joynet["token_ids"])
    assert "0x" + keccak(words).hex() == certificate["output_hash"]
    signers = set()
    for signature in certificate["signatures"]:
        typed = encode_typed_data(
            full_message={
                "types": {
                    "EIP712Domain": [
                        {"name": "name", "type": "string"},
                        {"name": "version", "type": "string"},
                        {"name": "chainId", "type": "uint256"},
                        {"name": "verifyingContract", "type": "address"},
                    ],
                    "Result": [
                        {"name": "requestId", "type": "bytes32"},
                        {"name": "outputHash", "type": "bytes32"},
                    ],
                },
                "primaryType": "Result",
                "domain": joynet["domain"],
                "message": {
                    "requestId": certificate["request_id"],
                    "outputHash": certificate["output_hash"],
                },
            }
        )
        signers.add(Account.recover_message(typed, signature=signature))
    assert signers <= set(certificate["committee"])
    assert len(signers) >= joynet["quorum"]
    return signers


@asynccontextmanager
async def network(
    tmp_path: Path, tiny_model: Path, engine: VllmEngine, commit_timeout_s: float = 20
) -> AsyncIterator[tuple[list[Node], Node, str]]:
    """Three serving nodes and a gateway that serves nothing; and an API key on each."""
    async with AsyncExitStack() as stack:
        nodes = await stack.enter_async_context(
            committee_of(tmp_path, tiny_model, engine, 3, commit_timeout_s)
        )
        home = consensus_home(
            tmp_path / "gw", tiny_model, nodes[0].p2p.listen_addrs(), commit_timeout_s
        )
        home.set("inference", "models", "[]")
        gateway = await stack.enter_async_context(running_node(home))
        model_id = str(nodes[0].inference.model_id("tiny"))
        await wait_for(lambda: gateway._network_model_id(model_id) is not None, 15, "peers serving")
        key = ""
        for node in [*nodes, gateway]:
            key, _ = await node.state.write(lambda c: apikeys.create(c, "t", 600, None))
            KEYS[node.identity.address] = key
        yield nodes, gateway, key


KEYS: dict[str, str] = {}  # a node's address -> the API key made on it by ``network``


def bearer(node: Node) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[node.identity.address]}"}


def url_of(node: Node) -> str:
    assert node.http.url is not None
    return node.http.url


def sdk(node: Node) -> openai.OpenAI:
    assert node.http.url is not None
    return openai.OpenAI(
        base_url=url_of(node) + "/v1",
        api_key=KEYS[node.identity.address],
        max_retries=0,
        timeout=60,
    )


async def in_thread(fn: Any, *args: Any, **kwargs: Any) -> Any:
    return await trio.to_thread.run_sync(partial(fn, *args, **kwargs))


async def test_openai_clients_get_certified_answers_streamed_and_not(
    tmp_path: Path, tiny_model: Path, tiny_engine: VllmEngine
) -> None:
    async with network(tmp_path, tiny_model, tiny_engine) as (nodes, gateway, _):
        serving = nodes[0]
        members = {n.consensus.address for n in nodes}
        model_id = str(serving.inference.model_id("tiny"))
        reference = await serving.inference_client.complete(
            "tiny", "Hello world", None, SamplingSpec(max_tokens=8, ignore_eos=True)
        )

        # Chat by committee, not streamed, through the official client: the answer, its
        # usage, and a certificate (body and headers) that checks offline.
        def chat(client: openai.OpenAI, **extra: Any) -> Any:
            with client:
                return client.chat.completions.with_raw_response.create(
                    model="tiny",
                    messages=[{"role": "user", "content": "Hello"}],
                    max_tokens=6,
                    temperature=0,
                    **extra,
                )

        raw = await in_thread(chat, sdk(serving))
        completion = raw.parse()
        joynet = completion.model_extra["joynet"]
        assert joynet["verification"] == "committee"
        assert check_offline(joynet) <= members
        assert completion.choices[0].message.role == "assistant"
        assert completion.usage.completion_tokens == len(joynet["token_ids"]) <= 6
        assert completion.usage.prompt_tokens > 0
        assert raw.headers["x-joynet-request-id"] == joynet["request_id"]
        assert raw.headers["x-joynet-output-hash"] == joynet["certificate"]["output_hash"]
        assert raw.headers["x-joynet-signers"].split(",") == joynet["certificate"]["signers"]
        assert raw.headers["x-joynet-settlement"] == "unpaid"

        # The gateway serving nothing routes the job to the nodes that serve the model
        # (named by its id there): the same certified output.
        def complete(client: openai.OpenAI, **kwargs: Any) -> Any:
            with client:
                return client.completions.create(
                    prompt="Hello world", max_tokens=8, temperature=0, **kwargs
                )

        routed = await in_thread(complete, sdk(gateway), model=model_id)
        assert routed.choices[0].text == reference.text
        assert routed.model_extra["joynet"]["token_ids"] == list(reference.token_ids)
        assert check_offline(routed.model_extra["joynet"]) <= members
        assert (
            gateway.consensus.address
            not in routed.model_extra["joynet"]["certificate"]["committee"]
        )

        # Local: this node alone signs; the certificate is fetched again later.
        local = await in_thread(
            complete, sdk(serving), model="tiny", extra_body={"joynet": {"verification": "local"}}
        )
        extension = local.model_extra["joynet"]
        assert local.choices[0].text == reference.text
        assert check_offline(extension) == {serving.consensus.address}
        # Local on the gateway serving nothing: a serving peer answers alone, signed by it.
        forwarded = await in_thread(
            complete, sdk(gateway), model=model_id, extra_body={"joynet": {"verification": "local"}}
        )
        handed = forwarded.model_extra["joynet"]
        assert forwarded.choices[0].text == reference.text
        assert check_offline(handed) < members  # one serving peer
        for node, answer in (
            (serving, extension),
            (gateway, routed.model_extra["joynet"]),
            (gateway, handed),
        ):
            url = f"{node.http.url}/v1/joynet/certificates/{answer['request_id']}"
            later = await in_thread(httpx.get, url, headers=bearer(node))
            assert later.status_code == 200, later.text
            assert later.json()["certificate"] == answer["certificate"]
            assert later.json()["status"] == "certified"

        # Streams, by the official client: tokens (live for local), usage, then the
        # certificate as the last chunk, its chain covering exactly what was streamed.
        for verification, node in (("local", serving), ("committee", gateway)):

            def stream(client: openai.OpenAI, verification: str = verification) -> list[Any]:
                with client:
                    chunks = client.chat.completions.create(
                        model=model_id,
                        messages=[{"role": "user", "content": "Hello"}],
                        max_tokens=12,
                        temperature=0.7,
                        seed=7,
                        stream=True,
                        stream_options={"include_usage": True},
                        extra_body={"joynet": {"verification": verification}},
                    )
                    return list(chunks)

            if verification == "local":
                node = serving
            chunks = await in_thread(stream, sdk(node))
            last = chunks[-1].model_extra["joynet"]
            assert chunks[-1].choices == []
            assert chunks[-1].usage.completion_tokens == len(last["token_ids"])
            chain = bytes(32)
            token_ids: list[int] = []
            text = ""
            for chunk in chunks[:-1]:
                piece = chunk.model_extra["joynet"]
                if piece is not None:  # (the finishing chunk has none)
                    content = chunk.choices[0].delta.content
                    chain = stream_link(chain, content, piece["token_ids"])
                    assert piece["chain"] == "0x" + chain.hex()
                    token_ids += piece["token_ids"]
                    text += content
            assert last["chain"] == "0x" + chain.hex()
            assert token_ids == last["token_ids"]
            assert last["seed"] == 7
            check_offline(last)
            if verification == "local":
                assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1

        # Stop sequences: the committee stops where the engine stops, before the stop.
        stop = reference.text[len(reference.text) // 2 :][:2]
        expected = reference.text[: reference.text.index(stop)]
        assert stop.strip()
        assert expected
        for verification in ("committee", "local"):
            stopped = await in_thread(
                complete,
                sdk(serving),
                model="tiny",
                stop=[stop],
                extra_body={"joynet": {"verification": verification}},
            )
            assert stopped.choices[0].text == expected, verification
            assert stopped.choices[0].finish_reason == "stop"


async def test_bad_requests_get_openai_errors_and_the_node_keeps_serving(
    tmp_path: Path, tiny_model: Path, tiny_engine: VllmEngine
) -> None:
    async with network(tmp_path, tiny_model, tiny_engine) as (nodes, gateway, _):
        node = nodes[0]

        model_id = str(node.inference.model_id("tiny"))

        def ask(client: openai.OpenAI, prompt: str = "Hi", **kwargs: Any) -> Any:
            with client:
                return client.completions.create(prompt=prompt, max_tokens=2, **kwargs)

        with pytest.raises(openai.NotFoundError) as unknown:
            await in_thread(ask, sdk(node), model="no-such-model")
        assert unknown.value.code == "model_not_found"
        with pytest.raises(openai.BadRequestError) as n:
            await in_thread(ask, sdk(node), model="tiny", n=2)
        assert n.value.param == "n"
        with pytest.raises(openai.BadRequestError) as penalty:
            await in_thread(ask, sdk(node), model="tiny", presence_penalty=1.0)
        assert penalty.value.code == "unsupported_parameter"
        with pytest.raises(openai.BadRequestError) as too_long:  # forwarded, refused by the peer
            await in_thread(
                ask,
                sdk(gateway),
                prompt="word " * 5000,
                model=nodes[0].inference.model_id("tiny"),
                extra_body={"joynet": {"verification": "local"}},
            )
        assert too_long.value.code == "context_length_exceeded"
        bad_key = openai.OpenAI(base_url=url_of(node) + "/v1", api_key="jn-x-y", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            await in_thread(ask, bad_key, model="tiny")
        headers = bearer(node)
        for body in (b"{", b"[]", json.dumps({"model": "tiny"}).encode(), b'{"model": 5}'):
            reply = await in_thread(
                httpx.post, url_of(node) + "/v1/chat/completions", content=body, headers=headers
            )
            assert reply.status_code == 400, (body, reply.text)
            assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
        missing = await in_thread(
            httpx.get, url_of(node) + "/v1/joynet/certificates/0x" + "00" * 32, headers=headers
        )
        assert missing.status_code == 404
        # A prompt too long for the members' model: they say so (RunRefusal) and the
        # client hears why at once, not at the job's deadline.
        with pytest.raises(openai.BadRequestError) as too_long:
            await in_thread(ask, sdk(gateway), model=model_id, prompt="word " * 400)
        assert too_long.value.code == "context_length_exceeded"
        assert "members cannot run it" in str(too_long.value.message)
        # Still serving after all of that.
        fine = await in_thread(ask, sdk(node), model="tiny", temperature=0)
        assert fine.choices[0].text


class DiesMidStream:
    """An inference client that, asked to stream (only the executor is), passes on two
    tokens and dies."""

    def __init__(self, honest: InferenceClient) -> None:
        self._honest = honest

    async def complete(
        self,
        model: str,
        prompt: str | None = None,
        messages: Any = None,
        sampling: SamplingSpec | None = None,
        on_tokens: Any = None,
    ) -> InferenceResult:
        args = (model, prompt, messages, sampling)
        if on_tokens is None:
            return await self._honest.complete(*args)
        passed: list[int] = []

        def two(delta: TokenDelta) -> None:
            if len(passed) >= 2:
                raise InferenceFailed(InferenceFailure(FailureCode.ENGINE_ERROR, "killed"))
            passed.extend(delta.token_ids)
            on_tokens(delta)

        return await self._honest.complete(*args, on_tokens=two)


class FailsOnce:
    """An inference client whose first request fails: an executor that died."""

    def __init__(self, honest: InferenceClient) -> None:
        self._honest = honest
        self.failed = False

    async def complete(self, *args: Any, **kwargs: Any) -> InferenceResult:
        if not self.failed:
            self.failed = True
            raise InferenceFailed(InferenceFailure(FailureCode.ENGINE_ERROR, "the executor died"))
        return await self._honest.complete(*args, **kwargs)


async def test_a_failed_committee_job_is_retried_and_a_gone_client_stops_every_member(
    tmp_path: Path, tiny_model: Path, tiny_engine: VllmEngine
) -> None:
    async with network(tmp_path, tiny_model, tiny_engine, commit_timeout_s=3) as (
        nodes,
        gateway,
        _,
    ):
        model_id = str(nodes[0].inference.model_id("tiny"))
        # Two of three members fail their first job: no majority, so the gateway submits
        # it again (a new nonce) and the client gets the retried, certified answer.
        for node in nodes[1:]:
            node.consensus._inference = FailsOnce(node.inference_client)  # type: ignore[assignment]

        def complete(client: openai.OpenAI) -> Any:
            with client:
                return client.completions.create(
                    model=model_id, prompt="Hello world", max_tokens=4, temperature=0
                )

        answer = await in_thread(complete, sdk(gateway))
        check_offline(answer.model_extra["joynet"])
        failed = [j for j in gateway.consensus.jobs.values() if j.status == "failed"]
        assert len(failed) == 1

        # The executor dies mid-stream, after streaming two tokens: the other two members
        # certify the output, and the client gets the rest of it, then the certificate.
        for node in nodes:
            node.consensus._inference = DiesMidStream(node.inference_client)  # type: ignore[assignment]

        def stream(client: openai.OpenAI) -> list[Any]:
            with client:
                return list(
                    client.completions.create(
                        model=model_id,
                        prompt="Hello world",
                        max_tokens=8,
                        temperature=0,
                        stream=True,
                    )
                )

        reference = await nodes[0].inference_client.complete(
            model_id, "Hello world", None, SamplingSpec(max_tokens=8)
        )
        chunks = await in_thread(stream, sdk(gateway))
        last = chunks[-1].model_extra["joynet"]
        executor = last["certificate"]["committee"][0]
        assert executor not in last["certificate"]["signers"]
        assert "".join(c.choices[0].text for c in chunks if c.choices) == reference.text
        assert last["token_ids"] == list(reference.token_ids)
        pieces = [c.model_extra["joynet"]["token_ids"] for c in chunks if c.model_extra["joynet"]]
        *streamed, rest, _ = pieces  # (the last: the certificate)
        live = [t for piece in streamed for t in piece]  # the executor's, as it made them
        assert live == list(reference.token_ids[: len(live)])
        assert len(live) >= 2
        assert rest == list(reference.token_ids[len(live) :])  # the rest, once certified
        assert rest

        # A client that goes away while its committee works: every member stops its job.
        for node in nodes:
            node.consensus._inference = Slow(node.inference_client, 30.0)  # type: ignore[assignment]
        headers = bearer(gateway)
        for asks_stream in (True, False):
            before = set(gateway.consensus.jobs)
            body = {"model": model_id, "prompt": "Hello", "max_tokens": 4, "stream": asks_stream}
            async with httpx.AsyncClient() as client:
                with trio.move_on_after(2):  # a client that gives up before the answer
                    async with client.stream(
                        "POST", url_of(gateway) + "/v1/completions", json=body, headers=headers
                    ) as response:
                        # (a stream's headers come at once; a whole answer's, with it)
                        assert asks_stream
                        assert response.headers["content-type"].startswith("text/event-stream")
                        await trio.sleep_forever()
            (request_id,) = set(gateway.consensus.jobs) - before

            def all_cancelled(request_id: bytes = request_id) -> bool:
                jobs = [n.consensus.jobs.get(request_id) for n in nodes]
                return all(
                    j is not None and j.status == "failed" and "cancelled" in j.reason for j in jobs
                )

            await wait_for(
                all_cancelled, 10, f"every member to stop the job (stream: {asks_stream})"
            )
