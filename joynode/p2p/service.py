"""The ``p2p`` actor: this node as a libp2p peer.

It runs the host (identity = the node key), GossipSub with signed, validated
topics, a Kademlia DHT for discovery, the ``/joynet/rpc/1.0.0`` request
protocol, the peer table and the abuse controls. Other actors use it through
``publish``, ``request`` and the per-topic channels of verified gossip given to
its constructor.

Tasks inside the actor:
- one reader per subscribed topic (heartbeats feed the peer table; other
  topics go out on their channel);
- the heartbeat publisher;
- discovery (DHT lookups, dialing peers it finds);
- upkeep (mark silent peers down, reconnect with backoff, lift expired bans,
  persist the peer table);
- connection events (refuse banned peers, note live ones) and bans.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import pydantic
import trio
from libp2p.abc import INotifee
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.peer.peerstore import PeerStoreError
from multiaddr import Multiaddr
from prometheus_client import CollectorRegistry, Counter, Gauge

from joynode import __version__, wire
from joynode.abc import NetStream, StreamHandler
from joynode.config import P2PSection, SettingError
from joynode.control.jsonrpc import INVALID_PARAMS, RpcError
from joynode.control.methods import ControlMethod, ControlSession, NoParams
from joynode.keys import NodeKey
from joynode.messages import ServingStatus
from joynode.p2p import libp2p_compat, rpc
from joynode.p2p.gossip import (
    GOSSIP_PROTOCOL,
    HEARTBEAT,
    TOPICS,
    GossipRejected,
    GossipSigner,
    GossipVerifier,
    Topic,
    VerifiedGossip,
)
from joynode.p2p.peers import PeerState, PeerTable, Transition
from joynode.p2p.scoring import Offence, PeerScorer
from joynode.signatures import address_of_peer
from joynode.state import StateStore

log = logging.getLogger(__name__)

UPKEEP_INTERVAL_S = 1.0
PERSIST_INTERVAL_S = 10.0
DIAL_TIMEOUT_S = 10.0
RECONNECT_BACKOFF_MIN_S = 1.0
VERIFIED_CACHE = 4096
FORGET_AFTER_S = 24 * 3600  # peers silent this long leave the table

RpcHandler = Callable[[str, Any], Awaitable[wire.Message]]


class P2PError(Exception):
    """A p2p operation that could not be done (bad address, dial failure)."""


@dataclass
class _Backoff:
    delay: float
    next_attempt: float


class _ConnectionEvents(INotifee):
    """libp2p notifee: forwards connection events into a channel, never blocks the swarm."""

    def __init__(self, send: trio.MemorySendChannel[tuple[str, ID]]) -> None:
        self._send = send

    def _emit(self, kind: str, conn: Any) -> None:
        with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError, AttributeError):
            self._send.send_nowait((kind, conn.muxed_conn.peer_id))

    async def connected(self, network: Any, conn: Any) -> None:
        self._emit("connected", conn)

    async def disconnected(self, network: Any, conn: Any) -> None:
        self._emit("disconnected", conn)

    async def opened_stream(self, network: Any, stream: Any) -> None:
        pass

    async def closed_stream(self, network: Any, stream: Any) -> None:
        pass

    async def listen(self, network: Any, multiaddr: Any) -> None:
        pass

    async def listen_close(self, network: Any, multiaddr: Any) -> None:
        pass


class ConnectParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    multiaddr: str = pydantic.Field(max_length=1024)


class PingParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    peer_id: str = pydantic.Field(max_length=128)


class P2PService:
    name = "p2p"

    def __init__(
        self,
        settings: P2PSection,
        key: NodeKey,
        state: StateStore,
        registry: CollectorRegistry,
        serving_status: Callable[[], ServingStatus],
        gossip_send: Mapping[str, trio.MemorySendChannel[VerifiedGossip]] | None = None,
    ) -> None:
        self._settings = settings
        self._key = key
        self._state = state
        self._serving_status = serving_status
        self._gossip_send = dict(gossip_send or {})
        unknown = set(self._gossip_send) - set(TOPICS)
        if unknown:
            raise ValueError(f"no such topics: {sorted(unknown)}")
        self.peer_id = key.peer_id
        self.peers = PeerTable(settings.peer_timeout_s)
        self.scorer = PeerScorer(
            ban_score=settings.ban_score,
            ban_s=settings.ban_s,
            gossip_rate=settings.gossip_rate,
            gossip_burst=settings.gossip_burst,
            rpc_rate=settings.rpc_rate,
            rpc_burst=settings.rpc_burst,
        )
        self._signer = GossipSigner(key, settings.network_id)
        self._verifier = GossipVerifier(
            TOPICS,
            network=settings.network_id,
            max_bytes=settings.max_message_bytes,
            replay_window_s=settings.replay_window_s,
        )
        self._verified: collections.OrderedDict[tuple[bytes, bytes], VerifiedGossip] = (
            collections.OrderedDict()
        )
        self._rpc_handlers: dict[type[wire.Message], RpcHandler] = {wire.Ping: self._on_ping}
        self._rpc_deadlines: dict[type[wire.Message], float] = {}  # longer than rpc_timeout_s
        self._events_send, self._events_receive = trio.open_memory_channel[tuple[str, ID]](1024)
        self._bans_send, self._bans_receive = trio.open_memory_channel[str](1024)
        self._backoff: dict[str, _Backoff] = {}
        self._bootstrap = {
            info_from_p2p_addr(Multiaddr(a)).peer_id.to_base58(): a for a in settings.bootstrap
        }
        self._stack: libp2p_compat.Libp2pStack | None = None
        self._heartbeat_seq = 0
        self._metrics = _P2PMetrics(registry)

    # ---- running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        libp2p_compat.quiet_library_logs(log.isEnabledFor(logging.DEBUG))
        self.peers.restore(await self._state.read(PeerTable.load))
        async with libp2p_compat.running_stack(
            self._key.libp2p_key_pair(),
            self._settings.listen,
            self._settings.announce,
            max_rpc_bytes=self._settings.max_message_bytes + 4096,
            max_peers=self._settings.max_peers,
        ) as stack:
            self._stack = stack
            try:
                unbound = await libp2p_compat.unbound_listen_address(
                    stack.host, self._settings.listen
                )
                if unbound is not None:
                    address, reason = unbound
                    raise SettingError("p2p.listen", f"cannot listen on {address}: {reason}")
                stack.host.set_stream_handler(rpc.PROTOCOL_ID, self._serve_request)  # type: ignore[arg-type]
                stack.host.get_network().register_notifee(_ConnectionEvents(self._events_send))
                async with trio.open_nursery() as nursery:
                    for topic in TOPICS.values():
                        stack.pubsub.set_topic_validator(topic.name, self._validate, False)
                        subscription = await stack.pubsub.subscribe(topic.name)
                        nursery.start_soon(self._read_topic, topic, subscription)
                    nursery.start_soon(self._process_connection_events)
                    nursery.start_soon(self._process_bans)
                    nursery.start_soon(self._heartbeat_loop)
                    nursery.start_soon(self._upkeep_loop)
                    nursery.start_soon(self._discovery_loop)
                    for peer_id, addr in self._bootstrap.items():
                        if peer_id != self.peer_id:
                            nursery.start_soon(
                                self._dial_quietly, info_from_p2p_addr(Multiaddr(addr))
                            )
                    log.info("p2p listening on %s", ", ".join(self.listen_addrs()))
                    task_status.started()
            finally:
                self._stack = None
                with trio.CancelScope(shield=True):
                    await self._persist_peers()

    def _require_stack(self) -> libp2p_compat.Libp2pStack:
        if self._stack is None:
            raise P2PError("p2p is not running")
        return self._stack

    def listen_addrs(self) -> list[str]:
        """This node's dialable addresses, each ending in /p2p/<peer id>."""
        stack = self._require_stack()
        return [str(a) for a in stack.host.get_addrs()]

    # ---- gossip

    async def publish(self, topic: Topic, message: wire.Message) -> None:
        stack = self._require_stack()
        await stack.pubsub.publish(topic.name, self._signer.seal(topic, message))
        self._metrics.published.labels(topic.name).inc()

    def _validate(self, forwarder: ID, msg: Any) -> bool:
        """Topic validator (sync; runs before a message is delivered or forwarded)."""
        topic = msg.topicIDs[0] if msg.topicIDs else ""
        sender = forwarder.to_base58()
        if sender == self.peer_id:
            return True  # our own publish, sealed by us a moment ago
        if self.scorer.is_banned(sender):
            self._metrics.rejected.labels(topic, "banned_peer").inc()
            return False
        if not self.scorer.allow_gossip(sender):
            self._metrics.rate_limited.labels("gossip").inc()
            self.penalize(sender, Offence.RATE_LIMITED)
            return False
        try:
            verified = self._verifier.verify(topic, msg.data, msg.from_id)
        except GossipRejected as rejected:
            self._metrics.rejected.labels(
                topic if topic in TOPICS else "other", rejected.reason
            ).inc()
            log.debug("rejected gossip from %s: %s", sender, rejected)
            # Staleness depends on clocks and duplicates can be made by the origin:
            # an honest forwarder could hand us either, so neither costs it score.
            if rejected.reason not in ("stale", "duplicate"):
                self.penalize(sender, Offence.INVALID_GOSSIP)
            return False
        self._verified[(msg.from_id, msg.seqno)] = verified
        while len(self._verified) > VERIFIED_CACHE:
            self._verified.popitem(last=False)
        return True

    async def _read_topic(self, topic: Topic, subscription: Any) -> None:
        while True:
            msg = await subscription.get()
            verified = self._verified.pop((msg.from_id, msg.seqno), None)
            if verified is None:
                continue  # validated before our cache rolled over; rare, and gossip is lossy
            self._metrics.received.labels(topic.name).inc()
            origin = ID(verified.origin).to_base58()
            if origin == self.peer_id:
                continue
            if isinstance(verified.message, wire.Heartbeat):
                self._note(
                    self.peers.heartbeat(
                        origin, verified.signer, verified.message, verified.sent_ms
                    )
                )
            channel = self._gossip_send.get(topic.name)
            if channel is not None:
                await channel.send(verified)

    async def _heartbeat_loop(self) -> None:
        while True:
            status = self._serving_status()
            beat = wire.Heartbeat(
                seq=self._heartbeat_seq,
                version=__version__,
                protocol=GOSSIP_PROTOCOL,
                addrs=self._announced_addrs(),
                models=list(status.models),
                queue_depth=status.queue_depth,
                capacity=status.capacity,
                build=status.build,
                chains=list(status.chains),
            )
            self._heartbeat_seq += 1
            try:
                await self.publish(HEARTBEAT, beat)
            except BaseLibp2pError as exc:
                log.warning("heartbeat not published: %s", exc)
            # +-10 % jitter: nodes started together do not beat in step.
            jitter = random.uniform(0.9, 1.1)  # noqa: S311 (spreading load, not secrecy)
            await trio.sleep(self._settings.heartbeat_interval_s * jitter)

    def _announced_addrs(self) -> list[str]:
        suffix = f"/p2p/{self.peer_id}"
        return [a.removesuffix(suffix) for a in self.listen_addrs()][:16]

    # ---- requests

    async def request(
        self, peer_id: str, message: wire.Message, *, timeout_s: float | None = None
    ) -> wire.AnyMessage:
        """Send one request to ``peer_id`` and return its answer (``RpcFailure`` otherwise)
        within ``timeout_s`` (default ``p2p.rpc_timeout_s``)."""
        stack = self._require_stack()
        outcome = "error"
        timeout_s = timeout_s or self._settings.rpc_timeout_s
        try:
            with trio.fail_after(timeout_s):
                stream = await stack.host.new_stream(ID.from_base58(peer_id), [rpc.PROTOCOL_ID])  # type: ignore[list-item]
                try:
                    await rpc.write_frame(stream, message)
                    response = await rpc.read_frame(stream, self._settings.max_message_bytes)
                finally:
                    with (
                        trio.CancelScope(shield=True),
                        trio.move_on_after(1),
                        contextlib.suppress(BaseLibp2pError),
                    ):
                        await stream.close()
            if isinstance(response, wire.ErrorReply):
                outcome = "refused"
                raise rpc.RpcFailure(f"refused by {peer_id}: {response.code} {response.reason}")
            outcome = "ok"
            return response
        except trio.TooSlowError:
            outcome = "timeout"
            raise rpc.RpcFailure(f"no answer from {peer_id} in {timeout_s} s") from None
        except (BaseLibp2pError, wire.WireError, ValueError) as exc:
            raise rpc.RpcFailure(f"request to {peer_id} failed: {exc}") from None
        finally:
            self._metrics.requests.labels("out", outcome).inc()

    def handle_requests(
        self, kind: type[wire.Message], handler: RpcHandler, *, timeout_s: float | None = None
    ) -> None:
        """Answer ``/joynet/rpc`` requests of type ``kind`` with ``handler(peer_id, request)``,
        within ``timeout_s`` of reading one (default ``p2p.rpc_timeout_s``: work that takes
        longer, an inference, says so)."""
        if kind in self._rpc_handlers:
            raise ValueError(f"{kind.__name__} requests already have a handler")
        self._rpc_handlers[kind] = handler
        if timeout_s is not None:
            self._rpc_deadlines[kind] = timeout_s

    async def _serve_request(self, stream: Any) -> None:
        peer = stream.muxed_conn.peer_id.to_base58()
        outcome = "ok"
        try:
            with trio.move_on_after(self._settings.rpc_timeout_s) as deadline:
                outcome = await self._answer(peer, stream, deadline)
            if deadline.cancelled_caught:
                outcome = "timeout"
        except (BaseLibp2pError, rpc.RpcFailure, wire.WireError) as exc:
            outcome = "broken"
            log.debug("request from %s failed: %s", peer, exc)
        finally:
            self._metrics.requests.labels("in", outcome).inc()
            with (
                trio.CancelScope(shield=True),
                trio.move_on_after(1),
                contextlib.suppress(BaseLibp2pError),
            ):
                await stream.close()

    async def _answer(self, peer: str, stream: Any, deadline: trio.CancelScope) -> str:
        if self.scorer.is_banned(peer):
            await stream.reset()
            return "banned"
        if not self.scorer.allow_request(peer):
            self._metrics.rate_limited.labels("rpc").inc()
            self.penalize(peer, Offence.RATE_LIMITED)
            await rpc.write_frame(stream, wire.ErrorReply(429, "rate limited"))
            return "rate_limited"
        try:
            request = await rpc.read_frame(stream, self._settings.max_message_bytes)
        except (wire.WireError, rpc.RpcFailure) as exc:
            self.penalize(peer, Offence.INVALID_REQUEST)
            await rpc.write_frame(stream, wire.ErrorReply(400, str(exc)[:1024]))
            return "invalid"
        handler = self._rpc_handlers.get(type(request))
        if type(request) in self._rpc_deadlines:
            deadline.deadline = trio.current_time() + self._rpc_deadlines[type(request)]
        if handler is None:
            await rpc.write_frame(
                stream, wire.ErrorReply(404, f"no handler for {type(request).__name__}")
            )
            return "unsupported"
        await rpc.write_frame(stream, await handler(peer, request))
        address = address_of_peer(ID.from_base58(peer).to_bytes())
        if address is not None:
            self._note(self.peers.heard(peer, address))
        return "ok"

    async def _on_ping(self, peer: str, ping: wire.Ping) -> wire.Message:
        return wire.Pong(ping.nonce)

    # ---- streams and content routing (for the storage actor)

    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        self._require_stack().host.set_stream_handler(TProtocol(protocol), handler)

    async def open_stream(self, peer_id: str, protocols: Sequence[str]) -> NetStream:
        """A new stream to ``peer_id`` (dialing it from the peerstore if needed)."""
        stack = self._require_stack()
        stream = await stack.host.new_stream(
            ID.from_base58(peer_id), [TProtocol(p) for p in protocols]
        )
        return cast(NetStream, stream)

    def connected_peers(self) -> list[str]:
        """Peers with a live connection, JoyNet nodes and IPFS peers alike."""
        network = self._require_stack().host.get_network()
        return [
            peer.to_base58()
            for peer, conns in network.get_connections_map().items()
            if conns and not self.scorer.is_banned(peer.to_base58())
        ]

    async def provide(self, key: bytes) -> bool:
        """Announce on the DHT that this node provides ``key`` (a multihash)."""
        return await self._require_stack().dht.provider_store.provide(key)

    async def find_providers(self, key: bytes, count: int) -> list[tuple[str, list[str]]]:
        """Peers the DHT says provide ``key``, with their addresses (this node excluded)."""
        found = await self._require_stack().dht.provider_store.find_providers(key, count)
        return [
            (info.peer_id.to_base58(), [str(a) for a in info.addrs])
            for info in found
            if info.peer_id.to_base58() != self.peer_id
        ]

    def is_banned(self, peer: str) -> bool:
        return self.scorer.is_banned(peer)

    @staticmethod
    def address_of(peer: str) -> str | None:
        """The node address whose key is ``peer``'s libp2p key (None: not a secp256k1 key)."""
        return address_of_peer(ID.from_base58(peer).to_bytes())

    # ---- peers, connections, bans

    def _note(self, transition: Transition | None) -> None:
        if transition is not None:
            log.info("peer %s is %s", transition.peer_id, transition.state.value)

    def penalize(self, peer: str, offence: Offence) -> None:
        """Lower ``peer``'s score; ban it when the score falls through the floor (never blocks)."""
        self._metrics.penalties.labels(offence.name.lower()).inc()
        if self.scorer.penalize(peer, offence):
            # Called from libp2p's validator and stream handlers: never block or raise there.
            with contextlib.suppress(trio.WouldBlock):
                self._bans_send.send_nowait(peer)

    async def _process_bans(self) -> None:
        async for peer in self._bans_receive:
            stack = self._require_stack()
            self._metrics.bans.inc()
            offences = self.scorer.snapshot().get(peer, {}).get("offences", {})
            log.warning(
                "banning peer %s for %.0f s (score fell below %s; offences: %s)",
                peer,
                self._settings.ban_s,
                self._settings.ban_score,
                offences,
            )
            stack.pubsub.add_to_blacklist(ID.from_base58(peer))
            await self._disconnect(peer)

    async def _disconnect(self, peer: str) -> None:
        stack = self._require_stack()
        try:
            await stack.host.disconnect(ID.from_base58(peer))
        except BaseLibp2pError as exc:
            log.debug("disconnecting %s: %s", peer, exc)

    async def _process_connection_events(self) -> None:
        async for kind, peer_id in self._events_receive:
            peer = peer_id.to_base58()
            if kind != "connected" or peer == self.peer_id:
                continue
            if self.scorer.is_banned(peer):
                self._metrics.dials.labels("in", "refused_banned").inc()
                await self._disconnect(peer)
                continue
            address = address_of_peer(peer_id.to_bytes())
            if address is None:
                # Not a JoyNet node (their keys are secp256k1): an IPFS peer such as
                # kubo, welcome for Bitswap but not in the peer table.
                log.debug("connected to %s, an IPFS peer (not a JoyNet node)", peer)
                continue
            self.peers.discovered(peer, address, [str(a) for a in self._known_addrs(peer_id)])
            self._note(self.peers.heard(peer, address))
            self._backoff.pop(peer, None)

    def _known_addrs(self, peer_id: ID) -> list[Multiaddr]:
        try:
            return list(self._require_stack().host.get_peerstore().addrs(peer_id))
        except PeerStoreError:
            return []

    async def connect(self, addr: str) -> str:
        """Dial a peer by ``/.../p2p/<peer id>`` multiaddr; return its peer id."""
        try:
            info = info_from_p2p_addr(Multiaddr(addr))
        except Exception as exc:  # multiaddr raises several unrelated types
            raise P2PError(f"not a dialable /p2p/ multiaddr: {addr!r} ({exc})") from None
        return await self._dial(info)

    async def _dial(self, info: PeerInfo) -> str:
        stack = self._require_stack()
        peer = info.peer_id.to_base58()
        if peer == self.peer_id:
            raise P2PError("that is this node's own peer id")
        if self.scorer.is_banned(peer):
            raise P2PError(f"peer {peer} is banned")
        try:
            with trio.fail_after(DIAL_TIMEOUT_S):
                await stack.host.connect(info)
        except trio.TooSlowError:
            self._metrics.dials.labels("out", "timeout").inc()
            raise P2PError(f"dialing {peer} timed out") from None
        except (BaseLibp2pError, OSError) as exc:
            self._metrics.dials.labels("out", "failed").inc()
            raise P2PError(f"dialing {peer} failed: {exc}") from None
        self._metrics.dials.labels("out", "ok").inc()
        return peer

    async def _dial_quietly(self, info: PeerInfo) -> None:
        """Background dials (bootstrap, discovery, reconnection): failures are routine."""
        try:
            await self._dial(info)
        except P2PError as exc:
            log.debug("%s", exc)

    # ---- discovery and upkeep

    async def _discovery_loop(self) -> None:
        """DHT lookups for peers near us; quick at first, then every discovery interval."""
        delay = 0.5
        while True:
            await trio.sleep(delay)
            delay = min(delay * 2, self._settings.discovery_interval_s)
            stack = self._require_stack()
            connected = set(stack.host.get_connected_peers())
            if not connected or len(connected) >= self._settings.max_peers:
                continue
            try:
                found = await stack.dht.peer_routing.find_closest_peers_network(
                    stack.host.get_id().to_bytes()
                )
            except BaseLibp2pError as exc:
                log.debug("DHT lookup failed: %s", exc)
                continue
            async with trio.open_nursery() as dials:
                for peer_id in found:
                    addrs = self._known_addrs(peer_id)
                    address = address_of_peer(peer_id.to_bytes())
                    if peer_id == stack.host.get_id() or address is None or not addrs:
                        continue
                    self.peers.discovered(peer_id.to_base58(), address, [str(a) for a in addrs])
                    room = self._settings.max_peers - len(connected)
                    if peer_id not in connected and room > 0:
                        connected.add(peer_id)
                        dials.start_soon(self._dial_quietly, PeerInfo(peer_id, addrs))

    async def _upkeep_loop(self) -> None:
        persisted = time.monotonic()
        async with trio.open_nursery() as dials:
            while True:
                await trio.sleep(UPKEEP_INTERVAL_S)
                for transition in self.peers.sweep():
                    self._note(transition)
                self.peers.forget_silent(FORGET_AFTER_S)
                self.scorer.forget_idle({r.peer_id for r in self.peers.records()})
                self._reconnect_due(dials)
                self._lift_expired_bans()
                self._update_gauges()
                if time.monotonic() - persisted >= PERSIST_INTERVAL_S:
                    persisted = time.monotonic()
                    await self._persist_peers()

    def _reconnect_due(self, dials: trio.Nursery) -> None:
        """Redial lost peers (and bootstrap peers), each with its own exponential backoff."""
        stack = self._require_stack()
        connected = {p.to_base58() for p in stack.host.get_connected_peers()}
        now = time.monotonic()
        candidates: dict[str, list[str]] = {
            peer: [addr.removesuffix(f"/p2p/{peer}")] for peer, addr in self._bootstrap.items()
        }
        # Beyond the bootstrap peers, only the most recently seen lost peers, up to
        # max_peers: a flood of one-time identities cannot make us dial forever.
        lost = sorted(
            (r for r in self.peers.records() if r.state is PeerState.DOWN and r.addrs),
            key=lambda r: r.last_seen or 0.0,
            reverse=True,
        )
        for record in lost[: self._settings.max_peers]:
            candidates.setdefault(record.peer_id, record.addrs)
        for peer in set(self._backoff) - set(candidates):
            del self._backoff[peer]
        for peer, addrs in candidates.items():
            if peer in connected or peer == self.peer_id or self.scorer.is_banned(peer):
                continue
            backoff = self._backoff.get(peer)
            if backoff is None:
                backoff = self._backoff[peer] = _Backoff(RECONNECT_BACKOFF_MIN_S, now)
            if now < backoff.next_attempt:
                continue
            backoff.next_attempt = now + backoff.delay
            backoff.delay = min(backoff.delay * 2, self._settings.reconnect_backoff_max_s)
            try:
                info = PeerInfo(ID.from_base58(peer), [Multiaddr(a) for a in addrs])
            except Exception as exc:  # multiaddr raises several unrelated types
                log.debug("not redialing %s: bad stored address (%s)", peer, exc)
                continue
            dials.start_soon(self._dial_quietly, info)

    def _lift_expired_bans(self) -> None:
        stack = self._require_stack()
        for peer_id in list(stack.pubsub.blacklisted_peers):
            if not self.scorer.is_banned(peer_id.to_base58()):
                stack.pubsub.remove_from_blacklist(peer_id)
                log.info("ban on %s lifted", peer_id.to_base58())

    async def _persist_peers(self) -> None:
        dirty, forgotten = self.peers.take_changes()
        if dirty or forgotten:
            await self._state.write(lambda conn: PeerTable.save(conn, dirty, forgotten))

    def _update_gauges(self) -> None:
        for state, count in self.peers.counts().items():
            self._metrics.peers.labels(state.value).set(count)
        stack = self._require_stack()
        self._metrics.connected.set(len(stack.host.get_connected_peers()))
        self._metrics.banned.set(len(stack.pubsub.blacklisted_peers))

    # ---- control

    def status(self) -> dict[str, Any]:
        stack = self._require_stack()
        return {
            "peer_id": self.peer_id,
            "address": self._key.address,
            "listen": self.listen_addrs(),
            "announce": list(self._settings.announce),
            "topics": {
                name: {"mesh_peers": len(stack.router.mesh.get(name, ()))} for name in TOPICS
            },
            "connected_peers": len(stack.host.get_connected_peers()),
            "dht_routing_table": stack.dht.get_routing_table_size(),
            "peer_table": {s.value: n for s, n in self.peers.counts().items()},
            "scores": self.scorer.snapshot(),
        }

    def peer_list(self) -> list[dict[str, object]]:
        stack = self._require_stack()
        connected = {p.to_base58() for p in stack.host.get_connected_peers()}
        now = time.time()
        out = []
        for record in sorted(self.peers.records(), key=lambda r: r.peer_id):
            entry = record.to_json(now)
            entry["connected"] = record.peer_id in connected
            entry["score"] = round(self.scorer.score(record.peer_id), 2)
            entry["banned"] = self.scorer.is_banned(record.peer_id)
            out.append(entry)
        return out

    def control_methods(self) -> list[ControlMethod]:
        async def peers_list(_: NoParams, __: ControlSession) -> list[dict[str, object]]:
            return self.peer_list()

        async def peers_connect(params: ConnectParams, _: ControlSession) -> dict[str, object]:
            try:
                peer = await self.connect(params.multiaddr)
            except P2PError as exc:
                raise RpcError(INVALID_PARAMS, str(exc)) from None
            return {"peer_id": peer, "connected": True}

        async def peers_ping(params: PingParams, _: ControlSession) -> dict[str, object]:
            began = time.perf_counter()
            nonce = time.time_ns() & 0x7FFF_FFFF_FFFF_FFFF
            try:
                answer = await self.request(params.peer_id, wire.Ping(nonce))
            except rpc.RpcFailure as exc:
                raise RpcError(INVALID_PARAMS, str(exc)) from None
            if answer != wire.Pong(nonce):
                raise RpcError(INVALID_PARAMS, f"unexpected answer {answer!r}")
            return {
                "peer_id": params.peer_id,
                "rtt_ms": round((time.perf_counter() - began) * 1000, 3),
            }

        async def p2p_status(_: NoParams, __: ControlSession) -> dict[str, Any]:
            return self.status()

        return [
            ControlMethod("peers.list", NoParams, peers_list, "The peer table."),
            ControlMethod(
                "peers.connect", ConnectParams, peers_connect, "Dial a peer by /p2p/ multiaddr."
            ),
            ControlMethod(
                "peers.ping", PingParams, peers_ping, "Round trip of a request to a peer."
            ),
            ControlMethod(
                "p2p.status",
                NoParams,
                p2p_status,
                "Listen addresses, topics and mesh sizes, peer scores.",
            ),
        ]


