"""The ``consensus`` actor: verified inference by committee majority vote.

A job (``infer.submit`` on the control socket) is offered to a committee. Each
member runs it (``replicate``: every member generates; ``prefill``: the first
generates, the others check its tokens with one prefill pass), commits to its
output (a signed commitment to the output hash and a secret salt), then
reveals (tokens, salt, a signed result). A strict majority of the committee
agreeing on one output hash makes a certificate that anyone can check
(``CertificateVerifier``); a job with no possible majority, or none by the
reveal deadline, fails with the reason. Job messages go to the job's
followers only (committee and requester), straight and in order.

This module wires the job's life; each phase has its room:

- ``offering``: taking a job as requester (the offer; a paid one's escrow);
- ``committee``: an unpaid job's committee, drawn from a recent block;
- ``admission``: which offers this node takes as a member (and parking paid
  offers until the mirror shows their request);
- ``prefill`` and ``verification``: executing, or checking the executor's
  claim; ``delivery``: sending to the followers;
- ``tally``: counting votes into a certificate, spotting equivocation;
- ``settlement``: landing a paid job's certificate, refunds, reports (a
  prepaid job's certificate goes to the ``prepaid`` actor, which settles in
  batches);
- here: the job's state machine (open, vote, finish, deadlines) and recovery
  after a restart.

Every node that follows a job keeps its own tally, so each can show the
certificate. Jobs, the votes heard and this node's own vote (with its salt)
are in SQLite before anything is sent, so a restarted node reveals what it
committed, never a second output, and finishes or fails each job it knew of
with a reason.
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
from functools import partial
from typing import Any, Literal, TypeVar

import trio
from eth_utils.address import to_checksum_address
from prometheus_client import CollectorRegistry

from joynode import wire
from joynode.abc import InferenceRunner, JobNetwork, PrepaidPayments, SettlementChain
from joynode.config import ConsensusSection
from joynode.consensus.admission import Admission, Dropped
from joynode.consensus.committee import Committees
from joynode.consensus.control import JOB_ERROR, QuoteParams, SubmitParams
from joynode.consensus.delivery import REFUSED, Delivery
from joynode.consensus.job import (
    CLOCK_GRACE_S,
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
from joynode.consensus.jobs import prepaid_request_of
from joynode.consensus.metrics import ConsensusMetrics
from joynode.consensus.offering import Offering
from joynode.consensus.prefill import PrefillMember, execute
from joynode.consensus.settlement import Settlement
from joynode.consensus.streaming import TokenRelay, take_tokens, token_sink
from joynode.consensus.tally import (
    Certificate,
    CertificateVerifier,
    Equivocation,
    JobTally,
    VoteRejected,
    vote_commitment,
)
from joynode.consensus.verification import Verdict
from joynode.control.jsonrpc import RpcError
from joynode.keys import NodeKey
from joynode.messages import (
    ChainEvent,
    InferenceFailed,
    InferenceFailure,
    ServingStatus,
    output_hash,
)
from joynode.p2p.gossip import JOBS, VOTES, Topic, VerifiedGossip
from joynode.p2p.rpc import RpcFailure
from joynode.p2p.scoring import Offence
from joynode.signatures import Eip712Domain, sign
from joynode.state import StateStore

log = logging.getLogger(__name__)
T = TypeVar("T")

RESYNC_AFTER_S = (1.0, 2.0, 4.0, 8.0)  # after a restart: when to ask members for missed votes
EARLY_VOTES = 1024  # votes kept for jobs not heard of yet (gossip order is not causal)
EARLY_VOTES_PER_SIGNER = 32
KEEP_FINISHED = 1024  # finished jobs kept in memory; older ones are read from the database


@dataclasses.dataclass(frozen=True)
class ConsensusStatistics:
    """What the actor holds now (``ConsensusService.statistics``)."""

    jobs_in_memory: int
    jobs_pending: int
    offers_parked: int  # paid offers whose request this node's mirror has not shown yet
    votes_early: int  # votes for jobs not heard of yet


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
        payments: PrepaidPayments | None = None,
    ) -> None:
        self._settings = settings
        self._key = key
        self._state = state
        self._p2p = p2p
        self._inference = inference
        self._model_id_of = model_id_of
        self._domain = domain
        self._offers = offers_receive
        self._votes = votes_receive
        self._chain = chain
        self._chain_events = chain_events_receive
        self._payments = payments
        self.address = key.address
        self.jobs: dict[bytes, Job] = {}
        self._early: dict[bytes, list[tuple[wire.VoteCommit | wire.VoteReveal, str]]] = {}
        self._early_count = 0
        self._early_by_signer: dict[str, int] = {}
        self._nursery: trio.Nursery | None = None
        self._metrics = ConsensusMetrics(registry)
        committees = Committees(key.address, p2p.peers, serving_status, chain)
        self._offering = Offering(
            key.address, settings, committees, chain, verification_of, self._metrics, payments
        )
        self._admission = Admission(
            key.address, settings, committees, chain, verification_of, self._metrics, payments
        )
        self._prefill = PrefillMember(key.address, inference, self._refuse, committees.same_build)
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
        for kind in (
            wire.JobOffer,
            wire.VoteCommit,
            wire.VoteReveal,
            wire.ClaimRefusal,
            wire.JobCancel,
            wire.JobTokens,
            wire.RunRefusal,
        ):
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

    def statistics(self) -> ConsensusStatistics:
        return ConsensusStatistics(
            jobs_in_memory=len(self.jobs),
            jobs_pending=sum(1 for j in self.jobs.values() if not j.finished()),
            offers_parked=self._admission.parked,
            votes_early=self._early_count,
        )

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
            dropped = await self._on_offer(message, sender)
            if dropped is not None and message.prepaid is not None:
                return wire.ErrorReply(REFUSED, f"{dropped.reason}: {dropped.detail}"[:1024])
        elif isinstance(
            message,
            wire.VoteCommit
            | wire.VoteReveal
            | wire.ClaimRefusal
            | wire.JobCancel
            | wire.JobTokens
            | wire.RunRefusal,
        ):
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
        draft = await self._offering.draft(params, model_id)
        if params.prepaid is not False:
            offer = await self._offering.prepaid(draft, params, partial(sign, self._key))
            if offer.request_id in self.jobs or await self._known(offer.request_id):
                raise RpcError(JOB_ERROR, "that prepaid request was already submitted")
            return await self._offer_prepaid(offer)
        if params.paid or params.onchain_request_id is not None:
            # Shielded from the caller going away: once the escrow is paid, the job
            # must be recorded (and so refunded if it fails), whoever still waits.
            with trio.CancelScope(shield=True):
                offer, payment = await self._offering.paid(draft, params)
                if offer.request_id not in self.jobs and not await self._known(offer.request_id):
                    return self._offer(await self._open(offer, submitter=True, payment=payment))
        else:
            k = params.committee_size or self._settings.committee_size
            offer = await self._offering.unpaid(draft, k)
        if offer.request_id in self.jobs or await self._known(offer.request_id):
            raise RpcError(JOB_ERROR, "that job (same request and nonce) was already submitted")
        return self._offer(await self._open(offer, submitter=True))

    async def cancel(self, request_id: bytes, reason: str) -> bool:
        """Call off a pending job this node submitted: its members stop their inference and
        the job fails with ``reason``. False if there is no such job pending."""
        job = self.jobs.get(request_id)
        if job is None or job.status != "pending" or job.role == "member":
            return False
        job.work.cancel()
        self._send(job, VOTES, wire.JobCancel(request_id, reason[:256]))
        self._metrics.jobs.labels("cancelled").inc()
        await self._finish(job, "failed", f"cancelled by the requester: {reason}")
        return True

    async def quote_prepaid(self, params: QuoteParams) -> wire.JobOffer:
        """A prepaid job for ``params.client`` to sign (``prepaid.quote``)."""
        draft = await self._offering.draft(params, self._model_id_of(params.model) or params.model)
        return await self._offering.quote(draft, params)

    async def _offer_prepaid(self, offer: wire.JobOffer) -> Job:
        """Judge a prepaid offer as its members will, then ask each of them, and take it
        only if none refuses: a client whose balance does not cover it hears why before
        any inference runs."""
        assert offer.prepaid is not None
        assert self._payments is not None
        request = prepaid_request_of(offer)
        settle_by = offer.reveal_deadline_ms / 1000
        refusal = await self._payments.refusal(request, offer.prepaid.signature, settle_by)
        if refusal is not None:
            raise RpcError(JOB_ERROR, f"refused: {refusal.reason}: {refusal.detail}")
        me = self.address.lower()
        others = [a for a in offer.committee if a.lower() != me]
        refusals = await self._delivery.offer_and_hear(others, JOBS, offer)
        if refusals:
            await self._payments.released(offer.request_id)
            heard = "; ".join(f"{member}: {why}" for member, why in refusals.items())
            raise RpcError(JOB_ERROR, f"refused by the committee before running it: {heard}")
        job = await self._open(offer, submitter=True)
        self._metrics.jobs.labels("submitted").inc()
        log.info(
            "job %s: prepaid by %s, offered to %d member(s) for model %s",
            short(job),
            offer.prepaid.client,
            len(offer.committee),
            offer.model,
        )
        return job

    def _offer(self, job: Job) -> Job:
        """Send a job this node took to its committee."""
        self._send(job, JOBS, job.offer)
        self._metrics.jobs.labels("submitted").inc()
        log.info(
            "job %s: offered to %d member(s) for model %s%s",
            short(job),
            len(job.offer.committee),
            job.offer.model,
            " (paid)" if job.offer.paid else "",
        )
        return job

    async def _on_offer(self, offer: wire.JobOffer, signer: str) -> Dropped | None:
        """Take the offer if this node is to run it; why not, if it refuses it."""
        if offer.request_id in self.jobs or await self._known(offer.request_id):
            return None  # a replay (maybe of a job finished before a restart): never run it twice
        pending = [j for j in self.jobs.values() if not j.finished()]
        admitted = await self._admission.admit(offer, signer, pending)
        if isinstance(admitted, Dropped):
            return admitted
        if admitted is None or offer.request_id in self.jobs:  # (or it came again meanwhile)
            return None
        await self._open(offer, submitter=False, payment=admitted.payment)
        return None

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
        job.stored = True
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
            output = None
            on_tokens = token_sink(job, self.address, self._delivery.send_only)
            with job.work:
                try:
                    output = await (
                        self._prefill.decide(job, on_tokens)
                        if prefill
                        else execute(self._inference, job, on_tokens)
                    )
                except InferenceFailed as exc:
                    await self._cannot_run(job, exc.failure)
                    return
            if isinstance(on_tokens, TokenRelay):
                on_tokens.flush()
            if output is None:
                return
            phase = "inference" if output.executed else "verification"
            self._metrics.phase.labels(phase).observe(time.monotonic() - began)
            salt = os.urandom(32)
            commitment = vote_commitment(offer.request_id, output_hash(output.token_ids), salt)
            job.my_vote = MyVote(
                output.token_ids, output.text, salt, commitment, prompt_tokens=output.prompt_tokens
            )
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
            vote.prompt_tokens,
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
        if isinstance(message, wire.JobCancel):
            await self._on_cancel(message, sender)
            return
        if isinstance(message, wire.JobTokens):
            self._on_tokens(message, sender)
            return
        if isinstance(message, wire.RunRefusal):
            await self._on_run_refusal(message, sender)
            return
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

    async def _cannot_run(self, job: Job, failure: InferenceFailure) -> None:
        """Tell the followers this member cannot run the job as asked, and why."""
        log.info("job %s: cannot run it: %s", short(job), failure.message)
        refusal = wire.RunRefusal(job.request_id, failure.code.value, failure.message[:256])
        self._send(job, VOTES, refusal)
        await self._on_run_refusal(refusal, self.address)

    async def _on_run_refusal(self, message: wire.RunRefusal, sender: str) -> None:
        job = self._live_job(message.request_id)
        if job is None or job.status != "pending":
            return
        member = next((m for m in job.tally.committee if m.lower() == sender.lower()), None)
        if member is None or member in job.tally.reveals:
            return
        job.cannot_run[member] = (message.code, message.reason)
        job.touch()
        await self._settle(job)

    def _on_tokens(self, message: wire.JobTokens, sender: str) -> None:
        job = self._live_job(message.request_id)
        if job is not None and not take_tokens(job, message, sender):
            self._metrics.rejected.labels("stray_tokens").inc()

    async def _on_cancel(self, message: wire.JobCancel, sender: str) -> None:
        """The requester called its job off: stop this member's inference, fail the job."""
        job = self._live_job(message.request_id)
        if job is None or job.status != "pending":
            return
        if sender.lower() != job.offer.requester.lower():
            self._metrics.rejected.labels("cancel_not_requester").inc()
            return
        job.work.cancel()
        await self._finish(job, "failed", f"cancelled by the requester: {message.reason}")

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
        elif job.cannot_run and job.tally.majority_impossible(job.cannot_run):
            reasons = sorted({reason for _, reason in job.cannot_run.values()})
            await self._finish(
                job,
                "failed",
                f"{len(job.cannot_run)} of {len(job.tally.committee)} members cannot run it: "
                + "; ".join(reasons),
            )
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
        if job.offer.prepaid is not None and self._payments is not None:
            # Before the job is stored as finished: a restart decides it again and repeats this.
            if certificate is not None:
                request = prepaid_request_of(job.offer)
                await self._payments.certified(request, job.offer.prepaid.signature, certificate)
            else:
                await self._payments.released(job.request_id)
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
            self._metrics.dissents.labels("self" if dissenter == self.address else "peer").inc()
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
            if event.name == "CommitteeDrawn":
                self._offering.committee_drawn(request_id)
                for offer, signer in self._admission.release(request_id):
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
            job = Job(
                offer, self._tally(offer), role, created_at=created_at, restored=True, stored=True
            )
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
        """A job as JSON: from memory, or the stored outcome of an older one (None: unknown).
        A job is shown once it is stored, so one shown is one a restart remembers."""
        job = self.jobs.get(request_id)
        if job is not None and job.stored:
            return job.to_json()

        def read(conn: sqlite3.Connection) -> str | None:
            row = conn.execute("SELECT result FROM jobs WHERE request_id = ?", (request_id,))
            found = row.fetchone()
            return found[0] if found is not None else None

        stored = await self._state.read(read)
        return json.loads(stored) if stored is not None else None

    def _peer_of(self, address: str) -> str | None:
        return self._p2p.peers.up_peer_of(address)

    async def _answer_votes(self, peer: str, request: wire.Message) -> wire.Message:
        assert isinstance(request, wire.JobVotesRequest)
        job = self.jobs.get(request.request_id)
        return job.tally.votes() if job is not None else wire.JobVotesReply([], [])
