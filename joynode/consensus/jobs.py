"""A job's identity: the request id, computed the same way by every node.

``request_id = keccak256(canonical msgpack of the request fields + requester
+ nonce)``: model, prompt or messages, every sampling parameter, the
requester's address and its nonce. Receivers recompute it from a
``JobOffer`` and drop offers whose id does not match, so nobody can pass off
one request under another's id (or reuse an id for other work).
"""

from __future__ import annotations

import msgspec
from eth_utils.crypto import keccak

from joynode import wire
from joynode.messages import ChatMessage, SamplingSpec

_canonical = msgspec.msgpack.Encoder()


def request_id_of(offer: wire.JobOffer) -> bytes:
    fields = (
        offer.model,
        offer.prompt,
        [(turn.role, turn.content) for turn in offer.messages]
        if offer.messages is not None
        else None,
        offer.max_tokens,
        offer.temperature,
        offer.top_p,
        offer.top_k,
        offer.seed,
        offer.ignore_eos,
        offer.requester.lower(),
        offer.nonce,
    )
    return bytes(keccak(_canonical.encode(fields)))


def sampling_of(offer: wire.JobOffer) -> SamplingSpec:
    return SamplingSpec(
        max_tokens=offer.max_tokens,
        temperature=offer.temperature,
        top_p=offer.top_p,
        top_k=offer.top_k,
        seed=offer.seed,
        ignore_eos=offer.ignore_eos,
    )


def chat_of(offer: wire.JobOffer) -> list[ChatMessage] | None:
    if offer.messages is None:
        return None
    return [
        ChatMessage.model_validate({"role": turn.role, "content": turn.content})
        for turn in offer.messages
    ]
