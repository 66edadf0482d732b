"""The chain watcher: contract events in order, exactly once, safe across reorgs.

Each poll reads logs of our contracts from the block after the cursor up to
``head - confirmations`` (at most ``block_range`` blocks at a time), and in one
SQLite transaction records each log (keyed by block hash and log index, so a
log is never applied twice), the hashes of the blocks it saw, and the new
cursor. A restarted node resumes from the cursor. Before reading, the watcher
checks that the cursor block's hash is still the chain's: if not, a reorg
happened; it walks back through the recorded blocks to the last one the chain
still has, retracts every event above it (reported with ``removed=True``) and
continues from there.

Every event also refreshes the mirrors (``Mirror``): the registry mirror
(``RegistryMirror``) re-reads the nodes, models and requests it touched from
the contracts' views and stores them in SQLite, where the consensus actor
finds them without a chain round trip; the governance mirror
(``joynode.governance.mirror``) keeps the DAO's proposals and votes. The
cursor also records its block's timestamp: the chain's clock as last seen;
and each step records the hashes of the epoch boundaries it passed that are
still recent (``SEED_EPOCH_BLOCKS``, ``SEED_EPOCHS_VALID``): the blocks unpaid
jobs draw their committees from, which members then check without the RPC.
A poll reads everything from the chain first and then writes the
retractions, the events, the mirror rows and the cursor in one transaction,
so an RPC that fails half way leaves nothing half done: the next poll does
the same step again. Web3 calls go through the chain actor's ``RpcLink``
(worker threads, bounded, ``ChainUnreachable`` when the RPC is down).
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from eth_utils.abi import event_abi_to_log_topic
from hexbytes import HexBytes
from web3 import Web3
from web3._utils.events import get_event_data
from web3.exceptions import BlockNotFound

from joynode.chain.artifacts import load_artifacts
from joynode.chain.committee import SEED_EPOCH_BLOCKS, SEED_EPOCHS_VALID
from joynode.chain.deploy import Deployment
from joynode.chain.rpc import RpcLink
from joynode.messages import ChainEvent
from joynode.state import StateStore

log = logging.getLogger(__name__)

Row = tuple[Any, ...]
MirrorRows = tuple[list[Row], list[Row], list[Row]]  # nodes, models, requests
MirrorWrite = Callable[[sqlite3.Connection], None]


class Mirror(Protocol):
    """SQLite rows kept in step with contract events (the registry, the DAO's proposals).

    ``read`` gets a poll's retracted and new events, reads from the chain what
    it needs (``ChainUnreachable`` if it cannot: the poll is then done again)
    and returns what to write; the watcher runs that in the transaction that
    records the events and moves the cursor, so the rows never disagree with it.
    """

    async def read(self, events: list[ChainEvent]) -> MirrorWrite: ...


MirrorFactory = Callable[[RpcLink, Deployment], Mirror]


@dataclass(frozen=True)
class Cursor:
    block: int
    block_hash: str
    time: int = 0  # the block's timestamp (0: not known)


class EventDecoder:
    """Decodes raw logs of our deployed contracts by address and topic."""

    def __init__(self, w3: Web3, deployment: Deployment) -> None:
        artifacts = load_artifacts()
        self._by_address: dict[str, tuple[str, dict[bytes, dict[str, Any]]]] = {}
        for name, address in deployment.addresses.items():
            events = {
                bytes(event_abi_to_log_topic(entry)): entry  # type: ignore[arg-type]
                for entry in artifacts[name].abi
                if entry.get("type") == "event"
            }
            self._by_address[address.lower()] = (name, events)
        self._codec = w3.codec
        self.addresses = [Web3.to_checksum_address(a) for a in deployment.addresses.values()]

    def decode(self, raw: Any) -> ChainEvent | None:
        entry = self._by_address.get(str(raw["address"]).lower())
        if entry is None or not raw["topics"]:
            return None
        contract, events = entry
        abi = events.get(bytes(raw["topics"][0]))
        if abi is None:
            return None
        data = get_event_data(self._codec, abi, raw)
        return ChainEvent(
            contract=contract,
            name=str(data["event"]),
            block=int(raw["blockNumber"]),
            block_hash=HexBytes(raw["blockHash"]).to_0x_hex(),
            tx_hash=HexBytes(raw["transactionHash"]).to_0x_hex(),
            log_index=int(raw["logIndex"]),
            args={k: _jsonable(v) for k, v in data["args"].items()},
        )


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return "0x" + bytes(value).hex()
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**53:
        return str(value)  # JSON-safe for consumers that parse numbers as floats
    return value


class ChainWatcher:
    def __init__(
        self,
        link: RpcLink,
        deployment: Deployment,
        state: StateStore,
        *,
        confirmations: int,
        block_range: int,
        mirrors: Sequence[Mirror] = (),
    ) -> None:
        self._link = link
        self._w3 = link.w3
        self._deployment = deployment
        self._state = state
        self._confirmations = confirmations
        self.head = 0  # the chain's head at the last poll (0 before the first)
        self._range = block_range
        self._decoder = EventDecoder(link.w3, deployment)
        self._mirrors = mirrors
        self.applied = 0
        self.retracted = 0

    def _block_hash(self, number: int) -> str:
        return HexBytes(self._w3.eth.get_block(number)["hash"]).to_0x_hex()

    async def cursor(self) -> Cursor:
        row = await self._state.read(
            lambda c: c.execute(
                "SELECT block, block_hash, block_time FROM chain_cursor WHERE id = 1"
            ).fetchone()
        )
        if row is None:
            return Cursor(self._deployment.start_block - 1, "")
        return Cursor(int(row[0]), str(row[1]), int(row[2]))

    async def poll(self) -> list[ChainEvent]:
        """One step: handle a reorg if there was one, then apply the next range of logs.

        Raises ``ChainUnreachable`` (nothing applied) when the RPC fails on the way.
        """
        cursor = await self.cursor()
        fork: Cursor | None = None
        retracted: list[ChainEvent] = []
        if cursor.block_hash and (
            await self._link.call(self._hash_or_none, cursor.block) != cursor.block_hash
        ):
            fork = await self._find_fork()
            log.warning(
                "chain reorganised below block %d; back to block %d", cursor.block, fork.block
            )
            retracted = await self._state.read(lambda c: _events_after(c, fork.block))
            cursor = fork
        head = await self._link.call(lambda: int(self._w3.eth.block_number))
        self.head = head
        target = head - self._confirmations
        events: list[ChainEvent] = []
        end: Cursor | None = None
        boundaries: list[Cursor] = []
        if target > cursor.block:
            last = min(target, cursor.block + self._range)
            fetched = await self._link.call(self._fetch, cursor.block + 1, last, cursor.block_hash)
            if fetched is None:  # the chain moved under us: the next poll sorts it out
                return []
            raw_logs, end, boundaries = fetched
            events = [e for e in (self._decoder.decode(r) for r in raw_logs) if e is not None]
        writes = []
        if events or retracted:
            writes = [await mirror.read(retracted + events) for mirror in self._mirrors]
        chain_id = self._deployment.chain_id

        def commit(conn: sqlite3.Connection) -> tuple[list[ChainEvent], list[ChainEvent]]:
            undone = _retract_after(conn, fork) if fork is not None else []
            applied = _apply(conn, chain_id, events, end, boundaries) if end is not None else []
            for write in writes:
                write(conn)
            return undone, applied

        undone, applied = await self._state.write(commit)
        self.retracted += len(undone)
        self.applied += len(applied)
        return undone + applied

    def _hash_or_none(self, number: int) -> str | None:
        """The chain's hash at ``number``; None if the chain is now shorter than that."""
        try:
            return self._block_hash(number)
        except BlockNotFound:
            return None

    def _fetch(
        self, start: int, end: int, parent_hash: str
    ) -> tuple[list[Any], Cursor, list[Cursor]] | None:
        """Logs of blocks ``start..end``, the cursor at ``end`` and the recent epoch
        boundaries before it in the range; None if a reorg interfered.

        The range must continue the cursor's branch (``start``'s parent is the
        cursor block) and ``end`` must be the same block before and after the
        log query, so the logs all come from one branch.
        """
        if parent_hash:
            first = self._w3.eth.get_block(start)
            if HexBytes(first["parentHash"]).to_0x_hex() != parent_hash:
                return None
        end_block = self._w3.eth.get_block(end)
        end_hash = HexBytes(end_block["hash"]).to_0x_hex()
        logs = self._w3.eth.get_logs(
            {"fromBlock": start, "toBlock": end, "address": self._decoder.addresses}
        )
        if self._hash_or_none(end) != end_hash:
            return None
        wrong_branch = [
            log
            for log in logs
            if int(log["blockNumber"]) == end and HexBytes(log["blockHash"]).to_0x_hex() != end_hash
        ]
        if wrong_branch:
            return None
        recent = max(start, end - SEED_EPOCH_BLOCKS * SEED_EPOCHS_VALID)
        lowest = recent + (-recent) % SEED_EPOCH_BLOCKS
        boundaries = [Cursor(n, self._block_hash(n)) for n in range(lowest, end, SEED_EPOCH_BLOCKS)]
        return list(logs), Cursor(end, end_hash, int(end_block["timestamp"])), boundaries

    async def _find_fork(self) -> Cursor:
        known = await self._state.read(
            lambda c: c.execute(
                "SELECT number, hash FROM chain_blocks ORDER BY number DESC"
            ).fetchall()
        )
        for number, block_hash in known:
            if await self._link.call(self._hash_or_none, int(number)) == block_hash:
                return Cursor(int(number), str(block_hash))
        return Cursor(self._deployment.start_block - 1, "")


def _apply(
    conn: sqlite3.Connection,
    chain_id: int,
    events: list[ChainEvent],
    cursor: Cursor,
    boundaries: list[Cursor],
) -> list[ChainEvent]:
    applied = []
    for event in events:
        inserted = conn.execute(
            "INSERT OR IGNORE INTO chain_events (block_hash, log_index, block, tx_hash, "
            "contract, name, args) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                event.block_hash,
                event.log_index,
                event.block,
                event.tx_hash,
                event.contract,
                event.name,
                json.dumps(event.args),
            ),
        ).rowcount
        if inserted:
            applied.append(event)
        conn.execute(
            "INSERT OR REPLACE INTO chain_blocks (number, hash) VALUES (?, ?)",
            (event.block, event.block_hash),
        )
    for block in (*boundaries, cursor):
        conn.execute(
            "INSERT OR REPLACE INTO chain_blocks (number, hash) VALUES (?, ?)",
            (block.block, block.block_hash),
        )
    conn.execute(
        "INSERT INTO chain_cursor (id, chain_id, block, block_hash, block_time) "
        "VALUES (1, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET block = excluded.block, "
        "block_hash = excluded.block_hash, block_time = excluded.block_time",
        (chain_id, cursor.block, cursor.block_hash, cursor.time),
    )
    # Keep the recent block hashes reorg detection needs, not the whole history.
    conn.execute("DELETE FROM chain_blocks WHERE number < ?", (cursor.block - 10_000,))
    return applied


