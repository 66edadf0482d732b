"""The prepaid requests this node has seen, in SQLite: what each client owes, what to settle.

A request's row moves through these states::

    pending --certified--> certified --batch sent--> sending --receipt--> settled | refused
       \\--job failed--> released          ^--------- restart, not settled ----/

Pending, certified and sending requests count against their client's balance
(``pending_for``), so members never admit two requests that the balance
cannot both pay. ``sending`` rows are written before a batch is sent, so a
settler that dies mid-batch finds them at restart and asks the chain which
settled (``PrepaidInference.isSettled``) before sending the rest again; the
contract's nonce bitmap makes a second settlement impossible anyway, and this
keeps the settler from paying gas for one.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from joynode.prepaid.redemption import Redemption, signers_of
from joynode.signatures import PrepaidRequest

State = Literal["pending", "certified", "sending", "settled", "refused", "released"]
OWING: tuple[State, ...] = ("pending", "certified", "sending")


@dataclass(frozen=True)
class Due:
    """A certified request ready to settle."""

    request_id: bytes
    redemption: Redemption
    deadline: int
    certified_at: float
    first_ranked: bool  # this node ranks first in the committee: it settles without waiting


def known(conn: sqlite3.Connection, request_id: bytes) -> bool:
    row = conn.execute(
        "SELECT 1 FROM prepaid_requests WHERE request_id = ? AND state != 'released'",
        (request_id,),
    )
    return row.fetchone() is not None


def nonce_taken(conn: sqlite3.Connection, client: str, nonce: int, request_id: bytes) -> bool:
    """Whether another request of ``client`` with this nonce is owed or settled."""
    row = conn.execute(
        "SELECT 1 FROM prepaid_requests WHERE client = ? AND nonce = ? AND request_id != ? "
        "AND state IN ('pending', 'certified', 'sending', 'settled')",
        (client.lower(), str(nonce), request_id),
    )
    return row.fetchone() is not None


def owed(conn: sqlite3.Connection, client: str, now: float) -> list[tuple[int, int]]:
    """(nonce, price) of the requests of ``client`` this node saw that have not settled (nor
    expired) as far as it knows, oldest first."""
    rows = conn.execute(
        "SELECT nonce, price FROM prepaid_requests WHERE client = ? AND deadline >= ? "
        "AND state IN ('pending', 'certified', 'sending') ORDER BY rowid",
        (client.lower(), int(now)),
    )
    return [(int(nonce), int(price)) for nonce, price in rows]


def pending_for(conn: sqlite3.Connection, client: str, now: float) -> int:
    """What ``client`` owes for requests this node saw that have not settled (nor expired)."""
    return sum(price for _, price in owed(conn, client, now))


def record_pending(
    conn: sqlite3.Connection, request_id: bytes, request: PrepaidRequest, price: int
) -> None:
    conn.execute(
        "INSERT INTO prepaid_requests (request_id, client, nonce, price, deadline, state, "
        "updated_at) VALUES (?, ?, ?, ?, ?, 'pending', ?) ON CONFLICT (request_id) DO UPDATE "
        "SET state = 'pending', updated_at = excluded.updated_at WHERE state = 'released'",
        (
            request_id,
            request.client.lower(),
            str(request.nonce),
            str(price),
            request.deadline,
            time.time(),
        ),
    )


def record_certified(
    conn: sqlite3.Connection,
    request_id: bytes,
    redemption: Redemption,
    price: int,
    settle_after: float,
) -> None:
    """Queue a certified request (also one this node had not recorded: a follower's)."""
    now = time.time()
    request = redemption.request
    conn.execute(
        "INSERT INTO prepaid_requests (request_id, client, nonce, price, deadline, state, "
        "redemption, settle_after, certified_at, updated_at) "
        "VALUES (?, ?, ?, ?, ?, 'certified', ?, ?, ?, ?) ON CONFLICT (request_id) DO UPDATE "
        "SET state = 'certified', redemption = excluded.redemption, "
        "settle_after = excluded.settle_after, certified_at = excluded.certified_at, "
        "updated_at = excluded.updated_at WHERE state IN ('pending', 'released')",
        (
            request_id,
            request.client.lower(),
            str(request.nonce),
            str(price),
            request.deadline,
            redemption.to_json(),
            settle_after,
            now,
            now,
        ),
    )


def not_certified_by(
    conn: sqlite3.Connection, member: str, results: Sequence[tuple[bytes, bytes]]
) -> str | None:
    """Why ``member`` (this node) may not vouch for these (request id, output hash)
    results, or ``None``: each must be one it recorded certified with that output and
    its own signature in the certificate."""
    for request_id, output_hash in results:
        row = conn.execute(
            "SELECT redemption FROM prepaid_requests WHERE request_id = ? "
            "AND state IN ('certified', 'sending', 'settled') AND redemption IS NOT NULL",
            (request_id,),
        ).fetchone()
        if row is None:
            return f"request 0x{request_id.hex()} is not certified here"
        redemption = Redemption.from_json(row[0])
        if redemption.output_hash != output_hash:
            return f"request 0x{request_id.hex()} was certified with another output"
        if member.lower() not in signers_of(redemption):
            return f"request 0x{request_id.hex()} was certified without this node's signature"
    return None


def release(conn: sqlite3.Connection, request_id: bytes) -> None:
    """A job that failed: its request will never settle, its client owes nothing for it."""
    conn.execute(
        "UPDATE prepaid_requests SET state = 'released', updated_at = ? "
        "WHERE request_id = ? AND state = 'pending'",
        (time.time(), request_id),
    )


def due(
    conn: sqlite3.Connection, now: float, limit: int, *, until: float | None = None
) -> list[Due]:
    """Certified, unexpired requests whose turn comes by ``until`` (default ``now``; first
    signers' at once), oldest first."""
    rows = conn.execute(
        "SELECT request_id, redemption, deadline, certified_at, settle_after FROM "
        "prepaid_requests WHERE state = 'certified' AND settle_after <= ? AND deadline >= ? "
        "ORDER BY certified_at LIMIT ?",
        (now if until is None else until, int(now), limit),
    )
    return [
        Due(rid, Redemption.from_json(text), deadline, certified_at, settle_after == 0)
        for rid, text, deadline, certified_at, settle_after in rows
    ]


def mark_sending(conn: sqlite3.Connection, request_ids: Sequence[bytes]) -> None:
    now = time.time()
    conn.executemany(
        "UPDATE prepaid_requests SET state = 'sending', attempts = attempts + 1, updated_at = ? "
        "WHERE request_id = ?",
        [(now, rid) for rid in request_ids],
    )


def mark_outcome(
    conn: sqlite3.Connection, request_id: bytes, state: State, tx: str | None, reason: str = ""
) -> None:
    conn.execute(
        "UPDATE prepaid_requests SET state = ?, tx = COALESCE(?, tx), reason = ?, "
        "updated_at = ? WHERE request_id = ?",
        (state, tx, reason, time.time(), request_id),
    )


def resumed(
    conn: sqlite3.Connection, stuck: list[tuple[bytes, Redemption]], settled: set[int]
) -> None:
    """The batch cut short by a restart: ``settled`` (indexes into ``stuck``) landed."""
    for index, (rid, _) in enumerate(stuck):
        if index in settled:
            mark_outcome(conn, rid, "settled", None, "settled before a restart")
        else:
            mark_outcome(conn, rid, "certified", None, "sent again after a restart")


def retry_later(
    conn: sqlite3.Connection, request_ids: Sequence[bytes], why: str, max_attempts: int
) -> None:
    """A batch that reverted whole: its requests wait again, up to ``max_attempts`` batches."""
    for rid in request_ids:
        row = conn.execute("SELECT attempts FROM prepaid_requests WHERE request_id = ?", (rid,))
        (attempts,) = row.fetchone()
        state: State = "refused" if attempts >= max_attempts else "certified"
        mark_outcome(conn, rid, state, None, why[:512])


def settled_elsewhere(conn: sqlite3.Connection, request_id: bytes, tx: str) -> None:
    """Another node's batch settled it (the watcher saw it in ``Settled``)."""
    conn.execute(
        "UPDATE prepaid_requests SET state = 'settled', tx = ?, updated_at = ? "
        "WHERE request_id = ? AND state IN ('pending', 'certified', 'sending', 'released')",
        (tx, time.time(), request_id),
    )


def sending(conn: sqlite3.Connection) -> list[tuple[bytes, Redemption]]:
    """Requests of a batch that was being sent when the node stopped."""
    rows = conn.execute(
        "SELECT request_id, redemption FROM prepaid_requests WHERE state = 'sending'"
    )
    return [(rid, Redemption.from_json(text)) for rid, text in rows]


def counts(conn: sqlite3.Connection) -> dict[str, int]:
    rows = conn.execute("SELECT state, COUNT(*) FROM prepaid_requests GROUP BY state")
    return dict(rows)


def recent(conn: sqlite3.Connection, limit: int) -> list[dict[str, object]]:
    rows = conn.execute(
        "SELECT request_id, client, nonce, price, deadline, state, tx, reason, attempts "
        "FROM prepaid_requests ORDER BY updated_at DESC LIMIT ?",
        (limit,),
    )
    return [
        {
            "request_id": "0x" + rid.hex(),
            "client": client,
            "nonce": nonce,
            "price": price,
            "deadline": deadline,
            "state": state,
            "tx": tx,
            "reason": reason,
            "attempts": attempts,
        }
        for rid, client, nonce, price, deadline, state, tx, reason, attempts in rows
    ]
