"""A job's identity, computed the same way by every node.

Unpaid jobs: ``request_id = keccak256(canonical msgpack of the request fields
+ verification + requester + nonce + committee + its block + deadlines)``:
model, prompt or messages, every sampling parameter, the requester's address
and nonce, and who runs it until when. Receivers recompute it from a
``JobOffer`` and drop offers whose id does not match, so nobody can pass off
one request under another's id (or reuse an id for other work).

Prepaid jobs: the EIP-712 digest of the request the client signed
(``prepaid_request_of``: its ticket, model, input hash and committee), the
id ``PrepaidInference`` settles under.

Paid jobs: the marketplace makes the id (chain, contract, requester, its
nonce, model, input hash); the input hash is keccak256 of the canonical
request fields alone, so the prompt stays off-chain and receivers check the
offer against the chain's record.
"""

from __future__ import annotations

import msgspec
from eth_utils.crypto import keccak

from joynode import wire
from joynode.messages import ChatMessage, SamplingSpec, model_key
from joynode.signatures import PrepaidRequest

_canonical = msgspec.msgpack.Encoder()


def input_hash_of(offer: wire.JobOffer) -> bytes:
    """What a paid request puts on-chain: keccak256 of the canonical request (no requester)."""
    return bytes(keccak(_canonical.encode(_request_fields(offer))))


def request_id_of(offer: wire.JobOffer) -> bytes:
    """An unpaid job's id: the request, its verification, requester, nonce, committee (and
    the block it was drawn from) and deadlines.

    (A paid job's verification is its model's registration at the request's
    block, which every member reads from its mirror: not part of the input.)
    """
    policy = [msgspec.structs.astuple(offer.verification)] if offer.verification else []
    block = offer.committee_block and msgspec.structs.astuple(offer.committee_block)
    fields = (
        *_request_fields(offer),
        *policy,
        offer.requester.lower(),
        offer.nonce,
        [a.lower() for a in offer.committee],
        block,
        offer.commit_deadline_ms,
        offer.reveal_deadline_ms,
    )
    return bytes(keccak(_canonical.encode(fields)))


def prepaid_request_of(offer: wire.JobOffer) -> PrepaidRequest:
    """The request a prepaid offer's client signed: its ticket, with the offer's model,
    input hash and committee. Its EIP-712 digest (``prepaid_request_id``) is the job's id."""
    ticket = offer.prepaid
    assert ticket is not None
    return PrepaidRequest(
        chain_id=ticket.chain_id,
        contract=ticket.contract,
        client=ticket.client,
        model=model_key(offer.model),
        input_hash=input_hash_of(offer),
        max_price=int.from_bytes(ticket.max_price, "big"),
        nonce=int.from_bytes(ticket.nonce, "big"),
        deadline=ticket.deadline,
        committee=tuple(offer.committee),
    )


def _request_fields(offer: wire.JobOffer) -> tuple[object, ...]:
    # Stop sequences are appended only when given, so a request without them keeps the id
    # and input hash it had before they existed.
    stop = (offer.stop,) if offer.stop else ()
    return (
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
        *stop,
    )


def sampling_of(offer: wire.JobOffer) -> SamplingSpec:
    return SamplingSpec(
        max_tokens=offer.max_tokens,
        temperature=offer.temperature,
        top_p=offer.top_p,
        top_k=offer.top_k,
        seed=offer.seed,
        ignore_eos=offer.ignore_eos,
        stop=tuple(offer.stop or ()),
    )


def chat_of(offer: wire.JobOffer) -> list[ChatMessage] | None:
    if offer.messages is None:
        return None
    return [
        ChatMessage.model_validate({"role": turn.role, "content": turn.content})
        for turn in offer.messages
    ]
