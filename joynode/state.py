"""Durable node state: one SQLite database with versioned migrations.

The database runs in WAL mode so readers never block the writer, and every
call runs in a worker thread (serialised by a limiter of one) so the trio loop
never waits on disk. Migrations are append-only: a node opening an older
database brings it forward; one opening a newer database refuses to run.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import trio

from joynode.config import SettingError

log = logging.getLogger(__name__)

T = TypeVar("T")

# Append only: migration N brings the schema from user_version N-1 to N.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE node_meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) STRICT;
    CREATE TABLE boots (
        boot        INTEGER PRIMARY KEY AUTOINCREMENT,
        started_at  REAL NOT NULL,
        version     TEXT NOT NULL
    ) STRICT;
    """,
    """
    CREATE TABLE peers (
        peer_id     TEXT PRIMARY KEY,
        address     TEXT NOT NULL,
        addrs       TEXT NOT NULL,
        first_seen  REAL NOT NULL,
        last_seen   REAL
    ) STRICT;
    """,
    """
    CREATE TABLE chain_cursor (
        id          INTEGER PRIMARY KEY CHECK (id = 1),
        chain_id    INTEGER NOT NULL,
        block       INTEGER NOT NULL,
        block_hash  TEXT NOT NULL
    ) STRICT;
    CREATE TABLE chain_blocks (
        number      INTEGER PRIMARY KEY,
        hash        TEXT NOT NULL
    ) STRICT;
    CREATE TABLE chain_events (
        block_hash  TEXT NOT NULL,
        log_index   INTEGER NOT NULL,
        block       INTEGER NOT NULL,
        tx_hash     TEXT NOT NULL,
        contract    TEXT NOT NULL,
        name        TEXT NOT NULL,
        args        TEXT NOT NULL,
        PRIMARY KEY (block_hash, log_index)
    ) STRICT;
    CREATE INDEX chain_events_block ON chain_events (block);
    CREATE TABLE registry_nodes (
        address     TEXT PRIMARY KEY,
        stake       TEXT NOT NULL,
        reputation  INTEGER NOT NULL,
        registered  INTEGER NOT NULL,
        peer_id     TEXT NOT NULL,
        multiaddrs  TEXT NOT NULL,
        models      TEXT NOT NULL,
        capacity    INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE registry_models (
        model           TEXT PRIMARY KEY,
        cid             TEXT NOT NULL,
        owner           TEXT NOT NULL,
        price           TEXT NOT NULL,
        committee_size  INTEGER NOT NULL,
        kind            INTEGER NOT NULL,
        active          INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE chain_requests (
        request_id  TEXT PRIMARY KEY,
        model       TEXT NOT NULL,
        requester   TEXT NOT NULL,
        input_hash  TEXT NOT NULL,
        price       TEXT NOT NULL,
        deadline    INTEGER NOT NULL,
        status      INTEGER NOT NULL,
        committee   TEXT NOT NULL
    ) STRICT;
    """,
    """
    CREATE TABLE pins (
        cid         TEXT PRIMARY KEY,
        name        TEXT NOT NULL,
        complete    INTEGER NOT NULL,
        size        INTEGER NOT NULL,
        created_at  REAL NOT NULL
    ) STRICT;
    """,
    """
    CREATE TABLE jobs (
        request_id   BLOB PRIMARY KEY,
        offer        BLOB NOT NULL,
        role         TEXT NOT NULL,
        status       TEXT NOT NULL,
        reason       TEXT NOT NULL,
        certificate  TEXT,
        result       TEXT,
        created_at   REAL NOT NULL,
        finished_at  REAL
    ) STRICT;
    CREATE INDEX jobs_status ON jobs (status);
    CREATE TABLE job_votes (
        request_id   BLOB NOT NULL,
        signer       TEXT NOT NULL,
        kind         TEXT NOT NULL,
        payload      BLOB NOT NULL,
        received_at  REAL NOT NULL,
        PRIMARY KEY (request_id, signer, kind, payload)
    ) STRICT;
    CREATE TABLE job_my_votes (
        request_id   BLOB PRIMARY KEY,
        token_ids    TEXT NOT NULL,
        text         TEXT NOT NULL,
        salt         BLOB NOT NULL,
        commitment   BLOB NOT NULL,
        revealed     INTEGER NOT NULL
    ) STRICT;
    """,
    """
    ALTER TABLE jobs ADD COLUMN payment TEXT;
    """,
    """
    CREATE TABLE proofs (
        proof_id     INTEGER PRIMARY KEY AUTOINCREMENT,
        circuit      TEXT NOT NULL,
        public       TEXT NOT NULL,
        proof        TEXT NOT NULL,
        seconds      REAL NOT NULL,
        created_at   REAL NOT NULL
    ) STRICT;
    """,
    """
    CREATE TABLE zk_jobs (
        request_id   TEXT PRIMARY KEY,
        model        TEXT NOT NULL,
        input        TEXT NOT NULL,
        status       TEXT NOT NULL,
        detail       TEXT NOT NULL,
        tx           TEXT,
        updated_at   REAL NOT NULL
    ) STRICT;
    CREATE INDEX zk_jobs_updated ON zk_jobs (updated_at);
    """,
    """
    ALTER TABLE chain_cursor ADD COLUMN block_time INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE gov_proposals (
        proposal_id    TEXT PRIMARY KEY,
        proposer       TEXT NOT NULL,
        targets        TEXT NOT NULL,
        amounts        TEXT NOT NULL,
        calldatas      TEXT NOT NULL,
        description    TEXT NOT NULL,
        snapshot       INTEGER NOT NULL,
        deadline       INTEGER NOT NULL,
        votes_against  TEXT NOT NULL,
        votes_for      TEXT NOT NULL,
        votes_abstain  TEXT NOT NULL,
        quorum         TEXT NOT NULL,
        eta            INTEGER NOT NULL,
        state          INTEGER NOT NULL,
        block          INTEGER NOT NULL,
        tx_hash        TEXT NOT NULL
    ) STRICT;
    CREATE INDEX gov_proposals_block ON gov_proposals (block);
    CREATE TABLE gov_votes (
        proposal_id  TEXT NOT NULL,
        voter        TEXT NOT NULL,
        support      INTEGER NOT NULL,
        weight       TEXT NOT NULL,
        reason       TEXT NOT NULL,
        block        INTEGER NOT NULL,
        tx_hash      TEXT NOT NULL,
        PRIMARY KEY (proposal_id, voter)
    ) STRICT;
    """,
    """
    ALTER TABLE registry_models ADD COLUMN verification TEXT NOT NULL DEFAULT '[0, 0, 0, 0]';
    """,
    """
    CREATE TABLE prepaid_requests (
        request_id   BLOB PRIMARY KEY,
        client       TEXT NOT NULL,
        nonce        TEXT NOT NULL,
        price        TEXT NOT NULL,
        deadline     INTEGER NOT NULL,
        state        TEXT NOT NULL,
        redemption   TEXT,
        settle_after REAL NOT NULL DEFAULT 0,
        certified_at REAL,
        attempts     INTEGER NOT NULL DEFAULT 0,
        tx           TEXT,
        reason       TEXT NOT NULL DEFAULT '',
        updated_at   REAL NOT NULL
    ) STRICT;
    CREATE INDEX prepaid_requests_client ON prepaid_requests (client, state);
    CREATE INDEX prepaid_requests_state ON prepaid_requests (state, settle_after);
    """,
    """
    CREATE INDEX prepaid_requests_nonce ON prepaid_requests (client, nonce);
    """,
    """
    CREATE TABLE api_keys (
        id              TEXT PRIMARY KEY,
        name            TEXT NOT NULL,
        secret_sha256   BLOB NOT NULL,
        rate_per_minute INTEGER NOT NULL,
        quota_tokens    INTEGER,
        used_tokens     INTEGER NOT NULL DEFAULT 0,
        used_requests   INTEGER NOT NULL DEFAULT 0,
        created_at      REAL NOT NULL,
        last_used_at    REAL,
        revoked_at      REAL
    ) STRICT;
    """,
    """
    CREATE TABLE local_answers (
        request_id  BLOB PRIMARY KEY,
        model       TEXT NOT NULL,
        certificate TEXT NOT NULL,
        created_at  REAL NOT NULL
    ) STRICT;
    """,
    """
    CREATE TABLE rpc_plans (
        client     TEXT PRIMARY KEY,
        plan_until INTEGER NOT NULL,
        credit     TEXT NOT NULL,
        available  TEXT NOT NULL,
        block      INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE rpc_providers (
        provider        TEXT NOT NULL,
        chain_id        INTEGER NOT NULL,
        deposit         TEXT NOT NULL,
        endpoint        TEXT NOT NULL,
        unbonding_until INTEGER NOT NULL,
        served_calls    TEXT NOT NULL,
        slashes         INTEGER NOT NULL,
        active          INTEGER NOT NULL,
        PRIMARY KEY (provider, chain_id)
    ) STRICT;
    CREATE TABLE rpc_usage (
        client   TEXT NOT NULL,
        chain_id INTEGER NOT NULL,
        calls    INTEGER NOT NULL,
        PRIMARY KEY (client, chain_id)
    ) STRICT;
    """,
)


