"""Settling a paid job on-chain once it is decided.

The agreeing members land the certificate in rank order (the first at once,
each next one ``takeover_s`` later if it has not landed); the node that
offered the job gets the escrow back past the deadline; equivocation evidence
goes to ``ProofOfInference``; and the chain's verdict (``InferenceVerified``,
``InferenceRefunded``) overrules this node's own view of the job.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

import trio
from eth_utils.address import to_checksum_address

from joynode.abc import SettlementChain
from joynode.chain.rpc import ChainUnreachable
from joynode.chain.sender import TransactionFailed
from joynode.consensus.job import Job, PaymentStatus, save_job, short, trio_deadline
from joynode.consensus.metrics import ConsensusMetrics
from joynode.consensus.tally import Certificate, CertificateVerifier, Equivocation
from joynode.messages import ChainEvent, RequestStatus
from joynode.signatures import OFFCHAIN_DOMAIN
from joynode.state import StateStore

log = logging.getLogger(__name__)
T = TypeVar("T")

REFUND_MARGIN_S = 2.0  # after a paid job's deadline, before its offerer asks for a refund
REFUND_ATTEMPTS = 30  # each REFUND_MARGIN_S apart, while the chain's clock lags ours
CHAIN_RETRY_S = 2.0  # after the RPC failed, before trying a paid job's transaction again
READ_ATTEMPTS = 10  # of reading a landed certificate's transaction, CHAIN_RETRY_S apart

JobTask = Callable[[Job], Awaitable[None]]


class _ChainUnreachable(Exception):
    """The chain's RPC failed (not a revert): try again later."""


