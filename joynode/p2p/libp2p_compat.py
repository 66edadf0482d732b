"""Every workaround joynode needs for py-libp2p 0.8.1, in one place.

Each item says why it is here and when it can go. The version is pinned in
setup.cfg because item 1 touches a private name.

1. ``swarm.dial_peer`` sleeps 250 ms on every dial ("happy eyeballs") and has
   no setting for it: we zero the private module constant. Remove when the
   delay becomes configurable or skips single-address dials.
2. GossipSub defaults: heartbeat every 120 s (the mesh would take minutes to
   form); spam protection that silently drops more than 10 msg/s per topic,
   our own publishes included; eclipse protection that wants mesh peers on 3
   distinct IPs (a devnet on one machine has one). joynode rate-limits and
   scores peers itself (``joynode.p2p.scoring``), so the library's limits are
   set out of the way. Keep until py-libp2p's defaults follow go-libp2p's.
3. KadDHT caps peers per /24 subnet in its routing table; every devnet peer is
   on 127.0.0.1, so the cap is disabled. Revisit for public deployments once
   nodes run on distinct hosts (subnet diversity then protects the table).
4. Start order: Pubsub, GossipSub and KadDHT must be running before the host
   starts listening and dialing, or incoming streams hit services without a
   manager and the mesh and routing table stay empty.
5. The swarm's auto-connector dials peers from the peerstore until it has
   the midpoint of its watermarks, banned peers included. joynode decides whom
   to dial (``p2p.max_peers``, bans, backoff), so the auto-connector is turned
   into a no-op and the pruner's high watermark is twice ``max_peers``. Keep
   until py-libp2p has a switch for it.
6. Noise: the library logs routine peer errors ("Failed to read DHT message
   from stream") at warning/error level; ``quiet_library_logs`` keeps them at
   debug unless the operator asks for debug logs.
7. Teardown under cancellation: ``host.close()`` runs in a shielded scope
   (with a deadline), or its awaits are cancelled at once and connections are
   left open. Keep: it is how trio cancellation works.
8. Known and not worked around: when a node with live connections stops, one
   dialed TCP socket per connection can stay open until garbage collection
   (py-libp2p's swarm dial path; harmless for a process that is exiting). The
   in-process p2p tests tolerate that ResourceWarning (tests/factories.py,
   LIBP2P_TEARDOWN_LEAK), and tests that restart a node in the same process
   collect it first (``close_leaked_sockets``): until then its peers keep the
   old connection and write into it. Drop both when py-libp2p closes it.
9. Pubsub caches a validator's verdict per message id for 300 s. joynode's
   validator also refuses copies for reasons of the forwarder (rate limit),
   and a cached refusal would then drop the same message from honest
   forwarders too. The cache is turned off (ttl 0): valid messages are still
   deduplicated by pubsub's seen cache before validation, invalid copies are
   checked again (one ecrecover) and cost each forwarder that sends one.
   Keep while the validator judges forwarders.
10. ``Pubsub._teardown_if_connected`` (run when a peer is blacklisted, as
   joynode's bans do) looks the peer up, awaits its stream's reset, then
   deletes the entry; if the peer's stream died during that await, pubsub's
   dead-peer handler deleted it first and the ``KeyError`` takes the whole
   pubsub service (and the node) down. Replaced with the same steps using
   ``pop``. Remove when py-libp2p does the same.
11. Security transports: Noise only. ``new_host`` offers and accepts Noise,
   TLS, secio and ``/plaintext/2.0.0`` unless told otherwise. The plaintext
   handshake only checks that the presented public key matches the claimed
   peer id, and a small key's peer id contains the key, so any dialer could
   claim to be any node (without its private key), send garbage in its name
   and get the real node penalised and banned; its traffic is unencrypted
   too. secio is obsolete and dropped by go- and js-libp2p. py-libp2p's TLS
   is untested against other implementations (and their default is Noise).
   Noise proves the peer id (the remote signs its Noise static key with its
   identity key; py-libp2p checks it, and on a dial checks the id is the one
   dialed), so every peer id joynode trusts comes from an authenticated
   connection. Keep: it is the policy, not a workaround.
12. Interop with js-libp2p (tests/test_p2p_interop.py): a js-libp2p 3 peer
   with ``@libp2p/gossipsub`` (17), Noise and Yamux exchanges gossip with a
   node as shipped, with no patch here. ``@chainsafe/libp2p-gossipsub`` 14
   is built for js-libp2p 2 (``@libp2p/interface`` 2, multiaddr 12): under
   js-libp2p 3 its topology callback fails (``multiaddr.tuples is not a
   function``), so it never opens a pubsub stream to anyone, js peers
   included, and sees no subscriber. It works against a node under js-libp2p
   2. py-libp2p speaks meshsub 1.0 and 1.1, which js negotiates (1.2 adds
   IDONTWANT, not needed). Revisit if the js test fails after an upgrade.
13. ``Swarm.listen`` logs a bind failure (a port in use, an address not on this
   machine) at debug level and carries on, so the node would run with no
   listen address. ``unbound_listen_address`` finds a listen address without
   a listener and binds it once itself to learn the system's reason. Keep
   until the swarm reports it.
14. ``Pubsub.continuously_read_stream`` parses each inbound frame with
   protobuf and does not catch ``DecodeError``: one malformed frame from any
   peer ends pubsub's stream-handler task group, and with it the p2p actor
   and the node. (Seen in a 16-node in-process cluster; a test sends one on
   purpose.) Wrapped: a malformed frame drops that peer's pubsub stream, as
   pubsub does for an oversized one, and the node carries on; the peer may
   open a new stream. Remove when py-libp2p catches it.
15. ``TCPListener.get_addrs`` asks every listening socket its name, closed or
   not. While a host closes, a pubsub task still forwarding a message builds
   its peer record from the host's addresses, gets ``OSError: [Errno 9] Bad
   file descriptor``, and that ends the pubsub service with an error at
   teardown (seen once in a full test run: a stopping raw peer forwarding a
   heartbeat). Replaced: a closed socket has no address. Remove when
   py-libp2p skips them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import libp2p.network.swarm as _swarm
import multiaddr
import trio
from google.protobuf.message import DecodeError
from libp2p import new_host
from libp2p.abc import IHost, INetStream
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_noise_key_pair
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.tools.anyio_service import background_trio_service
from libp2p.transport.tcp.tcp import TCPListener, _multiaddr_from_socket

log = logging.getLogger(__name__)

# 1.
_swarm._HAPPY_EYEBALLS_DELAY = 0.0


# 10.
async def _teardown_if_connected(self: Pubsub, peer_id: ID) -> None:
    """Close a blacklisted peer's stream and forget it (tolerating it being gone already)."""
    stream = self.peers.get(peer_id)
    if stream is not None:
        with contextlib.suppress(Exception):  # as upstream: the stream may be dead already
            await stream.reset()
        self.peers.pop(peer_id, None)
    self._forget_all_subscriptions(peer_id)


