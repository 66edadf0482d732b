"""The DAO's proposals and votes in SQLite, kept by the chain watcher.

``GovernanceMirror`` is one of the watcher's mirrors (``joynode.chain.watcher.Mirror``).
For every proposal a poll's governor events touched (``ProposalCreated``,
``VoteCast``, ``VoteCastWithParams``, ``ProposalExtended``, ``ProposalQueued``,
``ProposalExecuted``, ``ProposalCanceled``, applied or retracted) it re-reads
the governor's views (snapshot, deadline, votes, quorum, eta, state) and writes,
in the watcher's transaction:

- ``gov_proposals``: what the proposal does (from its ``ProposalCreated``
  event: the governor keeps no copy) and the views;
- ``gov_votes``: one row per voter and proposal, from the vote events; a
  retracted vote is deleted.

A reorg that drops a proposal leaves the governor without it (snapshot 0), and
its rows go. Rows are keyed so that an event seen twice writes the same row.

A proposal's state is not stored as it changes with time, not events (Pending,
Active, then Succeeded or Defeated): ``live_state`` computes it from the rows
and the chain's clock, the timestamp of the last block the watcher processed,
or this machine's clock if that is later (a chain that mines only on demand
keeps an old latest block while its next one will carry the time of now).
Queued, Executed and Canceled come from the last state read, as only events
change them. So ``gov.list`` and ``gov.show`` read SQLite only.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from eth_utils.crypto import keccak
from web3.exceptions import ContractLogicError

from joynode.chain.deploy import Deployment
from joynode.chain.rpc import RpcLink
from joynode.chain.watcher import MirrorWrite, chain_clock
from joynode.messages import ChainEvent

GOVERNOR = "JoyGovernor"
CREATED = "ProposalCreated"
VOTES = frozenset({"VoteCast", "VoteCastWithParams"})
TOUCHING = frozenset(
    {CREATED, *VOTES, "ProposalExtended", "ProposalQueued", "ProposalExecuted", "ProposalCanceled"}
)


class ProposalState(IntEnum):
    """OpenZeppelin Governor's ``ProposalState``, in its order."""

    PENDING = 0
    ACTIVE = 1
    CANCELED = 2
    DEFEATED = 3
    SUCCEEDED = 4
    QUEUED = 5
    EXPIRED = 6
    EXECUTED = 7

    @property
    def label(self) -> str:
        return self.name.capitalize()


STICKY = frozenset(
    {ProposalState.CANCELED, ProposalState.QUEUED, ProposalState.EXECUTED, ProposalState.EXPIRED}
)
SUPPORT = ("against", "for", "abstain")  # GovernorCountingSimple's VoteType


@dataclass(frozen=True)
class Views:
    """The governor's views of one proposal, as last read."""

    snapshot: int
    deadline: int
    against: int
    for_: int
    abstain: int
    quorum: int
    eta: int
    state: int


@dataclass(frozen=True)
class Proposal:
    proposal_id: int
    proposer: str
    targets: list[str]
    amounts: list[int]
    calldatas: list[bytes]
    description: str
    views: Views
    block: int
    tx_hash: str

    @property
    def description_hash(self) -> bytes:
        return bytes(keccak(text=self.description))

    @property
    def title(self) -> str:
        """The description's first line (a Markdown heading's text), at most 80 characters."""
        first = self.description.strip().splitlines()[0] if self.description.strip() else ""
        first = first.lstrip("#").strip()
        return first if len(first) <= 80 else first[:79] + "…"

    def quorum_reached(self) -> bool:
        return self.views.quorum <= self.views.for_ + self.views.abstain

    def state(self, now: float) -> ProposalState:
        """The state the governor would give at time ``now`` (OpenZeppelin's rules)."""
        last = ProposalState(self.views.state)
        if last in STICKY:
            return last
        if now <= self.views.snapshot:
            return ProposalState.PENDING
        if now <= self.views.deadline:
            return ProposalState.ACTIVE
        if self.quorum_reached() and self.views.for_ > self.views.against:
            return ProposalState.SUCCEEDED
        return ProposalState.DEFEATED


@dataclass(frozen=True)
class Vote:
    voter: str
    support: int
    weight: int
    reason: str
    block: int
    tx_hash: str


def _int(value: Any) -> int:
    """A uint from an event's args (large ones arrive as decimal strings)."""
    return int(str(value))


