"""Bitswap on the node's libp2p host: serving blocks to peers, and routing what peers send.

Serving: each peer's wantlist is kept (capped) and a per-peer task answers it
in order from the block store, batching blocks up to ``BATCH_BYTES`` per
message, with DONT_HAVE where the peer asked for one.

Receiving: blocks and presences go to the fetch sessions that want them
(``FetchSession`` registers the CIDs it waits for). A block nobody asked for,
and not a late duplicate of one recently received, means the peer served
bytes that do not hash to what was asked: the peer is penalised (``BAD_BLOCK``)
and the sessions drop it.

Every message to a peer goes out on a stream *this* node opens, never as a
reply on the peer's stream: go-bitswap (kubo) only reads messages on streams
its remote opened. That is the fix ../shared/TOOLCHAIN.md describes for
py-libp2p's own Bitswap, which answers on the requester's stream.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio
from libp2p.exceptions import BaseLibp2pError

from joynode.abc import ContentNetwork, NetStream
from joynode.p2p.scoring import Offence
from joynode.storage.bitswap_messages import (
    PROTOCOLS,
    BitswapError,
    BitswapMessage,
    WantEntry,
    WantType,
    read_message,
    write_message,
)
from joynode.storage.blockstore import BlockNotFound, Blockstore
from joynode.storage.cid import Cid

log = logging.getLogger(__name__)

BATCH_BYTES = 256 * 1024
MAX_WANTS_PER_PEER = 4096
OUTBOX_MESSAGES = 8  # up to about 2 MiB of replies queued per peer
RECENT_BLOCKS = 8192
SEND_TIMEOUT_S = 30.0
SENDER_IDLE_S = 60.0


class BlockListener(Protocol):
    """A fetch session, as Bitswap sees it."""

    def on_block(self, peer: str, cid: Cid, data: bytes) -> None: ...

    def on_presence(self, peer: str, cid: Cid, have: bool) -> None: ...

    def on_bad_peer(self, peer: str) -> None: ...


@dataclass
class BitswapStatistics:
    blocks_sent: int = 0
    bytes_sent: int = 0
    blocks_received: int = 0
    bytes_received: int = 0
    duplicate_blocks: int = 0
    bad_blocks: int = 0
    invalid_messages: int = 0
    wants_received: int = 0


@dataclass
class _Peer:
    """What one peer wants from us, and the task that talks to it."""

    wants: collections.OrderedDict[bytes, WantEntry] = field(
        default_factory=collections.OrderedDict
    )
    serving: bool = False
    outbox_send: trio.MemorySendChannel[BitswapMessage] | None = None

    def idle(self) -> bool:
        return not (self.wants or self.serving or self.outbox_send)


class Bitswap:
    def __init__(
        self,
        network: ContentNetwork,
        store: Blockstore,
        *,
        on_transfer: Callable[[str, int], None] | None = None,
    ) -> None:
        self._network = network
        self._store = store
        self._on_transfer = on_transfer
        self._peers: dict[str, _Peer] = {}
        self._listeners: dict[bytes, set[BlockListener]] = {}
        self._recent: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._nursery: trio.Nursery | None = None
        self.stats = BitswapStatistics()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                for protocol in PROTOCOLS:
                    self._network.set_stream_handler(protocol, self._handle_stream)
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._nursery = None

    # ---- sessions

    def listen(self, listener: BlockListener, cid: Cid) -> None:
        self._listeners.setdefault(cid.multihash, set()).add(listener)

    def unlisten(self, listener: BlockListener, cid: Cid) -> None:
        listeners = self._listeners.get(cid.multihash)
        if listeners is not None:
            listeners.discard(listener)
            if not listeners:
                del self._listeners[cid.multihash]

    async def send(self, peer: str, message: BitswapMessage) -> None:
        """Queue ``message`` for ``peer``; waits while that peer's outbox is full."""
        for _ in range(2):  # the sender may have just retired for idleness
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self._outbox(peer).send(message)
                return

    def _outbox(self, peer: str) -> trio.MemorySendChannel[BitswapMessage]:
        state = self._peers.setdefault(peer, _Peer())
        if state.outbox_send is None:
            if self._nursery is None:
                raise RuntimeError("bitswap is not running")
            send, receive = trio.open_memory_channel[BitswapMessage](OUTBOX_MESSAGES)
            state.outbox_send = send
            self._nursery.start_soon(self._sender, peer, state, receive)
        return state.outbox_send

    async def _sender(
        self, peer: str, state: _Peer, outbox: trio.MemoryReceiveChannel[BitswapMessage]
    ) -> None:
        """Writes ``peer``'s messages on one stream of our own, reopened after a failure."""
        stream: NetStream | None = None
        try:
            async with outbox:
                while True:
                    message = None
                    with trio.move_on_after(SENDER_IDLE_S):
                        message = await outbox.receive()
                    if message is None:
                        state.outbox_send = None  # retire; the next send starts a new sender
                        break
                    try:
                        with trio.fail_after(SEND_TIMEOUT_S):
                            if stream is None:
                                stream = await self._network.open_stream(peer, PROTOCOLS)
                            await write_message(stream, message, stream.get_protocol())
                        self._count_sent(peer, message)
                    except (BaseLibp2pError, OSError, trio.TooSlowError, ValueError) as exc:
                        log.debug("bitswap: sending to %s failed: %s", peer, exc)
                        if stream is not None:
                            await _close(stream)
                        stream = None
                        # The peer is gone or stuck: serving the rest of its wants would
                        # only fail again. It sends its whole wantlist when it is back.
                        state.wants.clear()
        finally:
            state.outbox_send = None
            if stream is not None:
                await _close(stream)
            self._forget_if_idle(peer, state)

    def _forget_if_idle(self, peer: str, state: _Peer) -> None:
        if state.idle() and self._peers.get(peer) is state:
            del self._peers[peer]

    def _count_sent(self, peer: str, message: BitswapMessage) -> None:
        sent = sum(len(data) for _, data in message.blocks)
        self.stats.blocks_sent += len(message.blocks)
        self.stats.bytes_sent += sent
        if sent and self._on_transfer is not None:
            self._on_transfer("out", sent)

    # ---- inbound

    async def _handle_stream(self, stream: Any) -> None:
        peer = stream.muxed_conn.peer_id.to_base58()
        if self._network.is_banned(peer):
            with contextlib.suppress(BaseLibp2pError):
                await stream.reset()
            return
        try:
            while True:
                message = await read_message(stream)
                if message is None:
                    break
                self._receive(peer, message)
        except BitswapError as exc:
            self.stats.invalid_messages += 1
            log.info("bitswap: invalid message from %s: %s", peer, exc)
            self._network.penalize(peer, Offence.INVALID_REQUEST)
        except (BaseLibp2pError, OSError) as exc:
            log.debug("bitswap: stream from %s ended: %s", peer, exc)
        finally:
            await _close(stream)

    def _receive(self, peer: str, message: BitswapMessage) -> None:
        for cid, data in message.blocks:
            self._receive_block(peer, cid, data)
        for cid in message.haves:
            for listener in tuple(self._listeners.get(cid.multihash, ())):
                listener.on_presence(peer, cid, True)
        for cid in message.dont_haves:
            for listener in tuple(self._listeners.get(cid.multihash, ())):
                listener.on_presence(peer, cid, False)
        if message.wants or message.full_wantlist:
            self._update_wants(peer, message)

    def _receive_block(self, peer: str, cid: Cid, data: bytes) -> None:
        self.stats.blocks_received += 1
        self.stats.bytes_received += len(data)
        if self._on_transfer is not None:
            self._on_transfer("in", len(data))
        listeners = self._listeners.pop(cid.multihash, None)
        if listeners:
            self._remember(cid)
            for listener in listeners:
                listener.on_block(peer, cid, data)
        elif cid.multihash in self._recent:
            self.stats.duplicate_blocks += 1
        else:
            # Nobody asked for a block with this hash: the peer sent bytes that
            # do not match what it was asked for (or pushes junk).
            self.stats.bad_blocks += 1
            log.warning("bitswap: %s sent a block nobody asked for (%s); penalising", peer, cid)
            self._network.penalize(peer, Offence.BAD_BLOCK)
            for listeners_of_cid in tuple(self._listeners.values()):
                for listener in tuple(listeners_of_cid):
                    listener.on_bad_peer(peer)

    def _remember(self, cid: Cid) -> None:
        self._recent[cid.multihash] = None
        while len(self._recent) > RECENT_BLOCKS:
            self._recent.popitem(last=False)

    # ---- serving

    def _update_wants(self, peer: str, message: BitswapMessage) -> None:
        state = self._peers.setdefault(peer, _Peer())
        if message.full_wantlist:
            state.wants.clear()
        for entry in message.wants:
            key = entry.cid.multihash
            if entry.cancel:
                state.wants.pop(key, None)
            elif key in state.wants or len(state.wants) < MAX_WANTS_PER_PEER:
                existing = state.wants.get(key)
                if existing is None or existing.want_type >= entry.want_type:
                    state.wants[key] = entry  # a want-have never downgrades a want-block
                self.stats.wants_received += 1
        if state.wants and not state.serving and self._nursery is not None:
            state.serving = True
            self._nursery.start_soon(self._serve, peer, state)

    async def _serve(self, peer: str, state: _Peer) -> None:
        try:
            while state.wants:
                batch = [
                    state.wants.popitem(last=False)[1] for _ in range(min(32, len(state.wants)))
                ]
                reply, leftover = await trio.to_thread.run_sync(self._answer, batch)
                for entry in reversed(leftover):
                    key = entry.cid.multihash
                    state.wants[key] = entry
                    state.wants.move_to_end(key, last=False)
                if not reply.is_empty():
                    await self.send(peer, reply)
        finally:
            state.serving = False
            self._forget_if_idle(peer, state)

    def _answer(self, wants: list[WantEntry]) -> tuple[BitswapMessage, list[WantEntry]]:
        """A reply of about BATCH_BYTES at most, and the wants left over (worker thread)."""
        reply = BitswapMessage()
        size = 0
        for index, entry in enumerate(wants):
            if entry.want_type == WantType.HAVE:
                if self._store.has(entry.cid):
                    reply.haves.append(entry.cid)
                elif entry.send_dont_have:
                    reply.dont_haves.append(entry.cid)
                continue
            if size >= BATCH_BYTES:
                return reply, wants[index:]
            try:
                data = self._store.get(entry.cid)
            except BlockNotFound:
                if entry.send_dont_have:
                    reply.dont_haves.append(entry.cid)
                continue
            reply.blocks.append((entry.cid, data))
            size += len(data)
        return reply, []


async def _close(stream: Any) -> None:
    with (
        trio.CancelScope(shield=True),
        trio.move_on_after(1),
        contextlib.suppress(BaseLibp2pError, OSError),
    ):
        await stream.close()
