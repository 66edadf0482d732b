"""A verified-inference job as this node follows it, and its rows in SQLite.

``Job`` is what every room of the consensus actor works on: the offer, the
tally of votes, this node's own vote and, for a paid job, where its escrow
stands. Jobs, the votes heard and this node's own vote (with its salt) are
written before anything is sent (state schemas 5 and 6), so a restarted node
reveals what it committed, never a second output.
"""

from __future__ import annotations

import collections
import json
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import trio

from joynode import wire
from joynode.consensus.tally import Certificate, JobTally
from joynode.messages import output_hash

CLOCK_GRACE_S = 2.0  # how far apart node clocks may be when judging deadlines
MIN_SETTLE_S = 10.0  # a paid job's reveal phase ends at least this long before its deadline

Status = Literal["pending", "certified", "failed"]
PaymentStatus = Literal["escrowed", "settled", "refunded", "unsettled"]


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
    stored: bool = False  # in SQLite: a restart takes it up again (job.get shows no other)
    # this member's inference for the job: cancelled when the requester calls the job off
    work: trio.CancelScope = field(default_factory=trio.CancelScope)
    # members that said they cannot run the job: member -> (FailureCode value, reason)
    cannot_run: dict[str, tuple[str, str]] = field(default_factory=dict)
    # stream jobs, at the requester: the executor's (token ids, text) as they came, unverified
    streamed: list[tuple[tuple[int, ...], str]] = field(default_factory=list)
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
            "prepaid": _prepaid_json(self.offer.prepaid),
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
            text: str | None = None
            token_ids: tuple[int, ...] | None = None
            if mine is not None and output_hash(mine.token_ids) == certificate.output_hash:
                text, token_ids = mine.text, mine.token_ids  # decoded by this node's own engine
            elif agreeing:
                # Only token ids are certified; take the text most of the majority sent.
                text = collections.Counter(r.text for r in agreeing).most_common(1)[0][0]
                token_ids = agreeing[0].token_ids
            # (else the certificate came from the chain alone: the output is known by hash)
            counted = [r.prompt_tokens for r in agreeing if r.prompt_tokens is not None]
            result["output"] = {
                "text": text,
                "token_ids": None if token_ids is None else list(token_ids),
                "output_hash": "0x" + certificate.output_hash.hex(),
                # as most of the majority counted it (members report it, unsigned)
                "prompt_tokens": collections.Counter(counted).most_common(1)[0][0]
                if counted
                else None,
            }
        return result


@dataclass(frozen=True)
class MyVote:
    token_ids: tuple[int, ...]
    text: str
    salt: bytes
    commitment: bytes
    revealed: bool = False
    prompt_tokens: int | None = None  # not stored: None after a restart


def trio_deadline(wall_ms: int) -> float:
    """A wall-clock deadline (ms since the epoch, as on the wire) on trio's clock."""
    return trio.current_time() + (wall_ms / 1000 - time.time())


def short(job: Job) -> str:
    return "0x" + job.request_id.hex()[:12]


def describe_refusals(job: Job) -> str:
    parts = [
        f"{verifier} refused {claimant}'s output: {reason}"
        for claimant, heard in job.refusals.items()
        for verifier, reason in heard
    ]
    return "; " + "; ".join(parts) if parts else ""


def describe_votes(tally: JobTally) -> str:
    counts = tally.counts()
    if not counts:
        return f"0 of {len(tally.committee)} members revealed"
    parts = [f"{n} for 0x{h.hex()[:12]}" for h, n in counts.most_common()]
    return f"{', '.join(parts)} (quorum {tally.quorum} of {len(tally.committee)})"


# ---- rows (state schemas 5 and 6)


def save_job(conn: sqlite3.Connection, job: Job) -> None:
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


def save_my_vote(conn: sqlite3.Connection, job: Job) -> None:
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


def save_vote(
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


def load_unfinished(conn: sqlite3.Connection) -> list[UnfinishedRow]:
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


def _prepaid_json(ticket: wire.PrepaidTicket | None) -> dict[str, Any] | None:
    """A prepaid job's signed terms (its settlement: ``prepaid.settlements``)."""
    if ticket is None:
        return None
    return {
        "client": ticket.client,
        "max_price": str(int.from_bytes(ticket.max_price, "big")),
        "nonce": str(int.from_bytes(ticket.nonce, "big")),
        "deadline": ticket.deadline,
        "contract": ticket.contract,
    }