class _P2PMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.peers = Gauge(
            "joynode_p2p_peers", "Peer table entries by state", ["state"], registry=registry
        )
        self.connected = Gauge(
            "joynode_p2p_connected_peers", "Open libp2p connections", registry=registry
        )
        self.banned = Gauge("joynode_p2p_banned_peers", "Peers currently banned", registry=registry)
        self.published = Counter(
            "joynode_p2p_gossip_published_total", "Gossip published", ["topic"], registry=registry
        )
        self.received = Counter(
            "joynode_p2p_gossip_received_total",
            "Verified gossip received",
            ["topic"],
            registry=registry,
        )
        self.rejected = Counter(
            "joynode_p2p_gossip_rejected_total",
            "Gossip rejected by the topic validator",
            ["topic", "reason"],
            registry=registry,
        )
        self.rate_limited = Counter(
            "joynode_p2p_rate_limited_total",
            "Messages dropped by per-peer rate limits",
            ["kind"],
            registry=registry,
        )
        self.penalties = Counter(
            "joynode_p2p_penalties_total", "Peer score penalties", ["offence"], registry=registry
        )
        self.bans = Counter("joynode_p2p_bans_total", "Peers banned", registry=registry)
        self.requests = Counter(
            "joynode_p2p_requests_total",
            "Requests over /joynet/rpc/1.0.0",
            ["direction", "outcome"],
            registry=registry,
        )
        self.dials = Counter(
            "joynode_p2p_dials_total",
            "Connection attempts",
            ["direction", "outcome"],
            registry=registry,
        )
