"""Fetching a DAG by its root CID from whichever peers have it.

A session walks the DAG from the root: blocks already in the store are read
and their links followed (so a fetch interrupted by a restart resumes where it
stopped); missing ones are asked of peers over Bitswap, at most ``window`` at
a time, each from one peer, chosen among those that said they have the root
first, then the least busy. A peer that answers DONT_HAVE or does not answer
within ``block_timeout_s`` is skipped for that block; one that serves bytes
not matching the CID asked for is penalised by Bitswap and dropped from the
session. Every block is verified (by construction: its CID is its hash) before
it is stored; its children are asked for only once it is stored.

Candidates are the connected peers, peers named by the caller, and providers
found on the DHT, looked up again while some block has no one to ask.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import trio

from joynode.abc import ContentNetwork
from joynode.storage.bitswap import Bitswap
from joynode.storage.bitswap_messages import BitswapMessage, WantEntry, WantType
from joynode.storage.blockstore import BlockNotFound, Blockstore, StoreFull
from joynode.storage.cid import Cid
from joynode.storage.unixfs import UnixfsError, links_of

log = logging.getLogger(__name__)

PROVIDER_SEARCH_INTERVAL_S = 5.0
MAX_STRIKES = 3
PROGRESS_INTERVAL_S = 0.25


class FetchFailed(Exception):
    """The DAG could not be fetched completely; the message says why."""


@dataclass(frozen=True)
class FetchProgress:
    root: str
    blocks: int  # blocks in the store so far (fetched now or before)
    bytes: int
    total_bytes: int | None  # known once the root is in
    fetched_blocks: int  # of which fetched from peers in this session
    peers: int  # peers that have sent blocks
    done: bool = False

    def to_json(self) -> dict[str, object]:
        return {
            "root": self.root,
            "blocks": self.blocks,
            "bytes": self.bytes,
            "total_bytes": self.total_bytes,
            "fetched_blocks": self.fetched_blocks,
            "peers": self.peers,
            "done": self.done,
        }


ProgressCallback = Callable[[FetchProgress], Awaitable[None]]


@dataclass(frozen=True)
class _BlockArrived:
    peer: str
    cid: Cid
    data: bytes


@dataclass(frozen=True)
class _PresenceHeard:
    peer: str
    cid: Cid
    have: bool


@dataclass(frozen=True)
class _PeerLied:
    peer: str


_SessionEvent = _BlockArrived | _PresenceHeard | _PeerLied


@dataclass
class _Want:
    cid: Cid
    peer: str | None = None
    deadline: float = 0.0
    tried: set[str] = field(default_factory=set)


@dataclass
class _SessionPeer:
    has_root: bool = False
    inflight: int = 0
    strikes: int = 0
    served: int = 0


class FetchSession:
    def __init__(
        self,
        root: Cid,
        bitswap: Bitswap,
        store: Blockstore,
        network: ContentNetwork,
        *,
        window: int,
        block_timeout_s: float,
        stall_timeout_s: float,
        peers: Sequence[str] = (),
        on_progress: ProgressCallback | None = None,
    ) -> None:
        self.root = root
        self._bitswap = bitswap
        self._store = store
        self._network = network
        self._window = window
        self._block_timeout_s = block_timeout_s
        self._stall_timeout_s = stall_timeout_s
        self._hinted = list(peers)
        self._on_progress = on_progress
        # Unbounded, but only events about this session's own wants arrive.
        self._events_send, self._events_receive = trio.open_memory_channel[_SessionEvent](
            float("inf")
        )
        self._queue: collections.deque[Cid] = collections.deque([root])
        self._wants: dict[bytes, _Want] = {}  # asked of a peer, or waiting for one
        self._peers: dict[str, _SessionPeer] = {}
        self._excluded: set[str] = set()
        self._blocks = 0
        self._bytes = 0
        self._fetched = 0
        self._total: int | None = None
        self._last_progress = 0.0
        self._last_block_at = 0.0
        self._search_due = 0.0

    # ---- Bitswap callbacks (sync, from the receiving task)

    def on_block(self, peer: str, cid: Cid, data: bytes) -> None:
        self._events_send.send_nowait(_BlockArrived(peer, cid, data))

    def on_presence(self, peer: str, cid: Cid, have: bool) -> None:
        self._events_send.send_nowait(_PresenceHeard(peer, cid, have))

    def on_bad_peer(self, peer: str) -> None:
        self._events_send.send_nowait(_PeerLied(peer))

    # ---- the walk

    async def run(self) -> FetchProgress:
        self._last_block_at = trio.current_time()
        failure: FetchFailed | StoreFull | None = None
        async with trio.open_nursery() as nursery:  # dials and provider searches
            try:
                for addr in self._hinted:
                    nursery.start_soon(self._connect, addr)
                await self._walk(nursery)
            except (FetchFailed, StoreFull) as exc:
                failure = exc  # raised below, outside the nursery's exception group
            finally:
                for want in self._wants.values():
                    self._bitswap.unlisten(self, want.cid)
                nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
        progress = self._progress(done=True)
        if self._on_progress is not None:
            await self._on_progress(progress)
        return progress

    async def _walk(self, nursery: trio.Nursery) -> None:
        while self._queue or self._wants:
            await self._expand_local()
            await self._assign(nursery)
            if not self._wants:
                continue
            now = trio.current_time()
            if now - self._last_block_at > self._stall_timeout_s:
                missing = next(iter(self._wants.values())).cid
                raise FetchFailed(
                    f"no peer delivered block {missing} of {self.root} for "
                    f"{self._stall_timeout_s:.0f} s (peers tried: {len(self._peers)}); "
                    "blocks fetched so far are kept and a new fetch resumes from them"
                )
            next_deadline = min(
                [w.deadline for w in self._wants.values() if w.peer is not None]
                + [self._last_block_at + self._stall_timeout_s, now + 1.0]
            )
            with trio.move_on_at(next_deadline):
                event = await self._events_receive.receive()
                await self._handle(event)
                while True:  # drain what else arrived, without waiting
                    try:
                        event = self._events_receive.receive_nowait()
                    except trio.WouldBlock:
                        break
                    await self._handle(event)
            self._expire(trio.current_time())
            await self._report()

    async def _expand_local(self) -> None:
        """Follow the links of queued blocks that are already in the store."""
        while self._queue and len(self._wants) < self._window:
            cid = self._queue.popleft()
            if cid.multihash in self._wants:
                continue
            links = await trio.to_thread.run_sync(self._local_links, cid)
            if links is None:
                self._wants[cid.multihash] = _Want(cid)
                self._bitswap.listen(self, cid)
            else:
                self._queue.extendleft(reversed(links))

    def _local_links(self, cid: Cid) -> list[Cid] | None:
        """The block's children if it is stored (worker thread); None if it must be fetched."""
        try:
            data = self._store.get(cid)
        except BlockNotFound:
            return None
        self._count(cid, data)
        return [link.cid for link in links_of(cid, data)]

    def _count(self, cid: Cid, data: bytes) -> None:
        self._blocks += 1
        self._bytes += len(data)
        if cid == self.root:
            self._total = len(data) + sum(link.tsize for link in links_of(cid, data))

    async def _assign(self, nursery: trio.Nursery) -> None:
        """Ask a peer for every want that has none."""
        unassigned = [w for w in self._wants.values() if w.peer is None]
        if not unassigned:
            return
        candidates = self._candidates()
        by_peer: dict[str, list[WantEntry]] = {}
        now = trio.current_time()
        stuck = False
        for want in unassigned:
            options = [p for p in candidates if p not in want.tried]
            if not options:
                stuck = True
                continue
            peer = min(options, key=self._preference)
            want.peer = peer
            want.deadline = now + self._block_timeout_s
            self._peers[peer].inflight += 1
            by_peer.setdefault(peer, []).append(
                WantEntry(want.cid, WantType.BLOCK, send_dont_have=True)
            )
        if self.root.multihash in self._wants and self._blocks == 0:
            # Ask everyone whether they have the root, to prefer those that do.
            for peer in candidates:
                if peer in by_peer:
                    continue  # asked for the root block itself
                by_peer.setdefault(peer, []).append(
                    WantEntry(self.root, WantType.HAVE, send_dont_have=True)
                )
        for peer, entries in by_peer.items():
            await self._bitswap.send(peer, BitswapMessage(wants=entries))
        if (stuck or not candidates) and now >= self._search_due:
            self._search_due = now + PROVIDER_SEARCH_INTERVAL_S
            nursery.start_soon(self._find_providers)
            for want in self._wants.values():
                if want.peer is None:
                    want.tried.clear()  # peers may have it by now; ask again next round

    def _preference(self, peer: str) -> tuple[bool, int]:
        """Peers known to have the root first, then the least busy."""
        state = self._peers[peer]
        return not state.has_root, state.inflight

    def _candidates(self) -> list[str]:
        for peer in self._network.connected_peers():
            if peer not in self._excluded:
                self._peers.setdefault(peer, _SessionPeer())
        return [p for p in self._peers if p not in self._excluded]

    async def _find_providers(self) -> None:
        try:
            found = await self._network.find_providers(self.root.multihash, 20)
        except Exception as exc:  # the DHT raises many unrelated types
            log.debug("provider search for %s failed: %s", self.root, exc)
            return
        connected = set(self._network.connected_peers())
        for peer, addrs in found:
            if peer in connected or peer in self._excluded:
                continue
            for addr in addrs:
                suffix = "" if "/p2p/" in addr else f"/p2p/{peer}"
                if await self._connect(addr + suffix):
                    break

    async def _connect(self, addr: str) -> bool:
        try:
            with trio.move_on_after(self._block_timeout_s):
                await self._network.connect(addr)
                return True
        except Exception as exc:  # P2PError and whatever the dial raised
            log.debug("fetch %s: cannot reach %s: %s", self.root, addr, exc)
        return False

    async def _handle(self, event: _SessionEvent) -> None:
        if isinstance(event, _PeerLied):
            self._drop_peer(event.peer)
        elif isinstance(event, _PresenceHeard):
            session_peer = self._peers.setdefault(event.peer, _SessionPeer())
            if event.cid == self.root and event.have:
                session_peer.has_root = True
            want = self._wants.get(event.cid.multihash)
            if not event.have and want is not None:
                want.tried.add(event.peer)
                if want.peer == event.peer:
                    self._release(want)
        else:
            await self._store_block(event.peer, event.cid, event.data)

    async def _store_block(self, peer: str, cid: Cid, data: bytes) -> None:
        want = self._wants.pop(cid.multihash, None)
        if want is None:
            return
        if want.peer is not None and want.peer in self._peers:
            self._peers[want.peer].inflight -= 1
        if want.peer is not None and want.peer != peer:
            # Answered by someone else (e.g. after a time-out): cancel at the first.
            await self._bitswap.send(want.peer, BitswapMessage(wants=[WantEntry(cid, cancel=True)]))
        session_peer = self._peers.setdefault(peer, _SessionPeer())
        session_peer.served += 1
        session_peer.has_root = True
        try:
            children = await trio.to_thread.run_sync(self._put, cid, data)
        except UnixfsError as exc:
            # Hashes right but is not a valid node: whoever made the DAG is at
            # fault, not necessarily this peer. Nothing sensible can follow.
            raise FetchFailed(f"block {cid} of {self.root} is not valid dag-pb: {exc}") from None
        self._fetched += 1
        self._last_block_at = trio.current_time()
        self._queue.extendleft(reversed(children))

    def _put(self, cid: Cid, data: bytes) -> list[Cid]:
        children = [link.cid for link in links_of(cid, data)]
        self._store.put(cid, data)
        self._count(cid, data)
        return children

    def _release(self, want: _Want) -> None:
        if want.peer is not None:
            if want.peer in self._peers:
                self._peers[want.peer].inflight -= 1
            want.tried.add(want.peer)
            want.peer = None

    def _expire(self, now: float) -> None:
        for want in self._wants.values():
            if want.peer is not None and want.deadline <= now:
                session_peer = self._peers.get(want.peer)
                if session_peer is not None:
                    session_peer.strikes += 1
                    if session_peer.strikes >= MAX_STRIKES and session_peer.served == 0:
                        self._excluded.add(want.peer)
                self._release(want)

    def _drop_peer(self, peer: str) -> None:
        if peer in self._excluded:
            return
        log.warning("fetch %s: dropping peer %s (served a bad block)", self.root, peer)
        self._excluded.add(peer)
        for want in self._wants.values():
            if want.peer == peer:
                self._release(want)

    # ---- progress

    def _progress(self, *, done: bool = False) -> FetchProgress:
        return FetchProgress(
            str(self.root),
            self._blocks,
            self._bytes,
            self._total,
            self._fetched,
            sum(1 for p in self._peers.values() if p.served),
            done,
        )

    async def _report(self) -> None:
        now = time.monotonic()
        if self._on_progress is not None and now - self._last_progress >= PROGRESS_INTERVAL_S:
            self._last_progress = now
            await self._on_progress(self._progress())
