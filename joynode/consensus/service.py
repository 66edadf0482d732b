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

import contextlib
import dataclasses
import json
import logging
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

import msgspec
import pydantic
import trio
from eth_utils.address import to_checksum_address
from prometheus_client import CollectorRegistry

from joynode import wire
from joynode.abc import InferenceRunner, JobNetwork, SettlementChain
from joynode.chain.committee import Candidate, select_committee
from joynode.chain.sender import TransactionFailed
from joynode.chain.service import model_key
from joynode.config import ConsensusSection
from joynode.consensus.control import JOB_ERROR, SubmitParams
from joynode.consensus.delivery import Delivery
from joynode.consensus.job import (
    Job,
    MyVote,
    Payment,
    Status,
    describe_refusals,
    describe_votes,
    load_unfinished,
    save_job,
    save_my_vote,
    save_vote,
    short,
    trio_deadline,
)
from joynode.consensus.jobs import chat_of, input_hash_of, request_id_of, sampling_of
from joynode.consensus.metrics import ConsensusMetrics
from joynode.consensus.prefill import PrefillMember, execute
from joynode.consensus.settlement import Settlement
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
from joynode.control.methods import describe_errors
from joynode.keys import NodeKey
from joynode.messages import (
    ChainEvent,
    OnchainRequest,
    RequestStatus,
    ServingStatus,
    output_hash,
)
from joynode.p2p.gossip import JOBS, VOTES, Topic, VerifiedGossip
from joynode.p2p.peers import PeerState
from joynode.p2p.rpc import RpcFailure
from joynode.p2p.scoring import Offence
from joynode.signatures import Eip712Domain, sign
from joynode.state import StateStore

log = logging.getLogger(__name__)
T = TypeVar("T")

CLOCK_GRACE_S = 2.0  # how far apart node clocks may be when judging deadlines
RESYNC_AFTER_S = (1.0, 2.0, 4.0, 8.0)  # after a restart: when to ask members for missed votes
EARLY_VOTES = 1024  # votes kept for jobs not heard of yet (gossip order is not causal)
EARLY_VOTES_PER_SIGNER = 32
PARKED_OFFERS = 256  # paid offers held until the watcher sees their request
KEEP_FINISHED = 1024  # finished jobs kept in memory; older ones are read from the database
MIN_SETTLE_S = 10.0  # a paid job's reveal phase ends at least this long before its deadline
MIRROR_WAIT_S = 10.0  # for this node's mirror to hold a request it just paid for


