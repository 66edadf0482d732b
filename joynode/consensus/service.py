"""The ``consensus`` actor: verified inference by committee majority vote.

A job (``infer.submit`` on the control socket) is offered to a committee over
gossip (``joynet/2/jobs``). Each member runs it on its own engine, then
commits to its output over ``joynet/2/votes`` (a signed commitment to the
output hash and a secret salt). Once every member has committed, or at the
commit deadline, members reveal (tokens, salt, a signed result). A strict
majority of the committee agreeing on one output hash makes a certificate
that anyone can check (``CertificateVerifier``); a job with no possible
majority, or none by the reveal deadline, fails with the reason.

Every node that follows a job (the one that took it, and the members) keeps
its own tally, so each can show the certificate. Jobs, the votes heard and
this node's own vote (with its salt) are in SQLite before anything is sent,
so a restarted node reveals what it committed, never a second output, and
finishes or fails each job it knew of with a reason.

Committees are the contract's: ``select_committee`` over the nodes serving
the model, weighted by stake x reputation from the mirrored registry (with no
chain, equally). Unpaid jobs draw from the healthy peers only. Paid jobs
(``infer.submit`` with ``paid``, or relaying a request someone paid with
``onchain_request_id``) are escrowed by the marketplace (``InferenceRequested``
records the input hash), and the node that took the request draws its committee
on-chain from a later block (``drawCommittee``: a seed the requester could not
choose); members check the offer against that record. Once certified, the agreeing members
gather every reveal until the reveal deadline, and the first of them in rank
order submits the certificate to ``ProofOfInference``; each next one waits
``takeover_s`` longer, checks whether it landed, and submits it if not. The
contract then rewards the signers, penalises the rest and pays out. Whoever
sees a member sign two commits reports it on-chain (slashing). A paid job
that is not settled by its deadline is refunded by the node that offered it.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import msgspec
import pydantic
import trio
from eth_utils.address import to_checksum_address
from prometheus_client import CollectorRegistry, Counter, Histogram

from joynode import wire
from joynode.abc import InferenceRunner, SettlementChain
from joynode.chain.committee import Candidate, select_committee
from joynode.chain.rpc import ChainUnreachable
from joynode.chain.sender import TransactionFailed
from joynode.chain.service import model_key
from joynode.config import ConsensusSection
from joynode.consensus.delivery import Delivery
from joynode.consensus.jobs import chat_of, input_hash_of, request_id_of, sampling_of
from joynode.consensus.prefill import Output, PrefillMember
from joynode.consensus.tally import (
    Certificate,
    CertificateVerifier,
    Equivocation,
    JobTally,
    VoteRejected,
    vote_commitment,
)
from joynode.consensus.verification import Verdict
from joynode.control.jsonrpc import INVALID_PARAMS, RpcError
from joynode.control.methods import ControlMethod, ControlSession, describe_errors
from joynode.inference.service import InferenceFailed
from joynode.keys import NodeKey
from joynode.messages import (
    ChainEvent,
    ChatMessage,
    OnchainRequest,
    RequestStatus,
    ServingStatus,
    output_hash,
)
from joynode.p2p.gossip import JOBS, VOTES, Topic, VerifiedGossip
from joynode.p2p.peers import PeerState
from joynode.p2p.rpc import RpcFailure
from joynode.p2p.scoring import Offence
from joynode.p2p.service import P2PService
from joynode.signatures import OFFCHAIN_DOMAIN, Eip712Domain, sign
from joynode.state import StateStore

log = logging.getLogger(__name__)
T = TypeVar("T")

JOB_ERROR = -32040  # JSON-RPC application error: the job is unknown or failed
CLOCK_GRACE_S = 2.0  # how far apart node clocks may be when judging deadlines
RESYNC_AFTER_S = (1.0, 2.0, 4.0, 8.0)  # after a restart: when to ask members for missed votes
EARLY_VOTES = 1024  # votes kept for jobs not heard of yet (gossip order is not causal)
EARLY_VOTES_PER_SIGNER = 32
PARKED_OFFERS = 256  # paid offers held until the watcher sees their request
KEEP_FINISHED = 1024  # finished jobs kept in memory; older ones are read from the database
MIN_SETTLE_S = 10.0  # a paid job's reveal phase ends at least this long before its deadline
REFUND_MARGIN_S = 2.0  # after a paid job's deadline, before its offerer asks for a refund
REFUND_ATTEMPTS = 30  # each REFUND_MARGIN_S apart, while the chain's clock lags ours
CHAIN_RETRY_S = 2.0  # after the RPC failed, before trying a paid job's transaction again
MIRROR_WAIT_S = 10.0  # for this node's mirror to hold a request it just paid for
Status = Literal["pending", "certified", "failed"]
PaymentStatus = Literal["escrowed", "settled", "refunded", "unsettled"]


class _ChainUnreachable(Exception):
    """The chain's RPC failed (not a revert): try again later."""


@dataclass(frozen=True)
class Payment:
    """Where a paid job's escrow stands on-chain.

    ``escrowed`` until ``InferenceVerified`` (``settled``) or a refund
    (``refunded``); ``unsettled`` when this node gave up on landing the
    certificate (``detail`` says why). ``settle_by`` is the on-chain deadline
    on this machine's clock.
    """

    status: PaymentStatus
    price: int
    settle_by: float
    tx: str | None = None
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "price": str(self.price),
            "settle_by": self.settle_by,
            "tx": self.tx,
            "detail": self.detail,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Payment:
        return cls(
            data["status"], int(data["price"]), float(data["settle_by"]), data["tx"], data["detail"]
        )