class StateError(Exception):
    """The database cannot be opened or is from a newer joynode."""


@dataclass(frozen=True)
class StateStatistics:
    schema_version: int
    boot: int
    calls: int


class StateStore:
    """The ``state`` actor: owns the SQLite connection for the node's lifetime."""

    name = "state"

    def __init__(self, path: Path, version: str) -> None:
        self.path = path
        self._version = version
        self._conn: sqlite3.Connection | None = None
        self._limiter = trio.CapacityLimiter(1)
        self._calls = 0
        self._schema_version = 0
        self.boot = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await trio.to_thread.run_sync(self._open, limiter=self._limiter)
        except StateError as exc:
            # The database lives in the data dir: that is what the operator must fix.
            raise SettingError("node.data_dir", str(exc)) from None
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            # Through the limiter: a worker thread may still be using the connection.
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._close, limiter=self._limiter)

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"cannot create {self.path.parent}: {exc.strerror or exc}") from None
        conn = None
        try:
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=5000")
            self._schema_version = self._migrate(conn)
            with conn:
                conn.execute("BEGIN")
                cursor = conn.execute(
                    "INSERT INTO boots (started_at, version) VALUES (?, ?)",
                    (time.time(), self._version),
                )
                self.boot = int(cursor.lastrowid or 0)
        except (sqlite3.Error, StateError) as exc:
            if conn is not None:
                conn.close()
            if isinstance(exc, StateError):
                raise
            raise StateError(f"cannot open state database {self.path}: {exc}") from exc
        self._conn = conn

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _migrate(self, conn: sqlite3.Connection) -> int:
        current = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if current > len(MIGRATIONS):
            raise StateError(
                f"state database {self.path} has schema {current}, newer than this "
                f"joynode understands ({len(MIGRATIONS)}); upgrade joynode"
            )
        for number in range(current + 1, len(MIGRATIONS) + 1):
            # executescript commits first, so the DDL and the version bump run
            # in one explicit transaction of their own.
            conn.executescript(
                f"BEGIN;\n{MIGRATIONS[number - 1]}\nPRAGMA user_version = {number};\nCOMMIT;"
            )
            log.info("state database migrated to schema %d", number)
        return len(MIGRATIONS)

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` in the database thread and return its result."""
        return await trio.to_thread.run_sync(self._call, fn, False, limiter=self._limiter)

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` in one transaction (rolled back if it raises)."""
        return await trio.to_thread.run_sync(self._call, fn, True, limiter=self._limiter)

    def _call(self, fn: Callable[[sqlite3.Connection], T], transaction: bool) -> T:
        conn = self._conn
        if conn is None:
            raise StateError("state database is not open")
        self._calls += 1
        if not transaction:
            return fn(conn)
        with conn:
            conn.execute("BEGIN IMMEDIATE")
            return fn(conn)

    def statistics(self) -> StateStatistics:
        return StateStatistics(self._schema_version, self.boot, self._calls)