class ConsensusService:
    name = "consensus"

    def __init__(
        self,
        settings: ConsensusSection,
        key: NodeKey,
        state: StateStore,
        p2p: JobNetwork,
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
        self._metrics = ConsensusMetrics(registry)
        self._prefill = PrefillMember(key.address, inference, self._refuse)
        self._delivery = Delivery(p2p, self._peer_of, self._metrics.messages)
        self._settlement = (
            Settlement(
                key.address,
                settings.takeover_s,
                chain,
                state,
                self._metrics,
                self._spawn,
                self._ask_for_votes,
            )
            if chain is not None
            else None
        )

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
            log.exception("job %s: %s failed", short(job), fn.__name__)
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
            short(job),
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
        await self._state.write(lambda conn: save_job(conn, job))
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
            output = await (self._prefill.decide(job) if prefill else execute(self._inference, job))
            if output is None:
                return
            phase = "inference" if output.executed else "verification"
            self._metrics.phase.labels(phase).observe(time.monotonic() - began)
            salt = os.urandom(32)
            commitment = vote_commitment(offer.request_id, output_hash(output.token_ids), salt)
            job.my_vote = MyVote(output.token_ids, output.text, salt, commitment)
            await self._state.write(lambda conn: save_my_vote(conn, job))
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
            with trio.move_on_at(trio_deadline(offer.commit_deadline_ms)):
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
            await self._state.write(lambda conn: save_my_vote(conn, job))
        reveal = wire.VoteReveal(
            offer.request_id,
            list(vote.token_ids),
            vote.text,
            vote.salt,
            sign(self._key, domain.result_digest(offer.request_id, output_hash(vote.token_ids))),
        )
        await self._count_vote(job, self.address, reveal)
        self._send(job, VOTES, reveal)

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

    def _report(self, job: Job, evidence: Equivocation) -> None:
        if self._settlement is not None:
            self._settlement.report(job, evidence)

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
            log.info("job %s: vote from %s rejected: %s", short(job), signer, exc)
            return
        if not new:
            return
        kind = "commit" if isinstance(vote, wire.VoteCommit) else "reveal"
        await self._state.write(lambda conn: save_vote(conn, job, signer, kind, vote))
        job.touch()
        evidence = job.tally.equivocations.get(signer)
        if evidence is not None and evidence.commitment_b == getattr(vote, "commitment", None):
            log.warning("job %s: %s signed two commits", short(job), signer)
            self._report(job, evidence)
        await self._settle(job)

    async def _settle(self, job: Job) -> None:
        """Finish the job once its outcome is decided."""
        certificate = job.tally.certificate()
        if certificate is not None:
            CertificateVerifier(job.tally.domain).verify(certificate)
            await self._finish(job, "certified", "", certificate)
        elif job.tally.majority_impossible():
            votes = describe_votes(job.tally) + describe_refusals(job)
            await self._finish(job, "failed", "no majority: " + votes)

    async def _deadlines(self, job: Job) -> None:
        """Fail the job if it is undecided at its reveal deadline.

        A job restored after a restart is judged no earlier than the end of its
        catch-up, since the votes that decided it may have come while the node
        was down.
        """
        at = trio_deadline(job.offer.reveal_deadline_ms)
        if job.restored:
            at = max(at, trio.current_time() + sum(RESYNC_AFTER_S) + 1)
        with trio.move_on_at(at):
            await job.done.wait()  # a decided job needs no deadline task
        if job.status == "pending":
            missing = [m for m in job.tally.committee if m not in job.tally.reveals]
            await self._finish(
                job,
                "failed",
                f"no majority by the reveal deadline: {describe_votes(job.tally)}; "
                f"no reveal from {', '.join(missing) or 'nobody'}{describe_refusals(job)}",
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
        await self._state.write(lambda conn: save_job(conn, job))
        self._evict_finished()
        self._metrics.jobs.labels(status).inc()
        self._metrics.seconds.observe(job.finished_at - job.created_at)
        log.info("job %s: %s%s", short(job), status, f" ({reason})" if reason else "")
        for dissenter in job.tally.dissenters():
            peer = self._peer_of(dissenter)
            if peer is not None and dissenter != self.address:
                self._p2p.penalize(peer, Offence.OUTVOTED)
        if self._settlement is not None:
            self._settlement.after_outcome(job)

    async def _read_chain_events(self) -> None:
        assert self._chain_events is not None
        assert self._settlement is not None
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
            job = self.jobs.get(request_id)
            if event.name in ("InferenceVerified", "InferenceRefunded") and job and job.payment:
                await self._settlement.on_chain_event(job, event)

    # ---- restart

    async def _restore(self) -> None:
        """Take up every job not over yet: pending ones, and paid ones still escrowed.

        A job is rebuilt from its offer and the votes stored, then decided
        again (the same way: the votes are the same), which also resumes a
        paid job's settlement or refund.
        """
        rows = await self._state.read(load_unfinished)
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
            log.info("job %s: restored after a restart", short(job))
            for evidence in job.tally.equivocations.values():
                self._report(job, evidence)  # reported twice is refused, never slashed twice
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
                log.debug("job %s: no votes from %s: %s", short(job), member, exc)
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

    async def job_json(self, request_id: bytes) -> dict[str, Any] | None:
        """A job as JSON: from memory, or the stored outcome of an older one (None: unknown)."""
        job = self.jobs.get(request_id)
        if job is not None:
            return job.to_json()

        def read(conn: sqlite3.Connection) -> str | None:
            row = conn.execute("SELECT result FROM jobs WHERE request_id = ?", (request_id,))
            found = row.fetchone()
            return found[0] if found is not None else None

        stored = await self._state.read(read)
        return json.loads(stored) if stored is not None else None

    def _peer_of(self, address: str) -> str | None:
        for record in self._p2p.peers.records():
            if record.address.lower() == address.lower() and record.state is PeerState.UP:
                return record.peer_id
        return None

    async def _answer_votes(self, peer: str, request: wire.Message) -> wire.Message:
        assert isinstance(request, wire.JobVotesRequest)
        job = self.jobs.get(request.request_id)
        return job.tally.votes() if job is not None else wire.JobVotesReply([], [])


def _matches(info: OnchainRequest, offer: wire.JobOffer) -> bool:
    """Whether a paid offer is the request the chain escrowed (same input, model, committee)."""
    return (
        info.input_hash == input_hash_of(offer)
        and info.model == model_key(offer.model)
        and info.requester.lower() == offer.requester.lower()
        and [a.lower() for a in info.committee] == [a.lower() for a in offer.committee]
    )


def _on_the_wire(policy: wire.Verification) -> wire.Verification | None:
    """Replicate is what an offer without a policy means (and what older nodes send)."""
    return None if policy == wire.REPLICATE else policy