class Settlement:
    """The paid path of the consensus actor; ``spawn`` runs a job's task in its nursery."""

    def __init__(
        self,
        address: str,
        takeover_s: float,
        chain: SettlementChain,
        state: StateStore,
        metrics: ConsensusMetrics,
        spawn: Callable[[JobTask, Job], None],
        ask_for_votes: JobTask,
    ) -> None:
        self.address = address
        self._takeover_s = takeover_s
        self._chain = chain
        self._state = state
        self._metrics = metrics
        self._spawn = spawn
        self._ask_for_votes = ask_for_votes

    async def on_chain_event(self, job: Job, event: ChainEvent) -> None:
        """``InferenceVerified`` or ``InferenceRefunded`` for one of this node's paid jobs."""
        assert job.payment is not None
        if event.name == "InferenceVerified":
            landed = self.landed_certificate(job, event)
            if job.status != "certified":
                self._spawn(self.certified_on_chain(event), job)
            elif landed is not None and job.payment.status == "escrowed":
                job.certificate = landed  # (saved with the payment just below)
            await self.pay(job, "settled", event.tx_hash, "certificate verified on-chain")
        else:
            await self.pay(job, "refunded", event.tx_hash, "not settled by its deadline")

    def after_outcome(self, job: Job) -> None:
        """A paid job's next step: land its certificate, or get its escrow back."""
        if job.payment is None or not job.escrowed():
            return
        if job.status == "certified" and job.role != "submitter":
            self._spawn(self._submit_certificate, job)
        if job.role != "member":
            self._spawn(self._refund_when_due, job)

    async def _submit_certificate(self, job: Job) -> None:
        """Land the certificate, in rank order: the first agreeing member at once, the next
        ``takeover_s`` later if it has not landed by then, and so on."""
        assert job.payment is not None
        # Gather every reveal first (this node's own too, if it has not revealed yet).
        with trio.move_on_at(trio_deadline(job.offer.reveal_deadline_ms)):
            tally = job.tally
            while len(tally.reveals) + len(tally.equivocations) < len(tally.committee):
                await job.changed.wait()
        certificate = job.tally.certificate()
        if certificate is None or self.address not in certificate.signers:
            return  # this node did not agree (or could not reveal in time)
        CertificateVerifier(job.tally.domain).verify(certificate)
        rank = certificate.signers.index(self.address)
        await trio.sleep(rank * self._takeover_s)
        action = "takeover" if rank else "submit"
        while job.payment.status == "escrowed" and time.time() < job.payment.settle_by:
            try:
                if await self._resolved_on_chain(job):
                    return
                tx = await self._chain_call(self._chain.submit_certificate, certificate)
            except TransactionFailed as exc:
                if await self._resolved_on_chain(job):
                    return  # another member's landed first
                self._metrics.onchain.labels(action, "failed").inc()
                log.warning("job %s: the certificate did not land: %s", short(job), exc)
                await self.pay(job, "unsettled", None, f"certificate refused: {exc}")
                return
            except _ChainUnreachable:
                await trio.sleep(CHAIN_RETRY_S)
                continue
            self._metrics.onchain.labels(action, "ok").inc()
            log.info("job %s: certificate landed in %s (rank %d)", short(job), tx, rank)
            job.certificate = certificate  # every agreeing signer, as the chain has it
            await self.pay(job, "settled", tx, f"submitted by {self.address}")
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
                tx = await self._chain_call(self._chain.refund, job.request_id)
            except TransactionFailed as exc:
                refused += 1
                # A chain whose clock runs behind ours has not reached the deadline yet.
                if "DeadlineNotReached" in str(exc) and refused < REFUND_ATTEMPTS:
                    await trio.sleep(REFUND_MARGIN_S)
                    continue
                self._metrics.onchain.labels("refund", "failed").inc()
                log.warning("job %s: refund refused: %s", short(job), exc)
                return
            except _ChainUnreachable:
                await trio.sleep(CHAIN_RETRY_S)
                continue
            self._metrics.onchain.labels("refund", "ok").inc()
            await self.pay(job, "refunded", tx, "not settled by its deadline")
            return

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
        info = await self._chain_call(self._chain.request_info, job.request_id)
        if info is None or info.status is RequestStatus.PENDING:
            return False
        status: PaymentStatus = "settled" if info.status is RequestStatus.SETTLED else "refunded"
        await self.pay(job, status, None, "seen on-chain")
        return True

    def report(self, job: Job, evidence: Equivocation) -> None:
        """Report ``evidence`` on-chain, if the job was signed in the deployment's domain."""
        if job.tally.domain != OFFCHAIN_DOMAIN:
            self._spawn(partial(self._report, evidence), job)

    async def _report(self, evidence: Equivocation, job: Job) -> None:
        """Slashing evidence to ``ProofOfInference``: whoever sees it first gets the reward.

        Members staked in the registry only: a forged committee of throwaway
        keys must not make this node spend gas for nothing.
        """
        chain = self._chain
        if evidence.member not in await chain.registry_candidates():
            self._metrics.onchain.labels("report", "not_staked").inc()
            return
        try:
            tx = await chain.report_equivocation(evidence)
        except TransactionFailed as exc:
            self._metrics.onchain.labels("report", "failed").inc()
            log.info(
                "job %s: equivocation of %s not reported: %s", short(job), evidence.member, exc
            )
            return
        except ChainUnreachable as exc:  # the evidence stays in SQLite for the next start
            log.info("job %s: %s's equivocation not reported: %s", short(job), evidence.member, exc)
            return
        except Exception:
            log.exception("job %s: reporting %s failed", short(job), evidence.member)
            return
        if tx is None:
            self._metrics.onchain.labels("report", "duplicate").inc()
            return
        self._metrics.onchain.labels("report", "ok").inc()
        log.warning("job %s: reported %s's equivocation in %s", short(job), evidence.member, tx)

    async def pay(self, job: Job, status: PaymentStatus, tx: str | None, detail: str) -> None:
        """Record where the escrow stands; settled and refunded are final, unsettled is not
        (another member may still land the certificate, or the offerer refund it)."""
        assert job.payment is not None
        if job.payment.status in ("settled", "refunded"):
            return  # the first final outcome heard stands (an event and a receipt agree)
        if status == job.payment.status and (tx is None or tx == job.payment.tx):
            return
        job.payment = dataclasses.replace(job.payment, status=status, tx=tx, detail=detail)
        await self._state.write(lambda conn: save_job(conn, job))
        job.touch()

    @staticmethod
    def landed_certificate(job: Job, event: ChainEvent) -> Certificate | None:
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

    async def _certificate_in_transaction(self, job: Job, event: ChainEvent) -> Certificate | None:
        """The certificate as the ``submitCertificate`` transaction carried it."""
        output = event.args.get("outputHash")
        if not isinstance(output, str):
            return None
        for _ in range(READ_ATTEMPTS):
            try:
                signatures = await self._chain_call(self._chain.landed_signatures, event.tx_hash)
                break
            except _ChainUnreachable:
                await trio.sleep(CHAIN_RETRY_S)
        else:
            return None
        if not signatures:
            return None
        return Certificate(
            job.request_id,
            job.tally.model,
            bytes.fromhex(output.removeprefix("0x")),
            job.tally.committee,
            tuple(signatures),
            tuple(signatures.values()),
        )

    def certified_on_chain(self, event: ChainEvent) -> Callable[[Job], Awaitable[None]]:
        """The chain's verdict overrules this node's: a job it failed or still follows
        (it was down or cut off while the others voted) is certified as it landed."""

        async def take_the_chains_certificate(job: Job) -> None:
            landed = self.landed_certificate(job, event)
            if landed is None:  # ask the members for the reveals this node missed
                await self._ask_for_votes(job)
                landed = self.landed_certificate(job, event)
            if job.status == "certified":
                return  # the votes just asked for decided it
            if landed is None:  # the members are out of reach: read the transaction
                landed = await self._certificate_in_transaction(job, event)
            was = f"{job.status}: {job.reason}" if job.reason else job.status
            job.status, job.certificate = "certified", landed
            job.reason = f"certified on-chain; this node had it {was}"
            if landed is None:
                job.reason += "; neither the signers' reveals nor the transaction were at hand"
            job.finished_at = job.finished_at or time.time()
            job.done.set()
            job.touch()
            await self._state.write(lambda conn: save_job(conn, job))
            self._metrics.jobs.labels("certified_on_chain").inc()
            log.info("job %s: %s", short(job), job.reason)

        return take_the_chains_certificate
