"""The peer table: who is out there, how to reach them, and whether they are alive.

Fed by discovery (DHT lookups, the peerstore), by connections and by verified
heartbeats. A peer is ``up`` while it has been heard from within the timeout
and ``down`` after that; peers only discovered and never heard from are
``discovered``. Records survive restarts in the state database, so a node that
comes back knows whom to reconnect to.
"""

from __future__ import annotations

import enum
import json
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from joynode import wire


class PeerState(enum.Enum):
    DISCOVERED = "discovered"
    UP = "up"
    DOWN = "down"


@dataclass
class PeerRecord:
    peer_id: str
    address: str
    addrs: list[str] = field(default_factory=list)
    first_seen: float = 0.0
    last_seen: float | None = None
    state: PeerState = PeerState.DISCOVERED
    version: str | None = None
    protocol: int | None = None
    models: list[str] = field(default_factory=list)
    queue_depth: int = 0
    capacity: int = 0
    heartbeat_seq: int = -1
    heartbeat_sent_ms: int = -1
    build: str | None = None
    chains: list[int] = field(default_factory=list)

    def to_json(self, now: float) -> dict[str, object]:
        return {
            "peer_id": self.peer_id,
            "address": self.address,
            "addrs": self.addrs,
            "state": self.state.value,
            "last_seen_s_ago": None if self.last_seen is None else round(now - self.last_seen, 2),
            "version": self.version,
            "protocol": self.protocol,
            "models": self.models,
            "queue_depth": self.queue_depth,
            "capacity": self.capacity,
            "build": self.build,
            "chains": self.chains,
        }


@dataclass(frozen=True)
class Transition:
    peer_id: str
    state: PeerState


class PeerTable:
    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.time) -> None:
        self._timeout_s = timeout_s
        self._clock = clock
        self._records: dict[str, PeerRecord] = {}
        self._dirty: set[str] = set()
        self._forgotten: set[str] = set()

    def __len__(self) -> int:
        return len(self._records)

    def get(self, peer_id: str) -> PeerRecord | None:
        return self._records.get(peer_id)

    def records(self) -> list[PeerRecord]:
        return list(self._records.values())

    def up_peer_of(self, address: str) -> str | None:
        """The peer id of the node with this Ethereum address, while it is up."""
        for record in self._records.values():
            if record.address.lower() == address.lower() and record.state is PeerState.UP:
                return record.peer_id
        return None

    def _record(self, peer_id: str, address: str) -> PeerRecord:
        record = self._records.get(peer_id)
        if record is None:
            record = self._records[peer_id] = PeerRecord(peer_id, address, first_seen=self._clock())
        self._dirty.add(peer_id)
        return record

    def discovered(self, peer_id: str, address: str, addrs: Iterable[str]) -> None:
        record = self._record(peer_id, address)
        for addr in addrs:
            if addr not in record.addrs:
                record.addrs.append(addr)
        del record.addrs[:-16]  # keep the newest few

    def heard(self, peer_id: str, address: str) -> Transition | None:
        """A sign of life (a connection, a request); returns the transition to up, if any."""
        record = self._record(peer_id, address)
        record.last_seen = self._clock()
        if record.state is PeerState.UP:
            return None
        record.state = PeerState.UP
        return Transition(peer_id, PeerState.UP)

    def heartbeat(
        self, peer_id: str, address: str, beat: wire.Heartbeat, sent_ms: int
    ) -> Transition | None:
        """A verified heartbeat signed at ``sent_ms``; older ones than the last are ignored.

        Ordered by the signed send time, not the sequence number, which a
        restarted peer begins again at 0.
        """
        record = self._record(peer_id, address)
        if sent_ms <= record.heartbeat_sent_ms:
            return None  # an old heartbeat delivered late; a newer one already counted
        record.heartbeat_sent_ms = sent_ms
        record.heartbeat_seq = beat.seq
        record.version = beat.version
        record.protocol = beat.protocol
        record.models = list(beat.models)
        record.queue_depth = beat.queue_depth
        record.capacity = beat.capacity
        record.build = beat.build
        record.chains = list(beat.chains)
        if beat.addrs:
            record.addrs = list(beat.addrs)
        return self.heard(peer_id, address)

    def sweep(self) -> list[Transition]:
        """Mark peers not heard from within the timeout as down."""
        now = self._clock()
        changes = []
        for record in self._records.values():
            silent = record.last_seen is not None and now - record.last_seen > self._timeout_s
            if record.state is PeerState.UP and silent:
                record.state = PeerState.DOWN
                self._dirty.add(record.peer_id)
                changes.append(Transition(record.peer_id, PeerState.DOWN))
        return changes

    def forget_silent(self, after_s: float) -> list[str]:
        """Drop peers not up and not heard from for ``after_s`` (or never heard from)."""
        now = self._clock()
        gone = [
            r.peer_id
            for r in self._records.values()
            if r.state is not PeerState.UP and now - (r.last_seen or r.first_seen) > after_s
        ]
        for peer_id in gone:
            del self._records[peer_id]
            self._forgotten.add(peer_id)
        return gone

    def counts(self) -> dict[PeerState, int]:
        counts = dict.fromkeys(PeerState, 0)
        for record in self._records.values():
            counts[record.state] += 1
        return counts

    # Persistence (called through the state store, in its thread).

    def take_changes(self) -> tuple[list[PeerRecord], list[str]]:
        """Records changed and peer ids forgotten since the last call (to persist)."""
        dirty = [self._records[p] for p in self._dirty if p in self._records]
        forgotten = list(self._forgotten)
        self._dirty.clear()
        self._forgotten.clear()
        return dirty, forgotten

    @staticmethod
    def save(conn: sqlite3.Connection, records: list[PeerRecord], forgotten: list[str]) -> None:
        conn.executemany("DELETE FROM peers WHERE peer_id = ?", [(p,) for p in forgotten])
        conn.executemany(
            "INSERT INTO peers (peer_id, address, addrs, first_seen, last_seen) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (peer_id) DO UPDATE SET "
            "address = excluded.address, addrs = excluded.addrs, last_seen = excluded.last_seen",
            [
                (r.peer_id, r.address, json.dumps(r.addrs), r.first_seen, r.last_seen)
                for r in records
            ],
        )

    @staticmethod
    def load(conn: sqlite3.Connection) -> list[PeerRecord]:
        rows = conn.execute(
            "SELECT peer_id, address, addrs, first_seen, last_seen FROM peers"
        ).fetchall()
        return [
            PeerRecord(peer_id, address, json.loads(addrs), first_seen, last_seen, PeerState.DOWN)
            for peer_id, address, addrs, first_seen, last_seen in rows
        ]

    def restore(self, records: list[PeerRecord]) -> None:
        for record in records:
            self._records.setdefault(record.peer_id, record)