@dataclass
class Job:
    offer: wire.JobOffer
    tally: JobTally
    role: Literal["submitter", "member", "both"]
    status: Status = "pending"
    reason: str = ""
    certificate: Certificate | None = None
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    done: trio.Event = field(default_factory=trio.Event)
    changed: trio.Event = field(default_factory=trio.Event)  # set and replaced by touch()
    my_vote: MyVote | None = None
    payment: Payment | None = None  # paid jobs only
    restored: bool = False  # taken up again after a restart
    # prefill jobs: claimant -> [(verifier, reason)] for each refusal heard
    refusals: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    @property
    def request_id(self) -> bytes:
        return self.offer.request_id

    def finished(self) -> bool:
        return self.status != "pending"

    def open_for_votes(self) -> bool:
        """Pending, or certified and paid but not settled: every agreeing reveal still counts
        (the contract pays the certificate's signers and penalises every other member)."""
        return self.status == "pending" or (
            self.status == "certified" and self.payment is not None and not self.settled()
        )

    def settled(self) -> bool:
        """Nothing more will happen: decided, and a certified paid job's escrow resolved."""
        if not self.finished():
            return False
        landing = self.payment is not None and self.payment.status == "escrowed"
        return not (landing and self.status == "certified")

    def escrowed(self) -> bool:
        """A paid job whose escrow is not settled or refunded yet."""
        return self.payment is not None and self.payment.status in ("escrowed", "unsettled")

    def touch(self) -> None:
        """Wake whoever waits for this job to change."""
        self.changed.set()
        self.changed = trio.Event()

    def progress(self) -> dict[str, Any]:
        """A short view for ``job.progress`` notifications."""
        return {
            "request_id": "0x" + self.request_id.hex(),
            "status": self.status,
            "committee": len(self.tally.committee),
            "commits": len(self.tally.commits),
            "reveals": len(self.tally.reveals),
            "payment": self.payment.status if self.payment else None,
        }

    def to_json(self) -> dict[str, Any]:
        certificate = self.certificate
        result: dict[str, Any] = {
            "request_id": "0x" + self.request_id.hex(),
            "model": self.offer.model,
            "status": self.status,
            "reason": self.reason,
            "role": self.role,
            "committee": list(self.tally.committee),
            "commits": sorted(self.tally.commits),
            "reveals": sorted(self.tally.reveals),
            "dissenters": self.tally.dissenters(),
            "equivocators": sorted(self.tally.equivocations),
            "created_at": self.created_at,
            "finished_at": self.finished_at,
            "certificate": certificate.to_json() if certificate else None,
            "paid": self.offer.paid,
            "payment": self.payment.to_json() if self.payment else None,
            "verification": (self.offer.verification or wire.REPLICATE).mode,
            "refusals": [
                {"claimant": claimant, "verifier": verifier, "reason": reason}
                for claimant, heard in self.refusals.items()
                for verifier, reason in heard
            ],
        }
        if certificate is not None:
            # (not only the certificate's signers: an equivocator's reveal is voided later)
            agreeing = [
                r for r in self.tally.reveals.values() if r.output_hash == certificate.output_hash
            ]
            mine = self.my_vote
            if mine is not None and output_hash(mine.token_ids) == certificate.output_hash:
                text, token_ids = mine.text, mine.token_ids  # decoded by this node's own engine
            else:
                # Only token ids are certified; take the text most of the majority sent.
                text = collections.Counter(r.text for r in agreeing).most_common(1)[0][0]
                token_ids = agreeing[0].token_ids
            result["output"] = {
                "text": text,
                "token_ids": list(token_ids),
                "output_hash": "0x" + certificate.output_hash.hex(),
            }
        return result


@dataclass(frozen=True)
class MyVote:
    token_ids: tuple[int, ...]
    text: str
    salt: bytes
    commitment: bytes
    revealed: bool = False


class SubmitParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    model: str = pydantic.Field(min_length=1, max_length=128)
    prompt: str | None = pydantic.Field(None, max_length=wire.MAX_PROMPT_CHARS)
    messages: list[ChatMessage] | None = pydantic.Field(None, max_length=64)

    @pydantic.field_validator("messages")
    @classmethod
    def _turns_fit_the_wire(cls, value: list[ChatMessage] | None) -> list[ChatMessage] | None:
        for turn in value or []:
            if len(turn.content) > wire.MAX_PROMPT_CHARS:
                raise ValueError(f"a message is longer than {wire.MAX_PROMPT_CHARS} characters")
        return value

    max_tokens: int = pydantic.Field(64, ge=1, le=wire.MAX_OUTPUT_TOKENS)
    temperature: float = pydantic.Field(0.0, ge=0.0, le=2.0)
    top_p: float = pydantic.Field(1.0, gt=0.0, le=1.0)
    top_k: int = pydantic.Field(-1, ge=-1, le=1 << 20)
    seed: int | None = pydantic.Field(None, ge=0, le=2**63 - 1)
    ignore_eos: bool = False
    committee_size: int | None = pydantic.Field(
        None, ge=1, le=wire.MAX_COMMITTEE, description="unpaid jobs (paid: the model's)"
    )
    nonce: int | None = pydantic.Field(None, ge=0, le=2**63 - 1)
    paid: bool = pydantic.Field(False, description="pay through the marketplace from this node")
    max_price: int | None = pydantic.Field(
        None, ge=0, le=2**256 - 1, description="paid: most JOY base units to pay (default: price)"
    )
    onchain_request_id: str | None = pydantic.Field(
        None,
        pattern=r"^0x[0-9a-fA-F]{64}$",
        description="relay a request someone already paid for; this prompt must match it",
    )

    @pydantic.model_validator(mode="after")
    def _one_way_to_pay(self) -> SubmitParams:
        if self.paid and self.onchain_request_id is not None:
            raise ValueError("give paid or onchain_request_id, not both")
        return self


class JobParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    request_id: str = pydantic.Field(pattern=r"^0x[0-9a-fA-F]{64}$")
    timeout_s: float = pydantic.Field(300.0, gt=0, le=3600)


class ListParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    limit: int = pydantic.Field(50, ge=1, le=1000)