Pubsub._teardown_if_connected = _teardown_if_connected  # type: ignore[method-assign]

# 14.
_read_pubsub_stream = Pubsub.continuously_read_stream


async def _read_pubsub_stream_dropping_garbage(self: Pubsub, stream: INetStream) -> None:
    """Pubsub's reader, but a malformed frame ends that peer's stream, not the node."""
    try:
        await _read_pubsub_stream(self, stream)
    except DecodeError:
        peer_id = stream.muxed_conn.peer_id
        log.info("peer %s sent a malformed pubsub frame; its stream is dropped", peer_id)
        with contextlib.suppress(Exception):  # as upstream: the stream may be dead already
            await stream.reset()
        self._handle_dead_peer(peer_id)


Pubsub.continuously_read_stream = _read_pubsub_stream_dropping_garbage  # type: ignore[method-assign]


# 15.
def _open_listener_addrs(self: TCPListener) -> tuple[multiaddr.Multiaddr, ...]:
    """The listener's addresses, leaving out sockets closed already."""
    return tuple(
        _multiaddr_from_socket(listener.socket)
        for listener in self.listeners
        if listener.socket.fileno() != -1
    )


TCPListener.get_addrs = _open_listener_addrs  # type: ignore[method-assign]

CLOSE_TIMEOUT_S = 3.0
GOSSIPSUB_PROTOCOLS = [TProtocol("/meshsub/1.1.0"), TProtocol("/meshsub/1.0.0")]