def _events_after(conn: sqlite3.Connection, block: int) -> list[ChainEvent]:
    """The applied events above ``block``, newest first, as retractions."""
    rows = conn.execute(
        "SELECT contract, name, block, block_hash, tx_hash, log_index, args FROM chain_events "
        "WHERE block > ? ORDER BY block DESC, log_index DESC",
        (block,),
    ).fetchall()
    return [
        ChainEvent(c, n, int(b), h, t, int(i), json.loads(a), removed=True)
        for c, n, b, h, t, i, a in rows
    ]


def _retract_after(conn: sqlite3.Connection, fork: Cursor) -> list[ChainEvent]:
    retracted = _events_after(conn, fork.block)
    conn.execute("DELETE FROM chain_events WHERE block > ?", (fork.block,))
    conn.execute("DELETE FROM chain_blocks WHERE number > ?", (fork.block,))
    # The fork block's time is not recorded; the clock keeps the last one seen until
    # the next step moves the cursor on (a chain's clock hardly goes back in a reorg).
    conn.execute(
        "UPDATE chain_cursor SET block = ?, block_hash = ? WHERE id = 1",
        (fork.block, fork.block_hash),
    )
    return retracted


def chain_clock(conn: sqlite3.Connection) -> int:
    """The timestamp of the last block the watcher processed; 0 before the first."""
    row = conn.execute("SELECT block_time FROM chain_cursor WHERE id = 1").fetchone()
    return 0 if row is None else int(row[0])


