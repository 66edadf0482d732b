"""Forwarding ``local`` requests, alone with fakes: which peers are asked and in what order,
what is passed on, and what is refused (no sockets, no engine)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trio

from joynode import wire
from joynode.gateway.answers import Answer
from joynode.gateway.errors import OpenAIError
from joynode.gateway.forwarding import LocalForwarder
from joynode.gateway.requests import Ask
from joynode.keys import NodeKey
from joynode.messages import SamplingSpec, TokenDelta, output_hash
from joynode.p2p.peers import PeerTable
from joynode.p2p.rpc import RpcFailure
from joynode.signatures import OFFCHAIN_DOMAIN, sign

MODEL = "QmModel"
ASK = Ask(
    chat=False,
    model=MODEL,
    prompt="Hello",
    messages=None,
    sampling=SamplingSpec(max_tokens=4),
    verification="local",
    committee_size=None,
    stream=False,
    include_usage=False,
)
Reply = Callable[[wire.Message], Awaitable[wire.AnyMessage]]


class Peers:
    """A ``PeerRequests`` whose peers answer as the test says."""

    def __init__(self) -> None:
        self.peers = PeerTable(60.0)
        self.replies: dict[str, Reply] = {}
        self.asked: list[str] = []

    def join(self, key: NodeKey, models: list[str], queue: int, reply: Reply) -> str:
        beat = wire.Heartbeat(1, "v", 2, [], models, queue, 4)
        self.peers.heartbeat(key.peer_id, key.address, beat, len(self.replies) + 1)
        self.replies[key.peer_id] = reply
        return key.peer_id

    def handle_requests(
        self, kind: type[wire.Message], handler: object, *, timeout_s: float | None = None
    ) -> None:
        pass

    async def request(
        self, peer_id: str, message: wire.Message, *, timeout_s: float | None = None
    ) -> wire.AnyMessage:
        assert isinstance(message, wire.LocalAsk)
        assert message.model == MODEL
        self.asked.append(peer_id)
        return await self.replies[peer_id](message)


class Kept:
    def __init__(self) -> None:
        self.answers: list[Answer] = []

    def local(self, ask: Ask, model_id: str) -> AsyncIterator[TokenDelta | Answer]:
        raise AssertionError("a forwarded request does not run here")

    async def keep(self, answer: Answer, model_id: str) -> None:
        self.answers.append(answer)


def answered_by(key: NodeKey, tokens: tuple[int, ...] = (5, 6)) -> Reply:
    async def reply(_: wire.Message) -> wire.AnyMessage:
        await trio.lowlevel.checkpoint()
        request_id = bytes([len(tokens)]) * 32
        digest = OFFCHAIN_DOMAIN.result_digest(request_id, output_hash(tokens))
        return wire.LocalAnswer(request_id, "ok", list(tokens), 3, "stop", sign(key, digest))

    return reply


def failing(exc: Exception | wire.AnyMessage) -> Reply:
    async def reply(_: wire.Message) -> wire.AnyMessage:
        await trio.lowlevel.checkpoint()
        if isinstance(exc, Exception):
            raise exc
        return exc

    return reply


def forwarder(peers: Peers, kept: Kept, serves: bool = False) -> LocalForwarder:
    return LocalForwarder(peers, kept, lambda _: serves, lambda: OFFCHAIN_DOMAIN)


async def events_of(f: LocalForwarder) -> list[TokenDelta | Answer]:
    return [event async for event in f.local(ASK, MODEL)]


async def test_the_least_loaded_peer_is_asked_first_and_a_failed_one_is_replaced() -> None:
    peers, kept = Peers(), Kept()
    busy, idle, other = NodeKey.generate(), NodeKey.generate(), NodeKey.generate()
    peers.join(other, ["QmOther"], 0, failing(AssertionError("serves another model")))
    peers.join(busy, [MODEL], 3, answered_by(busy))
    peers.join(idle, [MODEL], 0, failing(RpcFailure("no answer in 120 s")))
    f = forwarder(peers, kept)
    assert f.forwards(MODEL)
    assert not forwarder(peers, kept, serves=True).forwards(MODEL)
    delta, answer = await events_of(f)
    assert peers.asked == [idle.peer_id, busy.peer_id]  # idle first; it failed: the next
    assert isinstance(delta, TokenDelta)
    assert delta.token_ids == (5, 6)
    assert isinstance(answer, Answer)
    assert answer.certificate["signers"] == [busy.address]
    assert kept.answers == [answer]  # for /v1/joynet/certificates


async def test_an_answer_another_key_signed_is_not_passed_on() -> None:
    peers, kept = Peers(), Kept()
    liar, stranger, full = NodeKey.generate(), NodeKey.generate(), NodeKey.generate()
    peers.join(liar, [MODEL], 0, answered_by(stranger))
    peers.join(full, [MODEL], 1, failing(wire.LocalRefusal(503, "overloaded", "engine full")))
    with pytest.raises(OpenAIError) as caught:
        await events_of(forwarder(peers, kept))
    assert caught.value.status == 503
    assert "not signed by it" in caught.value.message
    assert "engine full" in caught.value.message
    assert kept.answers == []


async def test_a_request_the_peer_refuses_as_bad_is_not_asked_again() -> None:
    peers, kept = Peers(), Kept()
    first, second = NodeKey.generate(), NodeKey.generate()
    too_long = wire.LocalRefusal(400, "context_length_exceeded", "prompt too long")
    peers.join(first, [MODEL], 0, failing(too_long))
    peers.join(second, [MODEL], 1, answered_by(second))
    with pytest.raises(OpenAIError) as caught:
        await events_of(forwarder(peers, kept))
    assert (caught.value.status, caught.value.code) == (400, "context_length_exceeded")
    assert peers.asked == [first.peer_id]


async def test_with_no_peer_serving_the_model_the_client_hears_so() -> None:
    with pytest.raises(OpenAIError, match="no peer serving QmModel is up"):
        await events_of(forwarder(Peers(), Kept()))