@dataclass(frozen=True)
class Libp2pStack:
    host: IHost
    pubsub: Pubsub
    router: GossipSub
    dht: KadDHT


async def _dial_nothing() -> None:
    return None


def _noise_only(key_pair: KeyPair) -> dict[TProtocol, NoiseTransport]:
    """The security transports a host offers and accepts (11.)."""
    return {
        NOISE_PROTOCOL_ID: NoiseTransport(
            key_pair, noise_privkey=create_noise_key_pair().private_key
        )
    }


def _make_router() -> GossipSub:
    # 2. The mesh heartbeat (1 s, as go-libp2p) is not the node's status heartbeat.
    return GossipSub(
        protocols=GOSSIPSUB_PROTOCOLS,
        degree=6,
        degree_low=4,
        degree_high=12,
        heartbeat_initial_delay=0.1,
        heartbeat_interval=1,
        spam_protection_enabled=False,
        eclipse_protection_enabled=False,
    )


@asynccontextmanager
async def running_stack(
    key_pair: KeyPair,
    listen: Sequence[str],
    announce: Sequence[str],
    *,
    max_rpc_bytes: int,
    max_peers: int,
) -> AsyncIterator[Libp2pStack]:
    """A started host with GossipSub and a server-mode Kademlia DHT."""
    host = new_host(
        key_pair=key_pair,
        sec_opt=_noise_only(key_pair),  # 11.
        enable_mDNS=False,
        enable_upnp=False,
        announce_addrs=[multiaddr.Multiaddr(a) for a in announce] or None,
        connection_config=ConnectionConfig(  # 5.
            min_connections=0,
            low_watermark=0,
            high_watermark=2 * max_peers,
            max_connections=2 * max_peers + 16,
        ),
    )
    host.get_network().auto_connector.maybe_connect = _dial_nothing  # type: ignore[attr-defined]  # 5.
    router = _make_router()
    pubsub = Pubsub(
        host,
        router,
        strict_signing=True,
        max_inbound_rpc_size=max_rpc_bytes,
        validation_cache_ttl=0,  # 9.
    )
    dht = KadDHT(host, DHTMode.SERVER, max_peers_per_subnet=0)  # 3.
    async with AsyncExitStack() as stack:
        # 4.
        await stack.enter_async_context(background_trio_service(pubsub))
        await stack.enter_async_context(background_trio_service(router))
        await stack.enter_async_context(background_trio_service(dht))
        await stack.enter_async_context(
            host.run(listen_addrs=[multiaddr.Multiaddr(a) for a in listen])
        )
        await pubsub.wait_until_ready()
        try:
            yield Libp2pStack(host, pubsub, router, dht)
        finally:
            # 7.
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
                await host.close()


async def unbound_listen_address(host: IHost, listen: Sequence[str]) -> tuple[str, str] | None:
    """13. The first of ``listen`` the host is not listening on, and why; None if all are bound."""
    listeners = host.get_network().listeners
    for address in listen:
        if str(multiaddr.Multiaddr(address)) in listeners:
            continue
        return address, await _bind_error(multiaddr.Multiaddr(address))
    return None


async def _bind_error(address: multiaddr.Multiaddr) -> str:
    protocols = {p.name for p in address.protocols()}
    family = trio.socket.AF_INET6 if "ip6" in protocols else trio.socket.AF_INET
    if not {"ip4", "tcp"} <= protocols and not {"ip6", "tcp"} <= protocols:
        return "the node listens on TCP over IPv4 or IPv6 only"
    ip = address.value_for_protocol("ip6" if "ip6" in protocols else "ip4")
    with trio.socket.socket(family) as probe:
        probe.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
        try:
            await probe.bind((ip, int(address.value_for_protocol("tcp"))))
        except OSError as exc:
            return str(exc.strerror or exc)
    return "the libp2p transport refused it"


def quiet_library_logs(debug: bool) -> None:
    # 6.
    logging.getLogger("libp2p").setLevel(logging.DEBUG if debug else logging.CRITICAL)