class ConsensusService:
    name = "consensus"

    def __init__(
        self,
        settings: ConsensusSection,
        key: NodeKey,
        state: StateStore,
        p2p: P2PService,
        inference: InferenceRunner,
        serving_status: Callable[[], ServingStatus],
        model_id_of: Callable[[str], str | None],
        verification_of: Callable[[str], Awaitable[wire.Verification]],
        domain: Callable[[], Eip712Domain],
        registry: CollectorRegistry,
        offers_receive: trio.MemoryReceiveChannel[VerifiedGossip],
        votes_receive: trio.MemoryReceiveChannel[VerifiedGossip],
        chain: SettlementChain | None = None,
        chain_events_receive: trio.MemoryReceiveChannel[ChainEvent] | None = None,
    ) -> None:
        self._settings = settings
        self._key = key
        self._state = state
        self._p2p = p2p
        self._inference = inference
        self._serving_status = serving_status
        self._model_id_of = model_id_of
        self._verification_of = verification_of
        self._domain = domain
        self._offers = offers_receive
        self._votes = votes_receive
        self._chain = chain
        self._chain_events = chain_events_receive
        self._parked: dict[bytes, list[tuple[wire.JobOffer, str]]] = {}  # paid, not seen on-chain
        self._mirrored: dict[bytes, trio.Event] = {}  # requests this node paid, until mirrored
        self.address = key.address
        self.jobs: dict[bytes, Job] = {}
        self._early: dict[bytes, list[tuple[wire.VoteCommit | wire.VoteReveal, str]]] = {}
        self._early_count = 0
        self._early_by_signer: dict[str, int] = {}
        self._nursery: trio.Nursery | None = None
        self._metrics = _ConsensusMetrics(registry)
        self._prefill = PrefillMember(key.address, inference, self._refuse)
        self._delivery = Delivery(p2p, self._peer_of, self._metrics.messages)

    # ---- running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._p2p.handle_requests(wire.JobVotesRequest, self._answer_votes)
        for kind in (wire.JobOffer, wire.VoteCommit, wire.VoteReveal, wire.ClaimRefusal):
            self._p2p.handle_requests(kind, self._receive_direct)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                await nursery.start(self._delivery.run)
                await self._restore()
                nursery.start_soon(self._read_offers)
                nursery.start_soon(self._read_votes)
                if self._chain_events is not None:
                    nursery.start_soon(self._read_chain_events)
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def _spawn(self, fn: Callable[[Job], Awaitable[None]], job: Job) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(self._guarded, fn, job)

    async def _guarded(self, fn: Callable[[Job], Awaitable[None]], job: Job) -> None:
        """A job's task failing (network, disk) fails that job, never the actor."""
        try:
            await fn(job)
        except Exception as exc:
            log.exception("job %s: %s failed", _short(job), fn.__name__)
            with contextlib.suppress(Exception):
                await self._finish(job, "failed", f"internal error in {fn.__name__}: {exc}")

    async def _read_offers(self) -> None:
        async for gossip in self._offers:
            if isinstance(gossip.message, wire.JobOffer):
                await self._on_offer(gossip.message, gossip.signer)

    async def _read_votes(self) -> None:
        async for gossip in self._votes:
            await self._on_vote(gossip.message, gossip.signer)

    async def _receive_direct(self, peer: str, message: wire.Message) -> wire.Message:
        """A job message a follower sent straight to this node (``_send``): the stream's
        peer id is the sender's key, so its address is as sure as a gossip signature's."""
        sender = self._p2p.address_of(peer)
        if sender is None:
            return wire.ErrorReply(400, "the sender's peer id has no secp256k1 key")
        if isinstance(message, wire.JobOffer):
            await self._on_offer(message, sender)
        elif isinstance(message, wire.VoteCommit | wire.VoteReveal | wire.ClaimRefusal):
            await self._on_vote(message, sender)
        return wire.Received()

    def _send(self, job: Job, topic: Topic, message: wire.Message) -> None:
        """Send a job's message to those who follow it: each committee member and the
        requester, straight and in order (``Delivery``), so a job costs messages in
        proportion to its committee, not to the network. Never blocks."""
        me = self.address.lower()
        followers = {a.lower(): a for a in (*job.tally.committee, job.offer.requester)}
        followers.pop(me, None)
        self._delivery.send(list(followers.values()), topic, message)

    # ---- taking a job

    async def submit(self, params: SubmitParams) -> Job:
        """Offer a new job to a committee; return it (pending)."""
        model_id = self._model_id_of(params.model) or params.model
        k = params.committee_size or self._settings.committee_size
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
            verification=_on_the_wire(await self._verification_of(model_id)),
            requester=self.address,
            nonce=params.nonce if params.nonce is not None else time.time_ns(),
            committee=[self.address],
            commit_deadline_ms=now_ms + int(self._settings.commit_timeout_s * 1000),
            reveal_deadline_ms=now_ms
            + int((self._settings.commit_timeout_s + self._settings.reveal_timeout_s) * 1000),
        )
        if (params.prompt is None) == (params.messages is None):
            raise RpcError(INVALID_PARAMS, "give either prompt or messages")
        try:
            sampling_of(draft)
        except pydantic.ValidationError as exc:
            raise RpcError(INVALID_PARAMS, describe_errors(exc)) from None
        try:
            wire.encode(draft)
        except wire.WireError as exc:
            raise RpcError(INVALID_PARAMS, f"the job is too large to send: {exc}") from None
        if params.paid or params.onchain_request_id is not None:
            # Shielded from the caller going away: once the escrow is paid, the job
            # must be recorded (and so refunded if it fails), whoever still waits.
            with trio.CancelScope(shield=True):
                offer, payment = await self._paid_offer(draft, params)
                if offer.request_id not in self.jobs and not await self._known(offer.request_id):
                    await self._open(offer, submitter=True, payment=payment)
                    return await self._offer(self.jobs[offer.request_id], model_id)
        else:
            request_id = request_id_of(draft)
            committee = await self._committee(model_id, request_id, k)
            if not committee:
                raise RpcError(
                    JOB_ERROR, f"no healthy node (this one included) serves model {model_id}"
                )
            offer = msgspec.structs.replace(draft, request_id=request_id, committee=committee)
        if offer.request_id in self.jobs or await self._known(offer.request_id):
            raise RpcError(JOB_ERROR, "that job (same request and nonce) was already submitted")
        return await self._offer(await self._open(offer, submitter=True), model_id)

    async def _offer(self, job: Job, model_id: str) -> Job:
        """Gossip a job this node took to its committee."""
        self._send(job, JOBS, job.offer)
        self._metrics.jobs.labels("submitted").inc()
        log.info(
            "job %s: offered to %d member(s) for model %s%s",
            _short(job),
            len(job.offer.committee),
            model_id,
            " (paid)" if job.offer.paid else "",
        )
        return job

    async def _paid_offer(
        self, draft: wire.JobOffer, params: SubmitParams
    ) -> tuple[wire.JobOffer, Payment]:
        """Pay for ``draft`` on-chain (or find the request someone paid); the offer to gossip."""
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
            verification=_on_the_wire(policy),
        )
        return offer, Payment("escrowed", info.price, settle_by)

    async def _committee(self, model_id: str, request_id: bytes, k: int) -> list[str]:
        """Healthy nodes serving the model (this one too), ranked as the contract ranks them.

        With a chain, each weighs stake x reputation as the mirrored registry
        says, and unregistered nodes are left out; without one, all weigh alike.
        """
        healthy = []
        if model_id in self._serving_status().models:
            healthy.append(self.address)
        for record in self._p2p.peers.records():
            if record.state is PeerState.UP and model_id in record.models:
                healthy.append(to_checksum_address(record.address))
        if self._chain is None:
            candidates = [Candidate(address, 1, 1) for address in healthy]
        else:
            registered = await self._chain.registry_candidates()
            candidates = [registered[a] for a in healthy if a in registered]
        return select_committee(candidates, request_id, k, 0)

    async def _on_offer(self, offer: wire.JobOffer, signer: str) -> None:
        if offer.request_id in self.jobs or await self._known(offer.request_id):
            return  # a replay (maybe of a job finished before a restart): never run it twice
        members = [a.lower() for a in offer.committee]
        if self.address.lower() not in members or len(set(members)) != len(members):
            return  # not ours to run (or a malformed committee)
        if not offer.paid:
            if request_id_of(offer) != offer.request_id:
                self._metrics.rejected.labels("bad_request_id").inc()
                log.info("dropping a job offer from %s: its request id does not match", signer)
                return
            if signer.lower() != offer.requester.lower():
                self._metrics.rejected.labels("not_requester").inc()
                return
        try:
            sampling_of(offer)
            chat_of(offer)
        except pydantic.ValidationError as exc:
            self._metrics.rejected.labels("bad_offer").inc()
            log.info("dropping a job offer from %s: %s", signer, describe_errors(exc))
            return
        now_ms = time.time_ns() // 1_000_000
        commit_by, reveal_by = offer.commit_deadline_ms, offer.reveal_deadline_ms
        if reveal_by <= now_ms or commit_by > reveal_by:
            self._metrics.rejected.labels("late_offer").inc()
            return
        s = self._settings
        if commit_by > now_ms + 1000 * (s.commit_timeout_s + CLOCK_GRACE_S) or (
            reveal_by > commit_by + 1000 * (s.reveal_timeout_s + CLOCK_GRACE_S)
        ):
            self._metrics.rejected.labels("deadline_too_far").inc()
            return
        pending = [j for j in self.jobs.values() if not j.finished()]
        from_requester = sum(1 for j in pending if j.offer.requester == offer.requester)
        if len(pending) >= s.max_pending_jobs or from_requester >= s.max_pending_per_requester:
            self._metrics.rejected.labels("too_many_jobs").inc()
            log.info("dropping a job offer from %s: too many jobs pending", signer)
            return
        payment = None
        if offer.paid:
            verdict = await self._check_paid(offer)
            if verdict is None:
                self._park(offer, signer)
                return
            if isinstance(verdict, str):
                self._metrics.rejected.labels(verdict).inc()
                log.info("dropping a paid job offer from %s: %s", signer, verdict)
                return
            payment = verdict
            if offer.request_id in self.jobs:  # it came again while the chain was asked
                return
        # (After the paid check: once the mirror holds the request, it holds the model's
        # registration as of the request's block too.)
        policy = await self._verification_of(offer.model)
        if (offer.verification or wire.REPLICATE) != policy:
            self._metrics.rejected.labels("other_verification").inc()
            log.info(
                "dropping a job offer from %s: it asks for %s verification; model %s has %s",
                signer,
                (offer.verification or wire.REPLICATE).describe(),
                offer.model,
                policy.describe(),
            )
            return
        if offer.request_id in self.jobs:
            return
        await self._open(offer, submitter=False, payment=payment)

    async def _check_paid(self, offer: wire.JobOffer) -> Payment | str | None:
        """A paid offer's escrow if the mirrored chain record matches; why not; or None
        when the watcher has not seen the request yet.

        Only the registry mirror (SQLite) is read, never the RPC: anyone may
        gossip paid offers, and each must not cost members a chain round trip.
        """
        if self._chain is None:
            return "paid_without_chain"
        info = await self._chain.mirrored_request(offer.request_id)
        if info is None:
            return None
        if info.status is not RequestStatus.PENDING:
            return "not_pending"
        if not info.committee:
            return None  # its committee is not drawn yet (or not mirrored)
        if not _matches(info, offer):
            return "not_as_paid"
        settle_by = time.time() + info.seconds_left
        if offer.reveal_deadline_ms > (settle_by - MIN_SETTLE_S + CLOCK_GRACE_S) * 1000:
            return "after_onchain_deadline"  # no time left to land the certificate
        return Payment("escrowed", info.price, settle_by)

    def _park(self, offer: wire.JobOffer, signer: str) -> None:
        """Hold a paid offer until the watcher mirrors its drawn committee (``CommitteeDrawn``)."""
        now_ms = time.time_ns() // 1_000_000
        for request_id, held in list(self._parked.items()):
            self._parked[request_id] = [h for h in held if h[0].reveal_deadline_ms >= now_ms]
            if not self._parked[request_id]:
                del self._parked[request_id]
        variants = self._parked.setdefault(offer.request_id, [])
        # Variants too: a forgery held first must not shut out the true offer.
        if sum(map(len, self._parked.values())) >= PARKED_OFFERS or len(variants) >= 4:
            self._metrics.rejected.labels("too_many_unseen_paid").inc()
            return
        variants.append((offer, signer))

    async def _known(self, request_id: bytes) -> bool:
        def read(conn: sqlite3.Connection) -> bool:
            row = conn.execute("SELECT 1 FROM jobs WHERE request_id = ?", (request_id,))
            return row.fetchone() is not None

        return await self._state.read(read)

    async def _open(
        self, offer: wire.JobOffer, *, submitter: bool, payment: Payment | None = None
    ) -> Job:
        member = self.address.lower() in (a.lower() for a in offer.committee)
        role: Literal["submitter", "member", "both"] = (
            "both" if submitter and member else "submitter" if submitter else "member"
        )
        job = Job(offer, self._tally(offer), role, payment=payment)
        self.jobs[offer.request_id] = job
        await self._state.write(lambda conn: _save_job(conn, job))
        for message, sender in self._early.pop(offer.request_id, []):
            self._early_count -= 1
            self._early_by_signer[sender] -= 1
            await self._on_vote(message, sender)
        if member:
            self._spawn(self._execute, job)
        self._spawn(self._deadlines, job)
        return job

    def _tally(self, offer: wire.JobOffer) -> JobTally:
        return JobTally(
            offer.request_id,
            offer.model,
            tuple(to_checksum_address(a) for a in offer.committee),
            self._domain(),
        )

    # ---- voting

    async def _execute(self, job: Job) -> None:
        """Run the job, commit to the output, and reveal when the commit phase ends.

        The vote (with its salt) is stored before anything is sent, so after a
        restart the same commit and reveal go out again, never a second output.
        """
        offer = job.offer
        prefill = offer.verification is not None and offer.verification.mode == "prefill"
        if job.my_vote is None:
            began = time.monotonic()
            output = await (self._prefill.decide(job) if prefill else self._replicate(job))
            if output is None:
                return
            phase = "inference" if output.executed else "verification"
            self._metrics.phase.labels(phase).observe(time.monotonic() - began)
            salt = os.urandom(32)
            commitment = vote_commitment(offer.request_id, output_hash(output.token_ids), salt)
            job.my_vote = MyVote(output.token_ids, output.text, salt, commitment)
            await self._state.write(lambda conn: _save_my_vote(conn, job))
        vote = job.my_vote
        domain = job.tally.domain  # the domain the job is tallied in, whatever happens later
        if self.address not in job.tally.commits:
            commit = wire.VoteCommit(
                offer.request_id,
                vote.commitment,
                sign(self._key, domain.commit_digest(offer.request_id, vote.commitment)),
            )
            await self._count_vote(job, self.address, commit)
            self._send(job, VOTES, commit)
        if not job.open_for_votes() or (vote.revealed and self.address in job.tally.reveals):
            return
        if not vote.revealed:
            # Replicate: reveal once every member has committed, or at the commit deadline.
            # Prefill: at once (the output is public: the executor's claim).
            began = time.monotonic()
            with trio.move_on_at(_trio_deadline(offer.commit_deadline_ms)):
                while (
                    not prefill
                    and len(job.tally.commits) < len(job.tally.committee)
                    and job.status == "pending"
                ):
                    await job.changed.wait()
            self._metrics.phase.labels("commit_wait").observe(time.monotonic() - began)
            if not job.open_for_votes():
                return
            job.my_vote = vote = dataclasses.replace(vote, revealed=True)
            await self._state.write(lambda conn: _save_my_vote(conn, job))
        reveal = wire.VoteReveal(
            offer.request_id,
            list(vote.token_ids),
            vote.text,
            vote.salt,
            sign(self._key, domain.result_digest(offer.request_id, output_hash(vote.token_ids))),
        )
        await self._count_vote(job, self.address, reveal)
        self._send(job, VOTES, reveal)

    async def _replicate(self, job: Job) -> Output | None:
        """Replicate verification: this member runs the job itself."""
        offer = job.offer
        try:
            with trio.move_on_at(_trio_deadline(offer.commit_deadline_ms)):
                result = await self._inference.complete(
                    offer.model, offer.prompt, chat_of(offer), sampling_of(offer)
                )
                return Output(result.token_ids, result.text, executed=True)
        except InferenceFailed as exc:
            log.warning("job %s: cannot run it: %s", _short(job), exc)
            return None
        log.warning("job %s: inference missed the commit deadline", _short(job))
        return None

    async def _refuse(self, job: Job, claimant: str, claimed: bytes, verdict: Verdict) -> None:
        """Announce that this node refused ``claimant``'s output, and take it out of its score."""
        self._metrics.rejected.labels("refused_output").inc()
        self._hear_refusal(job, self.address, claimant, verdict.reason)
        peer = self._peer_of(claimant)
        if peer is not None:
            self._p2p.penalize(peer, Offence.REFUSED_OUTPUT)
        refusal = wire.ClaimRefusal(job.request_id, claimant, claimed, verdict.reason[:256])
        self._send(job, VOTES, refusal)

    def _hear_refusal(self, job: Job, verifier: str, claimant: str, reason: str) -> None:
        heard = job.refusals.setdefault(to_checksum_address(claimant), [])
        if all(v != verifier for v, _ in heard):
            heard.append((verifier, reason))
            job.touch()

    def _live_job(self, request_id: bytes) -> Job | None:
        return self.jobs.get(request_id)

    def _evict_finished(self) -> None:
        """Keep the newest KEEP_FINISHED finished jobs in memory; the rest stay in SQLite."""
        finished = [j for j in self.jobs.values() if j.settled() and not j.escrowed()]
        if len(finished) > KEEP_FINISHED:
            finished.sort(key=lambda j: j.finished_at or 0)
            for job in finished[: len(finished) - KEEP_FINISHED]:
                del self.jobs[job.request_id]

    async def _on_vote(self, message: wire.AnyMessage, sender: str) -> None:
        """A vote or refusal from ``sender`` (the gossip signer, or the direct stream's peer)."""
        if isinstance(message, wire.ClaimRefusal):
            job = self._live_job(message.request_id)
            members = job.tally.committee if job is not None else ()
            signer, claimant = sender.lower(), message.claimant.lower()
            if job is not None and {signer, claimant} <= {m.lower() for m in members}:
                self._hear_refusal(job, to_checksum_address(signer), claimant, message.reason)
            return
        if not isinstance(message, wire.VoteCommit | wire.VoteReveal):
            return
        job = self._live_job(message.request_id)
        if job is None:
            from_signer = self._early_by_signer.get(sender, 0)
            if self._early_count < EARLY_VOTES and from_signer < EARLY_VOTES_PER_SIGNER:
                self._early.setdefault(message.request_id, []).append((message, sender))
                self._early_count += 1
                self._early_by_signer[sender] = from_signer + 1
            return
        if not job.open_for_votes():
            return
        now_ms = time.time_ns() // 1_000_000
        grace_ms = CLOCK_GRACE_S * 1000
        if (
            isinstance(message, wire.VoteCommit)
            and now_ms > job.offer.commit_deadline_ms + grace_ms
        ):
            # Committing after the commit phase could copy a revealed output.
            self._metrics.rejected.labels("late_commit").inc()
            return
        if now_ms > job.offer.reveal_deadline_ms + grace_ms:
            self._metrics.rejected.labels("late").inc()
            return
        await self._count_vote(job, sender, message)

    async def _count_vote(
        self, job: Job, signer: str, vote: wire.VoteCommit | wire.VoteReveal
    ) -> None:
        try:
            if isinstance(vote, wire.VoteCommit):
                new = job.tally.add_commit(signer, vote)
            else:
                new = job.tally.add_reveal(signer, vote)
        except VoteRejected as exc:
            self._metrics.rejected.labels(exc.reason).inc()
            log.info("job %s: vote from %s rejected: %s", _short(job), signer, exc)
            return
        if not new:
            return
        kind = "commit" if isinstance(vote, wire.VoteCommit) else "reveal"
        await self._state.write(lambda conn: _save_vote(conn, job, signer, kind, vote))
        job.touch()
        evidence = job.tally.equivocations.get(signer)
        if evidence is not None and evidence.commitment_b == getattr(vote, "commitment", None):
            log.warning("job %s: %s signed two commits", _short(job), signer)
            self._spawn_report(job, evidence)
        await self._settle(job)

    async def _settle(self, job: Job) -> None:
        """Finish the job once its outcome is decided."""
        certificate = job.tally.certificate()
        if certificate is not None:
            CertificateVerifier(job.tally.domain).verify(certificate)
            await self._finish(job, "certified", "", certificate)
        elif job.tally.majority_impossible():
            votes = _describe_votes(job.tally) + _describe_refusals(job)
            await self._finish(job, "failed", "no majority: " + votes)

    async def _deadlines(self, job: Job) -> None:
        """Fail the job if it is undecided at its reveal deadline.

        A job restored after a restart is judged no earlier than the end of its
        catch-up, since the votes that decided it may have come while the node
        was down.
        """
        at = _trio_deadline(job.offer.reveal_deadline_ms)
        if job.restored:
            at = max(at, trio.current_time() + sum(RESYNC_AFTER_S) + 1)
        with trio.move_on_at(at):
            await job.done.wait()  # a decided job needs no deadline task
        if job.status == "pending":
            missing = [m for m in job.tally.committee if m not in job.tally.reveals]
            await self._finish(
                job,
                "failed",
                f"no majority by the reveal deadline: {_describe_votes(job.tally)}; "
                f"no reveal from {', '.join(missing) or 'nobody'}{_describe_refusals(job)}",
            )

    async def _finish(
        self, job: Job, status: Status, reason: str, certificate: Certificate | None = None
    ) -> None:
        if job.status != "pending":
            return
        job.status, job.reason, job.certificate = status, reason, certificate
        job.finished_at = time.time()
        job.done.set()
        job.touch()
        await self._state.write(lambda conn: _save_job(conn, job))
        self._evict_finished()
        self._metrics.jobs.labels(status).inc()
        self._metrics.seconds.observe(job.finished_at - job.created_at)
        log.info("job %s: %s%s", _short(job), status, f" ({reason})" if reason else "")
        for dissenter in job.tally.dissenters():
            peer = self._peer_of(dissenter)
            if peer is not None and dissenter != self.address:
                self._p2p.penalize(peer, Offence.OUTVOTED)
        self._after_outcome(job)

    def _after_outcome(self, job: Job) -> None:
        """A paid job's next step: land its certificate, or get its escrow back."""
        if job.payment is None or not job.escrowed() or self._chain is None:
            return
        if job.status == "certified" and job.role != "submitter":
            self._spawn(self._submit_certificate, job)
        if job.role != "member":
            self._spawn(self._refund_when_due, job)

    # ---- on-chain settlement (paid jobs)

    async def _submit_certificate(self, job: Job) -> None:
        """Land the certificate, in rank order: the first agreeing member at once, the next
        ``takeover_s`` later if it has not landed by then, and so on."""
        assert job.payment is not None
        # Gather every reveal first (this node's own too, if it has not revealed yet).
        with trio.move_on_at(_trio_deadline(job.offer.reveal_deadline_ms)):
            tally = job.tally
            while len(tally.reveals) + len(tally.equivocations) < len(tally.committee):
                await job.changed.wait()
        certificate = job.tally.certificate()
        if certificate is None or self.address not in certificate.signers:
            return  # this node did not agree (or could not reveal in time)
        CertificateVerifier(job.tally.domain).verify(certificate)
        rank = certificate.signers.index(self.address)
        await trio.sleep(rank * self._settings.takeover_s)
        action = "takeover" if rank else "submit"
        while job.payment.status == "escrowed" and time.time() < job.payment.settle_by:
            try:
                if await self._resolved_on_chain(job):
                    return
                tx = await self._chain_call(self._chain_link().submit_certificate, certificate)
            except TransactionFailed as exc:
                if await self._resolved_on_chain(job):
                    return  # another member's landed first
                self._metrics.onchain.labels(action, "failed").inc()
                log.warning("job %s: the certificate did not land: %s", _short(job), exc)
                await self._pay(job, "unsettled", None, f"certificate refused: {exc}")
                return
            except _ChainUnreachable:
                await trio.sleep(CHAIN_RETRY_S)
                continue
            self._metrics.onchain.labels(action, "ok").inc()
            log.info("job %s: certificate landed in %s (rank %d)", _short(job), tx, rank)
            job.certificate = certificate  # every agreeing signer, as the chain has it
            await self._pay(job, "settled", tx, f"submitted by {self.address}")
            return

    async def _refund_when_due(self, job: Job) -> None:
        """The offerer of a paid job gets the escrow back if nobody settles it in time."""
        assert job.payment is not None
        due = trio.current_time() + job.payment.settle_by + REFUND_MARGIN_S - time.time()
        with trio.move_on_at(due):
            while job.escrowed():
                await job.changed.wait()
        refused = 0
        while job.escrowed():
            try:
                if await self._resolved_on_chain(job):
                    return
                tx = await self._chain_call(self._chain_link().refund, job.request_id)
            except TransactionFailed as exc:
                refused += 1
                # A chain whose clock runs behind ours has not reached the deadline yet.
                if "DeadlineNotReached" in str(exc) and refused < REFUND_ATTEMPTS:
                    await trio.sleep(REFUND_MARGIN_S)
                    continue
                self._metrics.onchain.labels("refund", "failed").inc()
                log.warning("job %s: refund refused: %s", _short(job), exc)
                return
            except _ChainUnreachable:
                await trio.sleep(CHAIN_RETRY_S)
                continue
            self._metrics.onchain.labels("refund", "ok").inc()
            await self._pay(job, "refunded", tx, "not settled by its deadline")
            return

    def _chain_link(self) -> SettlementChain:
        assert self._chain is not None  # only paid jobs get here, and they need a chain
        return self._chain

    async def _chain_call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Call the chain actor; an unreachable RPC becomes ``_ChainUnreachable`` (retry later)."""
        try:
            return await fn(*args)
        except TransactionFailed:
            raise
        except ChainUnreachable as exc:  # the chain actor logs the outage, once
            raise _ChainUnreachable(str(exc)) from exc
        except Exception as exc:  # web3 and transports raise many types
            log.warning("chain call failed: %s; retrying in %.0f s", exc, CHAIN_RETRY_S)
            raise _ChainUnreachable(str(exc)) from exc

    async def _resolved_on_chain(self, job: Job) -> bool:
        """Whether the request is no longer pending on-chain; if so, the job's payment says how."""
        info = await self._chain_call(self._chain_link().request_info, job.request_id)
        if info is None or info.status is RequestStatus.PENDING:
            return False
        status: PaymentStatus = "settled" if info.status is RequestStatus.SETTLED else "refunded"
        await self._pay(job, status, None, "seen on-chain")
        return True

    def _spawn_report(self, job: Job, evidence: Equivocation) -> None:
        onchain = self._chain is not None and job.tally.domain != OFFCHAIN_DOMAIN
        if onchain and self._nursery is not None:
            self._nursery.start_soon(self._report, job, evidence)

    async def _report(self, job: Job, evidence: Equivocation) -> None:
        """Slashing evidence to ``ProofOfInference``: whoever sees it first gets the reward.

        Members staked in the registry only: a forged committee of throwaway
        keys must not make this node spend gas for nothing.
        """
        chain = self._chain_link()
        if evidence.member not in await chain.registry_candidates():
            self._metrics.onchain.labels("report", "not_staked").inc()
            return
        try:
            tx = await chain.report_equivocation(evidence)
        except TransactionFailed as exc:
            self._metrics.onchain.labels("report", "failed").inc()
            log.info(
                "job %s: equivocation of %s not reported: %s", _short(job), evidence.member, exc
            )
            return
        except ChainUnreachable as exc:  # the evidence stays in SQLite for the next start
            log.info(
                "job %s: %s's equivocation not reported: %s", _short(job), evidence.member, exc
            )
            return
        except Exception:
            log.exception("job %s: reporting %s failed", _short(job), evidence.member)
            return
        if tx is None:
            self._metrics.onchain.labels("report", "duplicate").inc()
            return
        self._metrics.onchain.labels("report", "ok").inc()
        log.warning("job %s: reported %s's equivocation in %s", _short(job), evidence.member, tx)

    async def _pay(self, job: Job, status: PaymentStatus, tx: str | None, detail: str) -> None:
        """Record where the escrow stands; settled and refunded are final, unsettled is not
        (another member may still land the certificate, or the offerer refund it)."""
        assert job.payment is not None
        if job.payment.status in ("settled", "refunded"):
            return  # the first final outcome heard stands (an event and a receipt agree)
        if status == job.payment.status and (tx is None or tx == job.payment.tx):
            return
        job.payment = dataclasses.replace(job.payment, status=status, tx=tx, detail=detail)
        await self._state.write(lambda conn: _save_job(conn, job))
        job.touch()

    @staticmethod
    def _landed_certificate(job: Job, event: ChainEvent) -> Certificate | None:
        """The certificate as it landed, from the event's signers and the reveals we hold."""
        signers = event.args.get("signers")
        output = event.args.get("outputHash")
        if not isinstance(signers, list) or not isinstance(output, str):
            return None
        reveals = [job.tally.reveals.get(to_checksum_address(str(s))) for s in signers]
        if any(r is None or r.output_hash.hex() != output.removeprefix("0x") for r in reveals):
            return None  # not every signer's reveal reached this node
        return Certificate(
            job.request_id,
            job.tally.model,
            bytes.fromhex(output.removeprefix("0x")),
            job.tally.committee,
            tuple(r.member for r in reveals if r is not None),
            tuple(r.signature for r in reveals if r is not None),
        )

    def _certified_on_chain(self, event: ChainEvent) -> Callable[[Job], Awaitable[None]]:
        """The chain's verdict overrules this node's: a job it failed or still follows
        (it was down or cut off while the others voted) is certified as it landed."""

        async def take_the_chains_certificate(job: Job) -> None:
            landed = self._landed_certificate(job, event)
            if landed is None:  # ask the members for the reveals this node missed
                await self._ask_for_votes(job)
                landed = self._landed_certificate(job, event)
            if job.status == "certified":
                return  # the votes just asked for decided it
            was = f"{job.status}: {job.reason}" if job.reason else job.status
            job.status, job.certificate = "certified", landed
            job.reason = f"certified on-chain; this node had it {was}"
            if landed is None:
                job.reason += "; it has not every signer's reveal"
            job.finished_at = job.finished_at or time.time()
            job.done.set()
            job.touch()
            await self._state.write(lambda conn: _save_job(conn, job))
            self._metrics.jobs.labels("certified_on_chain").inc()
            log.info("job %s: %s", _short(job), job.reason)

        return take_the_chains_certificate

    async def _read_chain_events(self) -> None:
        assert self._chain_events is not None
        async for event in self._chain_events:
            if event.removed or "requestId" not in event.args:
                continue  # (chain.confirmations keeps reorgs below what the watcher applies)
            request_id = bytes.fromhex(str(event.args["requestId"])[2:])
            if event.name == "CommitteeDrawn" and request_id in self._mirrored:
                self._mirrored[request_id].set()
            if event.name == "CommitteeDrawn" and request_id in self._parked:
                for offer, signer in self._parked.pop(request_id):
                    await self._on_offer(offer, signer)  # the first that matches is taken
                continue
            if event.name not in ("InferenceVerified", "InferenceRefunded"):
                continue
            job = self.jobs.get(request_id)
            if job is None or job.payment is None:
                continue
            if event.name == "InferenceVerified":
                landed = self._landed_certificate(job, event)
                if job.status != "certified":
                    self._spawn(self._certified_on_chain(event), job)
                elif landed is not None and job.payment.status == "escrowed":
                    job.certificate = landed  # (saved with the payment just below)
                await self._pay(job, "settled", event.tx_hash, "certificate verified on-chain")
            else:
                await self._pay(job, "refunded", event.tx_hash, "not settled by its deadline")

    # ---- restart

    async def _restore(self) -> None:
        """Take up every job not over yet: pending ones, and paid ones still escrowed.

        A job is rebuilt from its offer and the votes stored, then decided
        again (the same way: the votes are the same), which also resumes a
        paid job's settlement or refund.
        """
        rows = await self._state.read(_load_unfinished)
        for offer_bytes, role, created_at, payment, vote_row, votes in rows:
            offer = wire.decode(offer_bytes)
            assert isinstance(offer, wire.JobOffer)
            job = Job(offer, self._tally(offer), role, created_at=created_at, restored=True)
            if payment is not None:
                job.payment = Payment.from_json(json.loads(payment))
            self.jobs[offer.request_id] = job
            if vote_row is not None:
                token_ids, text, salt, commitment, revealed = vote_row
                job.my_vote = MyVote(
                    tuple(json.loads(token_ids)), text, salt, commitment, bool(revealed)
                )
            for signer, payload in votes:
                vote = wire.decode(payload)
                with contextlib.suppress(VoteRejected):  # they were checked when first heard
                    if isinstance(vote, wire.VoteCommit):
                        job.tally.add_commit(signer, vote)
                    elif isinstance(vote, wire.VoteReveal):
                        job.tally.add_reveal(signer, vote)
            log.info("job %s: restored after a restart", _short(job))
            for evidence in job.tally.equivocations.values():
                self._spawn_report(job, evidence)  # reported twice is refused, never slashed twice
            await self._settle(job)
            if job.open_for_votes() and role != "submitter":
                self._spawn(self._execute, job)  # runs, commits or reveals what it still can
            if job.status == "pending":
                self._spawn(self._deadlines, job)
                self._spawn(self._catch_up, job)

    async def _catch_up(self, job: Job) -> None:
        """Ask the other members for the votes gossiped while this node was down."""
        for delay in RESYNC_AFTER_S:
            await trio.sleep(delay)
            if job.finished():
                return
            await self._ask_for_votes(job)

    async def _ask_for_votes(self, job: Job) -> None:
        """Ask every other member that is up for the job's votes it holds, and count them."""
        for member in job.tally.committee:
            peer = self._peer_of(member)
            if peer is None or member == self.address:
                continue
            try:
                reply = await self._p2p.request(peer, wire.JobVotesRequest(job.request_id))
            except RpcFailure as exc:
                log.debug("job %s: no votes from %s: %s", _short(job), member, exc)
                continue
            if not isinstance(reply, wire.JobVotesReply):
                continue
            votes: list[wire.VoteCommit | wire.VoteReveal] = [*reply.commits, *reply.reveals]
            for vote in votes:
                try:
                    signer = job.tally.signer_of(vote)
                except VoteRejected:
                    continue
                await self._count_vote(job, signer, vote)

    def _peer_of(self, address: str) -> str | None:
        for record in self._p2p.peers.records():
            if record.address.lower() == address.lower() and record.state is PeerState.UP:
                return record.peer_id
        return None

    async def _answer_votes(self, peer: str, request: wire.Message) -> wire.Message:
        assert isinstance(request, wire.JobVotesRequest)
        job = self.jobs.get(request.request_id)
        return job.tally.votes() if job is not None else wire.JobVotesReply([], [])

    # ---- control

    def control_methods(self) -> list[ControlMethod]:
        async def infer_submit(params: SubmitParams, _: ControlSession) -> dict[str, Any]:
            job = await self.submit(params)
            return {
                "request_id": "0x" + job.request_id.hex(),
                "model": job.offer.model,
                "committee": list(job.tally.committee),
            }

        async def job_get(params: JobParams, _: ControlSession) -> dict[str, Any]:
            return await self._job_json(params.request_id)

        async def job_wait(params: JobParams, session: ControlSession) -> dict[str, Any]:
            job = self.jobs.get(bytes.fromhex(params.request_id[2:]))
            if job is None:
                return await self._job_json(params.request_id)  # long finished
            with trio.move_on_after(params.timeout_s):
                while not job.settled():
                    changed = job.changed
                    await session.notify("job.progress", job.progress())
                    await changed.wait()
            return job.to_json()

        async def jobs_list(params: ListParams, _: ControlSession) -> list[dict[str, Any]]:
            newest = sorted(self.jobs.values(), key=lambda j: j.created_at, reverse=True)
            return [job.to_json() for job in newest[: params.limit]]

        return [
            ControlMethod(
                "infer.submit",
                SubmitParams,
                infer_submit,
                "Offer a verified inference to a committee; returns its request id.",
            ),
            ControlMethod("job.get", JobParams, job_get, "A job's state, votes and certificate."),
            ControlMethod(
                "job.wait", JobParams, job_wait, "Wait (up to timeout_s) for a job to finish."
            ),
            ControlMethod("jobs.list", ListParams, jobs_list, "The newest jobs this node follows."),
        ]

    async def _job_json(self, request_id: str) -> dict[str, Any]:
        """A job as JSON: from memory, or the stored outcome of an older one."""
        job = self.jobs.get(bytes.fromhex(request_id[2:]))
        if job is not None:
            return job.to_json()

        def read(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(
                "SELECT result FROM jobs WHERE request_id = ?", (bytes.fromhex(request_id[2:]),)
            ).fetchone()
            return row[0] if row is not None else None

        stored = await self._state.read(read)
        if stored is None:
            raise RpcError(JOB_ERROR, f"no job {request_id} on this node")
        result: dict[str, Any] = json.loads(stored)
        return result


def _trio_deadline(wall_ms: int) -> float:
    """A wall-clock deadline (ms since the epoch, as on the wire) on trio's clock."""
    return trio.current_time() + (wall_ms / 1000 - time.time())


def _short(job: Job) -> str:
    return "0x" + job.request_id.hex()[:12]


def _matches(info: OnchainRequest, offer: wire.JobOffer) -> bool:
    """Whether a paid offer is the request the chain escrowed (same input, model, committee)."""
    return (
        info.input_hash == input_hash_of(offer)
        and info.model == model_key(offer.model)
        and info.requester.lower() == offer.requester.lower()
        and [a.lower() for a in info.committee] == [a.lower() for a in offer.committee]
    )


def _describe_refusals(job: Job) -> str:
    parts = [
        f"{verifier} refused {claimant}'s output: {reason}"
        for claimant, heard in job.refusals.items()
        for verifier, reason in heard
    ]
    return "; " + "; ".join(parts) if parts else ""


def _on_the_wire(policy: wire.Verification) -> wire.Verification | None:
    """Replicate is what an offer without a policy means (and what older nodes send)."""
    return None if policy == wire.REPLICATE else policy


def _describe_votes(tally: JobTally) -> str:
    counts = tally.counts()
    if not counts:
        return f"0 of {len(tally.committee)} members revealed"
    parts = [f"{n} for 0x{h.hex()[:12]}" for h, n in counts.most_common()]
    return f"{', '.join(parts)} (quorum {tally.quorum} of {len(tally.committee)})"


# ---- persistence (state schema 5)


def _save_job(conn: sqlite3.Connection, job: Job) -> None:
    conn.execute(
        "INSERT INTO jobs (request_id, offer, role, status, reason, certificate, result, "
        "created_at, finished_at, payment) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (request_id) DO UPDATE SET status = excluded.status, "
        "reason = excluded.reason, certificate = excluded.certificate, "
        "result = excluded.result, finished_at = excluded.finished_at, "
        "payment = excluded.payment",
        (
            job.request_id,
            wire.encode(job.offer),
            job.role,
            job.status,
            job.reason,
            json.dumps(job.certificate.to_json()) if job.certificate else None,
            json.dumps(job.to_json()) if job.finished() else None,
            job.created_at,
            job.finished_at,
            json.dumps(job.payment.to_json()) if job.payment else None,
        ),
    )


def _save_my_vote(conn: sqlite3.Connection, job: Job) -> None:
    vote = job.my_vote
    assert vote is not None
    conn.execute(
        "INSERT INTO job_my_votes (request_id, token_ids, text, salt, commitment, revealed) "
        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (request_id) DO UPDATE SET "
        "revealed = excluded.revealed",
        (
            job.request_id,
            json.dumps(list(vote.token_ids)),
            vote.text,
            vote.salt,
            vote.commitment,
            int(vote.revealed),
        ),
    )


def _save_vote(
    conn: sqlite3.Connection,
    job: Job,
    signer: str,
    kind: str,
    vote: wire.VoteCommit | wire.VoteReveal,
) -> None:
    conn.execute(
        "INSERT OR IGNORE INTO job_votes (request_id, signer, kind, payload, received_at) "
        "VALUES (?, ?, ?, ?, ?)",
        (job.request_id, signer, kind, wire.encode(vote), time.time()),
    )


UnfinishedRow = tuple[
    bytes,
    Any,
    float,
    str | None,
    tuple[str, str, bytes, bytes, int] | None,
    list[tuple[str, bytes]],
]


def _load_unfinished(conn: sqlite3.Connection) -> list[UnfinishedRow]:
    out: list[UnfinishedRow] = []
    for request_id, offer, role, created_at, payment in conn.execute(
        "SELECT request_id, offer, role, created_at, payment FROM jobs WHERE status = 'pending' "
        "OR json_extract(payment, '$.status') IN ('escrowed', 'unsettled') "
        "ORDER BY created_at"
    ).fetchall():
        vote = conn.execute(
            "SELECT token_ids, text, salt, commitment, revealed FROM job_my_votes "
            "WHERE request_id = ?",
            (request_id,),
        ).fetchone()
        votes = conn.execute(
            "SELECT signer, payload FROM job_votes WHERE request_id = ? "
            "ORDER BY kind = 'reveal', received_at",
            (request_id,),
        ).fetchall()
        out.append((offer, role, created_at, payment, vote, votes))
    return out


class _ConsensusMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.jobs = Counter(
            "joynode_consensus_jobs", "Jobs by outcome", ["outcome"], registry=registry
        )
        self.rejected = Counter(
            "joynode_consensus_rejected_votes",
            "Votes and offers refused, by reason",
            ["reason"],
            registry=registry,
        )
        self.seconds = Histogram(
            "joynode_consensus_job_seconds", "Offer to outcome", registry=registry
        )
        self.onchain = Counter(
            "joynode_consensus_onchain_transactions",
            "Paid-job transactions (request, submit, takeover, report, refund) by outcome",
            ["action", "outcome"],
            registry=registry,
        )
        self.messages = Counter(
            "joynode_consensus_messages_sent",
            "Job messages sent, by kind and route (direct: one per recipient; gossip: one "
            "publish for whoever could not be reached directly)",
            ["kind", "route"],
            registry=registry,
        )
        self.phase = Histogram(
            "joynode_consensus_phase_seconds",
            "Time in each phase (inference, waiting for commits)",
            ["phase"],
            registry=registry,
        )