class GovernanceMirror:
    """The watcher's mirror of the governor: ``gov_proposals`` and ``gov_votes``."""

    def __init__(self, link: RpcLink, deployment: Deployment) -> None:
        self._link = link
        self._governor = deployment.contract(link.w3, GOVERNOR)
        self._token = deployment.contract(link.w3, "JoyToken")

    async def read(self, events: list[ChainEvent]) -> MirrorWrite:
        mine = [e for e in events if e.contract == GOVERNOR and e.name in TOUCHING]
        touched = {_int(e.args["proposalId"]) for e in mine}
        views = await self._link.call(self._read_views, touched) if touched else {}
        created = [e for e in mine if e.name == CREATED and not e.removed]
        votes = [e for e in mine if e.name in VOTES and not e.removed]
        unvoted = [e for e in mine if e.name in VOTES and e.removed]

        def write(conn: sqlite3.Connection) -> None:
            for event in unvoted:
                conn.execute(
                    "DELETE FROM gov_votes WHERE proposal_id = ? AND voter = ?",
                    (str(_int(event.args["proposalId"])), str(event.args["voter"])),
                )
            for event in created:
                _store_created(conn, event)
            for event in votes:
                conn.execute(
                    "INSERT OR REPLACE INTO gov_votes VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        str(_int(event.args["proposalId"])),
                        str(event.args["voter"]),
                        _int(event.args["support"]),
                        str(_int(event.args["weight"])),
                        str(event.args["reason"]),
                        event.block,
                        event.tx_hash,
                    ),
                )
            for proposal_id, seen in views.items():
                _store_views(conn, str(proposal_id), seen)

        return write

    def _read_views(self, proposal_ids: set[int]) -> dict[int, Views | None]:
        """The governor's views of each proposal; None for one it does not have (a reorg)."""
        governor = self._governor.functions
        out: dict[int, Views | None] = {}
        for proposal_id in proposal_ids:
            snapshot = int(governor.proposalSnapshot(proposal_id).call())
            if snapshot == 0:
                out[proposal_id] = None
                continue
            against, for_, abstain = governor.proposalVotes(proposal_id).call()
            out[proposal_id] = Views(
                snapshot,
                int(governor.proposalDeadline(proposal_id).call()),
                int(against),
                int(for_),
                int(abstain),
                self._quorum(snapshot),
                int(governor.proposalEta(proposal_id).call()),
                int(governor.state(proposal_id).call()),
            )
        return out

    def _quorum(self, snapshot: int) -> int:
        """The quorum at ``snapshot``; before the snapshot, what it would be with today's supply."""
        governor = self._governor.functions
        try:
            return int(governor.quorum(snapshot).call())
        except ContractLogicError:  # ERC5805FutureLookup: the snapshot is still ahead
            numerator = int(governor.quorumNumerator().call())
            denominator = int(governor.quorumDenominator().call())
            return int(self._token.functions.totalSupply().call()) * numerator // denominator


def _store_created(conn: sqlite3.Connection, event: ChainEvent) -> None:
    args: dict[str, Any] = event.args
    conn.execute(
        "INSERT OR REPLACE INTO gov_proposals VALUES "
        "(?, ?, ?, ?, ?, ?, ?, ?, '0', '0', '0', '0', 0, 0, ?, ?)",
        (
            str(_int(args["proposalId"])),
            str(args["proposer"]),
            json.dumps([str(t) for t in args["targets"]]),
            json.dumps([str(_int(v)) for v in args["values"]]),
            json.dumps([str(c) for c in args["calldatas"]]),
            str(args["description"]),
            _int(args["voteStart"]),
            _int(args["voteEnd"]),
            event.block,
            event.tx_hash,
        ),
    )


def _store_views(conn: sqlite3.Connection, proposal_id: str, views: Views | None) -> None:
    if views is None:  # gone with a reorg
        conn.execute("DELETE FROM gov_votes WHERE proposal_id = ?", (proposal_id,))
        conn.execute("DELETE FROM gov_proposals WHERE proposal_id = ?", (proposal_id,))
        return
    conn.execute(
        "UPDATE gov_proposals SET snapshot = ?, deadline = ?, votes_against = ?, votes_for = ?, "
        "votes_abstain = ?, quorum = ?, eta = ?, state = ? WHERE proposal_id = ?",
        (
            views.snapshot,
            views.deadline,
            str(views.against),
            str(views.for_),
            str(views.abstain),
            str(views.quorum),
            views.eta,
            views.state,
            proposal_id,
        ),
    )


# ---- reading the mirror (the governance actor's control methods)


def _proposal(row: tuple[Any, ...]) -> Proposal:
    """A ``gov_proposals`` row (``SELECT *``: the table's column order) as a ``Proposal``."""
    (pid, proposer, targets, amounts, calldatas, description, snapshot, deadline) = row[:8]
    (against, for_, abstain, quorum, eta, state, block, tx_hash) = row[8:]
    return Proposal(
        int(pid),
        str(proposer),
        [str(t) for t in json.loads(targets)],
        [int(v) for v in json.loads(amounts)],
        [bytes.fromhex(str(c)[2:]) for c in json.loads(calldatas)],
        str(description),
        Views(
            int(snapshot),
            int(deadline),
            int(against),
            int(for_),
            int(abstain),
            int(quorum),
            int(eta),
            int(state),
        ),
        int(block),
        str(tx_hash),
    )


def chain_now(conn: sqlite3.Connection) -> float:
    """The chain's time now, as well as the node knows it (see the module's docstring)."""
    return max(float(chain_clock(conn)), time.time())


def list_proposals(conn: sqlite3.Connection, limit: int) -> list[Proposal]:
    rows = conn.execute(
        "SELECT * FROM gov_proposals ORDER BY block DESC, rowid DESC LIMIT ?", (limit,)
    ).fetchall()
    return [_proposal(r) for r in rows]


def find_proposals(conn: sqlite3.Connection, reference: str) -> list[Proposal]:
    """The proposals whose decimal id is ``reference`` or starts with it."""
    rows = conn.execute(
        "SELECT * FROM gov_proposals WHERE proposal_id = ? OR "
        "substr(proposal_id, 1, ?) = ? LIMIT 5",
        (reference, len(reference), reference),
    ).fetchall()
    exact = [r for r in rows if r[0] == reference]
    return [_proposal(r) for r in (exact or rows)]


def votes_of(conn: sqlite3.Connection, proposal_id: int) -> list[Vote]:
    rows = conn.execute(
        "SELECT voter, support, weight, reason, block, tx_hash FROM gov_votes "
        "WHERE proposal_id = ? ORDER BY block, voter",
        (str(proposal_id),),
    ).fetchall()
    return [Vote(str(v), int(s), int(w), str(r), int(b), str(t)) for v, s, w, r, b, t in rows]
