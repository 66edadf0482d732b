"""``local`` requests a gateway cannot answer itself, handed to a peer that can.

A gateway that does not serve the model, or whose engine is full, asks the up peers
that advertise the model in their heartbeats, least loaded first (queue depth over
capacity), over ``/joynet/rpc`` (``LocalAsk``). The peer answers alone and signs its
``Result`` as for its own clients (``LocalAnswer``); the gateway checks that the
signature is the peer's over that output before passing it on, keeps it for
``/v1/joynet/certificates``, and tries the next peer if one fails. The reply comes
whole: a forwarded stream is one chunk, then the certificate.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Protocol

import pydantic

from joynode import wire
from joynode.gateway.answers import Answer, last_answer
from joynode.gateway.errors import OpenAIError
from joynode.gateway.requests import Ask
from joynode.messages import ChatMessage, SamplingSpec, TokenDelta, output_hash
from joynode.p2p.peers import PeerState
from joynode.p2p.rpc import RpcFailure
from joynode.signatures import Eip712Domain, SignatureError, recover_address

if TYPE_CHECKING:
    from joynode.abc import PeerRequests
    from joynode.p2p.peers import PeerRecord

log = logging.getLogger(__name__)

FORWARD_TIMEOUT_S = 120.0  # a whole inference on the peer
PEERS_TRIED = 2  # a failed peer is followed by the next least loaded one


def ask_message(ask: Ask, model_id: str) -> wire.LocalAsk:
    s = ask.sampling
    turns = [wire.ChatTurn(m.role, m.content) for m in ask.messages or ()]
    return wire.LocalAsk(
        model=model_id,
        prompt=ask.prompt,
        messages=turns if ask.messages is not None else None,
        max_tokens=s.max_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        seed=s.seed,
        stop=list(s.stop) or None,
    )


def ask_of_message(message: wire.LocalAsk) -> Ask:
    """The request a peer forwarded; ``pydantic.ValidationError`` if it is not one."""
    messages = None
    if message.messages is not None:
        messages = tuple(
            ChatMessage.model_validate({"role": t.role, "content": t.content})
            for t in message.messages
        )
    sampling = SamplingSpec(
        max_tokens=message.max_tokens,
        temperature=message.temperature,
        top_p=message.top_p,
        top_k=message.top_k,
        seed=message.seed,
        stop=tuple(message.stop or ()),
    )
    return Ask(
        chat=messages is not None,
        model=message.model,
        prompt=message.prompt,
        messages=messages,
        sampling=sampling,
        verification="local",
        committee_size=None,
        stream=False,
        include_usage=False,
    )


class LocalAnswers(Protocol):
    """What forwarding needs of the ``Answerer``: this node's own ``local`` answers, and
    keeping a peer's."""

    def local(self, ask: Ask, model_id: str) -> AsyncIterator[TokenDelta | Answer]: ...

    async def keep(self, answer: Answer, model_id: str) -> None: ...


class LocalForwarder:
    """Hands ``local`` requests to peers, and answers the ones peers hand this node."""

    def __init__(
        self,
        network: PeerRequests,
        answerer: LocalAnswers,
        serves: Callable[[str], bool],
        domain: Callable[[], Eip712Domain],
    ) -> None:
        """``serves(model_id)``: this node serves the model and has room for one more."""
        self._network = network
        self._answerer = answerer
        self._serves = serves
        self._domain = domain

    def register(self) -> None:
        self._network.handle_requests(wire.LocalAsk, self._answer, timeout_s=FORWARD_TIMEOUT_S)

    def forwards(self, model_id: str) -> bool:
        """Whether a ``local`` request for ``model_id`` goes to a peer."""
        return not self._serves(model_id)

    def candidates(self, model_id: str) -> list[PeerRecord]:
        """The up peers that serve ``model_id``, least loaded first."""
        serving = [
            r
            for r in self._network.peers.records()
            if r.state == PeerState.UP and model_id in r.models and r.capacity > 0
        ]
        return sorted(serving, key=lambda r: (r.queue_depth / r.capacity, r.queue_depth))

    async def local(self, ask: Ask, model_id: str) -> AsyncIterator[TokenDelta | Answer]:
        """A peer's answer, whole (one chunk, then the answer)."""
        failures: list[str] = []
        for peer in self.candidates(model_id)[:PEERS_TRIED]:
            try:
                reply = await self._network.request(
                    peer.peer_id, ask_message(ask, model_id), timeout_s=FORWARD_TIMEOUT_S
                )
            except RpcFailure as exc:
                failures.append(f"{peer.address}: {exc}")
                continue
            if isinstance(reply, wire.LocalRefusal):
                if reply.status < 500 and reply.status != 429:
                    # The request itself: another peer would refuse it the same way.
                    raise OpenAIError(reply.status, reply.reason, reply.code)
                failures.append(f"{peer.address}: {reply.reason}")
                continue
            answer = self._checked(reply, peer.address, model_id)
            if answer is None:
                failures.append(f"{peer.address}: its answer is not signed by it")
                continue
            await self._answerer.keep(answer, model_id)
            yield TokenDelta(answer.text, answer.token_ids)
            yield answer
            return
        if not failures:
            raise OpenAIError(503, f"no peer serving {model_id} is up", "overloaded")
        raise OpenAIError(503, "no peer answered: " + "; ".join(failures), "overloaded")

    def _checked(self, reply: wire.AnyMessage, signer: str, model_id: str) -> Answer | None:
        """The peer's answer, if it signed this output itself."""
        if not isinstance(reply, wire.LocalAnswer):
            return None
        token_ids = tuple(reply.token_ids)
        digest = output_hash(token_ids)
        try:
            recovered = recover_address(
                self._domain().result_digest(reply.request_id, digest), reply.signature
            )
        except SignatureError:
            return None
        if recovered.lower() != signer.lower():
            return None
        return Answer(
            request_id=reply.request_id,
            text=reply.text,
            token_ids=token_ids,
            prompt_tokens=reply.prompt_tokens,
            finish_reason=reply.finish_reason,
            verification="local",
            certificate={
                "request_id": "0x" + reply.request_id.hex(),
                "model": model_id,
                "output_hash": "0x" + digest.hex(),
                "committee": [recovered],
                "signers": [recovered],
                "signatures": ["0x" + reply.signature.hex()],
            },
            settlement="unpaid",
        )

    async def _answer(self, peer: str, request: wire.Message) -> wire.Message:
        """A peer's ``LocalAsk``: this node answers it as its own ``local`` request."""
        assert isinstance(request, wire.LocalAsk)
        try:
            ask = ask_of_message(request)
        except pydantic.ValidationError as exc:
            return wire.LocalRefusal(400, None, f"not a request: {exc.errors()[0]['msg']}"[:256])
        try:
            answer = await last_answer(self._answerer.local(ask, request.model))
        except OpenAIError as exc:
            return wire.LocalRefusal(exc.status, exc.code, exc.message[:256])
        log.info("gateway: answered a local request for %s", peer)
        return wire.LocalAnswer(
            answer.request_id,
            answer.text,
            list(answer.token_ids),
            answer.prompt_tokens,
            answer.finish_reason,
            bytes.fromhex(str(answer.certificate["signatures"][0])[2:]),
        )
