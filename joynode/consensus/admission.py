"""Offers and admission: which job offers this node takes as a committee member.

An offer is taken when this node is in its committee; an unpaid one's id is
``request_id_of`` its fields and its requester signed it; the request is well
formed; its deadlines are near and in order; this node has room
(``max_pending_jobs``, and per requester); a paid one matches the escrow the
mirror holds (until the watcher mirrors its drawn committee, it is parked);
it asks for the model's verification policy; and an unpaid committee was drawn
fairly (``consensus.committee``). Anyone may send offers, so none of this costs
a chain round trip: only the mirror (SQLite) is read. (Replays of jobs already
known are the service's to spot: it holds the jobs.)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import pydantic

from joynode import wire
from joynode.abc import PrepaidPayments, SettlementChain
from joynode.config import ConsensusSection
from joynode.consensus.committee import Committees
from joynode.consensus.job import CLOCK_GRACE_S, MIN_SETTLE_S, Job, Payment
from joynode.consensus.jobs import (
    chat_of,
    input_hash_of,
    prepaid_request_of,
    request_id_of,
    sampling_of,
)
from joynode.consensus.metrics import ConsensusMetrics
from joynode.control.methods import describe_errors
from joynode.messages import OnchainRequest, RequestStatus, model_key
from joynode.signatures import SignatureError, prepaid_request_id, recover_address

log = logging.getLogger(__name__)

PARKED_OFFERS = 256  # paid offers held until the watcher sees their request
PARKED_VARIANTS = 4  # of one request id: a forgery held first must not shut out the true one


@dataclass(frozen=True)
class Admitted:
    """An offer this node takes, and its escrow if it is paid."""

    offer: wire.JobOffer
    payment: Payment | None


class Dropped(Exception):
    """Why an offer is not taken (``reason``: the metric's label; ``detail``: for the log)."""

    def __init__(self, reason: str, signer: str, detail: str) -> None:
        super().__init__(reason)
        self.reason, self.signer, self.detail = reason, signer, detail


class Admission:
    """Judges incoming offers; holds paid ones whose request the mirror has not seen yet."""

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
        self._address = address.lower()
        self._settings = settings
        self._committees = committees
        self._chain = chain
        self._verification_of = verification_of
        self._metrics = metrics
        self._payments = payments
        self._parked: dict[bytes, list[tuple[wire.JobOffer, str]]] = {}

    @property
    def parked(self) -> int:
        """Paid offers held until their request is mirrored."""
        return sum(map(len, self._parked.values()))

    def release(self, request_id: bytes) -> list[tuple[wire.JobOffer, str]]:
        """The offers parked for a request whose committee was just mirrored: judge them again."""
        return self._parked.pop(request_id, [])

    async def admit(
        self, offer: wire.JobOffer, signer: str, pending: Sequence[Job]
    ) -> Admitted | Dropped | None:
        """The offer if this node takes it (``pending``: the jobs it runs now); why not,
        counted in ``joynode_consensus_rejected_votes`` by reason; or None when it is not
        this node's to run (or parked)."""
        try:
            return await self._judge(offer, signer, pending)
        except Dropped as drop:
            self._metrics.rejected.labels(drop.reason).inc()
            if drop.detail:
                log.info("dropping a job offer from %s: %s", drop.signer, drop.detail)
            return drop

    async def _judge(
        self, offer: wire.JobOffer, signer: str, pending: Sequence[Job]
    ) -> Admitted | None:
        members = [a.lower() for a in offer.committee]
        if self._address not in members or len(set(members)) != len(members):
            return None  # not ours to run (or a malformed committee)
        if offer.prepaid is not None:
            self._check_signed_request(offer, signer)
        elif not offer.paid:
            if request_id_of(offer) != offer.request_id:
                raise Dropped("bad_request_id", signer, "its request id does not match")
            if signer.lower() != offer.requester.lower():
                raise Dropped("not_requester", signer, "")
        try:
            sampling_of(offer)
            chat_of(offer)
        except pydantic.ValidationError as exc:
            raise Dropped("bad_offer", signer, describe_errors(exc)) from None
        reason = self._deadlines_problem(offer)
        if reason is not None:
            raise Dropped(reason, signer, "")
        s = self._settings
        from_requester = sum(1 for j in pending if j.offer.requester == offer.requester)
        if len(pending) >= s.max_pending_jobs or from_requester >= s.max_pending_per_requester:
            raise Dropped("too_many_jobs", signer, "too many jobs pending")
        payment = None
        if offer.paid:
            verdict = await self._check_paid(offer)
            if verdict is None:
                self._park(offer, signer)
                return None
            if isinstance(verdict, str):
                raise Dropped(verdict, signer, f"paid: {verdict.replace('_', ' ')}")
            payment = verdict
        # (After the paid check: once the mirror holds the request, it holds the model's
        # registration as of the request's block too.)
        policy = await self._verification_of(offer.model)
        if (offer.verification or wire.REPLICATE) != policy:
            asked = (offer.verification or wire.REPLICATE).describe()
            raise Dropped(
                "other_verification",
                signer,
                f"it asks for {asked} verification; model {offer.model} has {policy.describe()}",
            )
        if not offer.paid:
            reason = await self._committees.check(offer)
            if reason is not None:
                raise Dropped(reason, signer, reason.replace("_", " "))
        if offer.prepaid is not None:
            if self._payments is None:
                raise Dropped("prepaid_unavailable", signer, "this node takes no prepaid jobs")
            refusal = await self._payments.refusal(
                prepaid_request_of(offer), offer.prepaid.signature, offer.reveal_deadline_ms / 1000
            )
            if refusal is not None:
                raise Dropped(refusal.reason, signer, refusal.detail)
        return Admitted(offer, payment)

    def _check_signed_request(self, offer: wire.JobOffer, signer: str) -> None:
        """A prepaid offer's id is the digest its client signed (any node may relay it)."""
        assert offer.prepaid is not None
        if offer.paid:
            raise Dropped("bad_offer", signer, "an offer cannot be both paid and prepaid")
        if prepaid_request_id(prepaid_request_of(offer)) != offer.request_id:
            raise Dropped("bad_request_id", signer, "its request id is not its signed request's")
        # Signed by the client, or by a spender it approved (the prepaid actor checks that
        # approval on-chain, with the balance).
        try:
            recover_address(offer.request_id, offer.prepaid.signature)
        except SignatureError:
            raise Dropped(
                "bad_client_signature",
                signer,
                f"the request is not signed by its client {offer.prepaid.client}",
            ) from None

    def _deadlines_problem(self, offer: wire.JobOffer) -> str | None:
        now_ms = time.time_ns() // 1_000_000
        commit_by, reveal_by = offer.commit_deadline_ms, offer.reveal_deadline_ms
        if reveal_by <= now_ms or commit_by > reveal_by:
            return "late_offer"
        s = self._settings
        if commit_by > now_ms + 1000 * (s.commit_timeout_s + CLOCK_GRACE_S) or (
            reveal_by > commit_by + 1000 * (s.reveal_timeout_s + CLOCK_GRACE_S)
        ):
            return "deadline_too_far"
        return None

    async def _check_paid(self, offer: wire.JobOffer) -> Payment | str | None:
        """A paid offer's escrow if the mirrored chain record matches; why not; or None
        when the watcher has not seen the request (or its drawn committee) yet."""
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
        if self.parked >= PARKED_OFFERS or len(variants) >= PARKED_VARIANTS:
            self._metrics.rejected.labels("too_many_unseen_paid").inc()
            if not variants:
                del self._parked[offer.request_id]
            return
        variants.append((offer, signer))


def _matches(info: OnchainRequest, offer: wire.JobOffer) -> bool:
    """Whether a paid offer is the request the chain escrowed (same input, model, committee)."""
    return (
        info.input_hash == input_hash_of(offer)
        and info.model == model_key(offer.model)
        and info.requester.lower() == offer.requester.lower()
        and [a.lower() for a in info.committee] == [a.lower() for a in offer.committee]
    )
