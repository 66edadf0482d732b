"""Taking a job as its requester: the offer to send, with its committee and payment.

``infer.submit`` becomes a ``JobOffer``: the request checked, the model's
verification policy, deadlines from ``[consensus]``. Unpaid, its committee is
drawn from a recent block (``consensus.committee``) and its id covers it all.
Paid, the marketplace escrows it (``requestInference``, or a request someone
else paid, found by ``onchain_request_id``) and the committee is the one it
drew on-chain; the offer waits until this node's mirror holds that committee,
since members judge the offer by their own mirrors.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable

import msgspec
import pydantic
import trio
from eth_utils.address import to_checksum_address

from joynode import wire
from joynode.abc import PrepaidPayments, SettlementChain
from joynode.chain.sender import TransactionFailed
from joynode.config import ConsensusSection
from joynode.consensus.committee import Committees, CommitteeUnavailable
from joynode.consensus.control import JOB_ERROR, QuoteParams, SignedPrepaid, SpendFor, SubmitParams
from joynode.consensus.job import MIN_SETTLE_S, Payment
from joynode.consensus.jobs import input_hash_of, prepaid_request_of, request_id_of, sampling_of
from joynode.consensus.metrics import ConsensusMetrics
from joynode.control.jsonrpc import INVALID_PARAMS, RpcError
from joynode.control.methods import describe_errors
from joynode.messages import RequestStatus, model_key
from joynode.signatures import SignatureError, prepaid_request_id, recover_address

MIRROR_WAIT_S = 10.0  # for this node's mirror to hold a request it just paid for
NONCE_SESSION_BITS, NONCE_COUNT_BITS = 40, 23  # default prepaid nonces (< 2**63)


class Offering:
    """Makes the offers of the jobs this node takes (``infer.submit``)."""

    def __init__(
        self,
        address: str,
        settings: ConsensusSection,
        committees: Committees,
        chain: SettlementChain | None,
        verification_of: Callable[[str], Awaitable[wire.Verification]],
        metrics: ConsensusMetrics,
        payments: PrepaidPayments | None,
    ) -> None:
        self._address = address
        self._settings = settings
        self._committees = committees
        self._chain = chain
        self._verification_of = verification_of
        self._metrics = metrics
        self._payments = payments
        # Default prepaid nonces: this run's random session, then one count per client, so a
        # client's consecutive requests share the contract's nonce words (256 per storage slot:
        # a fresh slot costs a settlement 20k gas more) and no other node picks the same.
        self._nonce_session = secrets.randbits(NONCE_SESSION_BITS)
        self._nonces_used: dict[str, int] = {}
        self._mirrored: dict[bytes, trio.Event] = {}  # requests this node paid, until mirrored

    def committee_drawn(self, request_id: bytes) -> None:
        """The watcher mirrored a request's drawn committee: a paid offer may go out."""
        if request_id in self._mirrored:
            self._mirrored[request_id].set()

    async def draft(self, params: SubmitParams, model_id: str) -> wire.JobOffer:
        """The request as an offer, without its id and committee yet; ``RpcError`` if bad."""
        if (params.prompt is None) == (params.messages is None):
            raise RpcError(INVALID_PARAMS, "give either prompt or messages")
        s = self._settings
        now_ms = time.time_ns() // 1_000_000
        turns = (
            [wire.ChatTurn(m.role, m.content) for m in params.messages]
            if params.messages is not None
            else None
        )
        draft = wire.JobOffer(
            request_id=b"\0" * 32,
            model=model_id,
            prompt=params.prompt,
            messages=turns,
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            seed=params.seed,
            ignore_eos=params.ignore_eos,
            stop=list(params.stop) or None,
            stream=params.stream,
            verification=on_the_wire(await self._verification_of(model_id)),
            requester=self._address,
            nonce=params.nonce if params.nonce is not None else time.time_ns(),
            committee=[self._address],
            commit_deadline_ms=now_ms + int(s.commit_timeout_s * 1000),
            reveal_deadline_ms=now_ms + int((s.commit_timeout_s + s.reveal_timeout_s) * 1000),
        )
        try:
            sampling_of(draft)
        except pydantic.ValidationError as exc:
            raise RpcError(INVALID_PARAMS, describe_errors(exc)) from None
        try:
            wire.encode(draft)
        except wire.WireError as exc:
            raise RpcError(INVALID_PARAMS, f"the job is too large to send: {exc}") from None
        return draft

    async def unpaid(self, draft: wire.JobOffer, k: int) -> wire.JobOffer:
        """The offer of an unpaid job: its committee drawn, its id over everything."""
        try:
            committee, block = await self._committees.draw(draft.model, k, draft.nonce)
        except CommitteeUnavailable as exc:
            raise RpcError(JOB_ERROR, str(exc)) from None
        offer = msgspec.structs.replace(draft, committee=committee, committee_block=block)
        return msgspec.structs.replace(offer, request_id=request_id_of(offer))

    async def paid(
        self, draft: wire.JobOffer, params: SubmitParams
    ) -> tuple[wire.JobOffer, Payment]:
        """Pay for ``draft`` on-chain (or find the request someone paid); the offer to send."""
        if self._chain is None:
            raise RpcError(INVALID_PARAMS, "paid jobs need a chain (chain.mode local or rpc)")
        input_hash = input_hash_of(draft)
        s = self._settings
        if params.onchain_request_id is not None:
            request_id = bytes.fromhex(params.onchain_request_id[2:])
            info = await self._chain.request_info(request_id)
            if info is None or info.status is not RequestStatus.PENDING:
                raise RpcError(JOB_ERROR, f"{params.onchain_request_id} is not a pending request")
            if info.input_hash != input_hash or info.model != model_key(draft.model):
                raise RpcError(
                    JOB_ERROR,
                    f"{params.onchain_request_id} was paid for another model or input "
                    f"(input hash of this one: 0x{input_hash.hex()})",
                )
            if not info.committee:  # paid by someone who did not draw its committee
                try:
                    await self._chain.draw_committee(request_id)
                except TransactionFailed as exc:
                    raise RpcError(JOB_ERROR, f"cannot draw its committee: {exc}") from None
                info = await self._chain.request_info(request_id) or info
        else:
            seconds = s.commit_timeout_s + s.reveal_timeout_s + s.settle_timeout_s
            try:
                info = await self._chain.request_inference(
                    draft.model, input_hash, params.max_price, seconds
                )
            except TransactionFailed as exc:
                self._metrics.onchain.labels("request", "failed").inc()
                raise RpcError(JOB_ERROR, f"the marketplace refused the request: {exc}") from None
            self._metrics.onchain.labels("request", "ok").inc()
        # Members judge the offer by their mirror once it holds the drawn committee (and the
        # model's registration as of then): so does this node.
        mirrored = self._mirrored.setdefault(info.request_id, trio.Event())
        if await self._chain.mirrored_request(info.request_id) is None:
            with trio.move_on_after(MIRROR_WAIT_S):
                await mirrored.wait()
        self._mirrored.pop(info.request_id, None)
        policy = await self._verification_of(draft.model)
        settle_by = time.time() + info.seconds_left
        reveal_by = min(draft.reveal_deadline_ms, int((settle_by - MIN_SETTLE_S) * 1000))
        if reveal_by <= time.time_ns() // 1_000_000:
            raise RpcError(JOB_ERROR, "the request's on-chain deadline is too close to run it")
        offer = msgspec.structs.replace(
            draft,
            request_id=info.request_id,
            requester=info.requester,
            nonce=0,
            committee=list(info.committee),
            commit_deadline_ms=min(draft.commit_deadline_ms, reveal_by),
            reveal_deadline_ms=reveal_by,
            paid=True,
            verification=on_the_wire(policy),
        )
        return offer, Payment("escrowed", info.price, settle_by)

    async def prepaid(
        self, draft: wire.JobOffer, params: SubmitParams, sign_request: Callable[[bytes], bytes]
    ) -> wire.JobOffer:
        """The offer of a prepaid job: a client's signed request (checked here, so a bad
        signature fails at once), or one this node signs as the client (``sign_request``)."""
        signed = params.prepaid
        if isinstance(signed, SignedPrepaid):
            block = signed.committee_block
            offer = await self._prepaid_offer(
                draft,
                signed.client,
                signed.max_price,
                signed.nonce,
                signed.deadline,
                (signed.committee, wire.BlockRef(block.number, bytes.fromhex(block.hash[2:]))),
            )
            signature = bytes.fromhex(signed.signature[2:])
            try:
                signer = recover_address(offer.request_id, signature)
            except SignatureError:
                signer = ""
            if signer.lower() != signed.client.lower():
                raise RpcError(
                    INVALID_PARAMS,
                    f"the signature is not {signed.client}'s over this request: sign the typed "
                    "data prepaid.quote returns, and submit the same job with it",
                )
        else:  # this node signs: for itself, or as a client's approved spender
            client = signed.client if isinstance(signed, SpendFor) else self._address
            offer = await self._prepaid_offer(
                draft, client, params.max_price, params.nonce, None, None
            )
            signature = sign_request(offer.request_id)
        assert offer.prepaid is not None
        ticket = msgspec.structs.replace(offer.prepaid, signature=signature)
        return msgspec.structs.replace(offer, prepaid=ticket)

    async def quote(self, draft: wire.JobOffer, params: QuoteParams) -> wire.JobOffer:
        """A prepaid offer for ``params.client`` to sign (its signature left blank)."""
        return await self._prepaid_offer(
            draft, params.client, params.max_price, params.nonce, params.deadline, None
        )

    async def _prepaid_offer(
        self,
        draft: wire.JobOffer,
        client: str,
        max_price: int | None,
        nonce: int | None,
        deadline: int | None,
        drawn: tuple[list[str], wire.BlockRef] | None,
    ) -> wire.JobOffer:
        if self._payments is None:
            raise RpcError(INVALID_PARAMS, "prepaid jobs need a chain (chain.mode local or rpc)")
        terms = await self._payments.terms(draft.model)
        if not terms.servable:
            raise RpcError(
                JOB_ERROR, f"model {draft.model} is not registered and active in the marketplace"
            )
        nonce = self._next_nonce(client) if nonce is None else nonce
        if drawn is None:
            try:
                committee, block = await self._committees.draw(
                    draft.model, terms.committee_size, nonce, requester=client
                )
            except CommitteeUnavailable as exc:
                raise RpcError(JOB_ERROR, str(exc)) from None
            if len(committee) < terms.committee_size or block is None:
                raise RpcError(
                    JOB_ERROR,
                    f"{len(committee)} node(s) serving {draft.model} are up; its committees "
                    f"need {terms.committee_size}",
                )
        else:
            committee, block = [to_checksum_address(a) for a in drawn[0]], drawn[1]
        ticket = wire.PrepaidTicket(
            chain_id=terms.chain_id,
            contract=terms.contract,
            client=to_checksum_address(client),
            max_price=(terms.price if max_price is None else max_price).to_bytes(32, "big"),
            nonce=nonce.to_bytes(32, "big"),
            deadline=terms.default_deadline if deadline is None else deadline,
            signature=bytes(65),
        )
        offer = msgspec.structs.replace(
            draft, nonce=0, committee=committee, committee_block=block, prepaid=ticket
        )
        return msgspec.structs.replace(
            offer, request_id=prepaid_request_id(prepaid_request_of(offer))
        )

    def _next_nonce(self, client: str) -> int:
        count = self._nonces_used.get(client.lower(), 0)
        self._nonces_used[client.lower()] = count + 1
        return (self._nonce_session << NONCE_COUNT_BITS) | count


def on_the_wire(policy: wire.Verification) -> wire.Verification | None:
    """Replicate is what an offer without a policy means (and what older nodes send)."""
    return None if policy == wire.REPLICATE else policy