class RegistryMirror:
    """Keeps SQLite copies of the nodes, models and requests that events touched."""

    NODE_EVENTS = frozenset(
        {
            "Staked",
            "Registered",
            "Deregistered",
            "UnbondingStarted",
            "Withdrawn",
            "ReputationChanged",
            "Slashed",
        }
    )
    MODEL_EVENTS = frozenset({"ModelRegistered", "ModelUpdated", "VerificationChanged"})
    REQUEST_EVENTS = frozenset(
        {"InferenceRequested", "CommitteeDrawn", "InferenceSettled", "InferenceRefunded"}
    )

    def __init__(self, link: RpcLink, deployment: Deployment) -> None:
        self._link = link
        self._coordinator = deployment.contract(link.w3, "NodeCoordinator")
        self._marketplace = deployment.contract(link.w3, "ModelMarketplace")

    async def read(self, events: list[ChainEvent]) -> MirrorWrite:
        """The current rows of the nodes, models and requests that ``events`` touched."""
        nodes = {str(e.args["node"]) for e in events if e.name in self.NODE_EVENTS}
        nodes |= {
            str(e.args["account"])
            for e in events
            if e.name == "ReputationChanged" and "account" in e.args
        }
        models = {str(e.args["model"]) for e in events if e.name in self.MODEL_EVENTS}
        requests = {str(e.args["requestId"]) for e in events if e.name in self.REQUEST_EVENTS}
        rows = await self._link.call(self._read, nodes, models, requests)
        return lambda conn: self.store(conn, rows)

    def _read(self, nodes: set[str], models: set[str], requests: set[str]) -> MirrorRows:
        node_rows = []
        for address in nodes:
            info = self._coordinator.functions.nodeInfo(address).call()
            stake, _, _, reputation, capacity, registered, peer_id, multiaddrs, served = info
            node_rows.append(
                (
                    address,
                    str(stake),
                    int(reputation),
                    int(registered),
                    peer_id,
                    json.dumps(multiaddrs),
                    json.dumps(["0x" + m.hex() for m in served]),
                    int(capacity),
                )
            )
        model_rows = []
        for model in models:
            key = bytes.fromhex(model[2:])
            market = self._marketplace.functions
            owner, price, size, kind, active, cid, _, _ = market.modelInfo(key).call()
            policy = json.dumps([int(v) for v in market.verificationOf(key).call()])
            model_rows.append(
                (model, cid, owner, str(price), int(size), int(kind), int(active), policy)
            )
        request_rows = []
        for request in requests:
            model_id, requester, input_hash, price, deadline, status, committee = (
                self._marketplace.functions.requestInfo(bytes.fromhex(request[2:])).call()
            )
            request_rows.append(
                (
                    request,
                    "0x" + model_id.hex(),
                    requester,
                    "0x" + input_hash.hex(),
                    str(price),
                    int(deadline),
                    int(status),
                    json.dumps(committee),
                )
            )
        return node_rows, model_rows, request_rows

    @staticmethod
    def store(conn: sqlite3.Connection, rows: MirrorRows) -> None:
        nodes, models, requests = rows
        conn.executemany(
            "INSERT OR REPLACE INTO registry_nodes VALUES (?, ?, ?, ?, ?, ?, ?, ?)", nodes
        )
        conn.executemany(
            "INSERT OR REPLACE INTO registry_models VALUES (?, ?, ?, ?, ?, ?, ?, ?)", models
        )
        conn.executemany(
            "INSERT OR REPLACE INTO chain_requests VALUES (?, ?, ?, ?, ?, ?, ?, ?)", requests
        )
