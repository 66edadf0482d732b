"""Real libp2p hosts on 127.0.0.1: three nodes in one process, plus a raw peer that lies."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from pathlib import Path

import libp2p.security.secio.transport as secio
import pytest
import trio
from libp2p import new_host
from libp2p.abc import IHost, ISecureTransport
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_noise_key_pair
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from multiaddr import Multiaddr

from joynode import wire
from joynode.keys import NodeKey
from joynode.node import Node
from joynode.p2p import libp2p_compat, rpc
from joynode.p2p.gossip import HEARTBEAT, GossipSigner
from joynode.p2p.peers import PeerState
from joynode.p2p.service import P2PError
from tests.factories import (
    LIBP2P_TEARDOWN_LEAK,
    fast_p2p,
    make_home,
    raw_peer,
    running_node,
    wait_for,
)

pytestmark = LIBP2P_TEARDOWN_LEAK


@asynccontextmanager
async def three_nodes(tmp_path: Path) -> AsyncIterator[list[Node]]:
    """A, then B and C bootstrapping from A only."""
    async with AsyncExitStack() as stack:
        a_home = fast_p2p(make_home(tmp_path / "a"))
        a_home.set("p2p", "max_message_bytes", "4096")
        a_home.set("p2p", "rpc_burst", "20")
        a_home.set("p2p", "rpc_rate", "1.0")
        a = await stack.enter_async_context(running_node(a_home))
        bootstrap = a.p2p.listen_addrs()
        nodes = [a]
        for name in ("b", "c"):
            home = fast_p2p(make_home(tmp_path / name), bootstrap=bootstrap)
            nodes.append(await stack.enter_async_context(running_node(home)))
        yield nodes


def up_peers(node: Node) -> set[str]:
    return {r.peer_id for r in node.p2p.peers.records() if r.state is PeerState.UP}


def others(nodes: list[Node], node: Node) -> set[str]:
    return {n.p2p.peer_id for n in nodes if n is not node}


def all_up(nodes: list[Node], node: Node) -> bool:
    return up_peers(node) == others(nodes, node)


def heartbeat_seq(node: Node, of: Node) -> int:
    record = node.p2p.peers.get(of.p2p.peer_id)
    assert record is not None
    return record.heartbeat_seq


def connected(node: Node) -> set[str]:
    return {p.to_base58() for p in node.p2p._require_stack().host.get_connected_peers()}


def rejected(node: Node, reason: str) -> float:
    value = node.registry.get_sample_value(
        "joynode_p2p_gossip_rejected_total", {"topic": HEARTBEAT.name, "reason": reason}
    )
    return value or 0.0


async def join_mesh(stack: libp2p_compat.Libp2pStack, node: Node) -> None:

    await stack.pubsub.subscribe(HEARTBEAT.name)
    await stack.host.connect(info_from_p2p_addr(Multiaddr(node.p2p.listen_addrs()[0])))
    raw_id = stack.host.get_id()
    node_stack = node.p2p._require_stack()
    await wait_for(
        lambda: raw_id in node_stack.router.mesh.get(HEARTBEAT.name, set()),
        10,
        "raw peer in the node's mesh",
    )


async def test_three_nodes_find_each_other_and_gossip(tmp_path: Path) -> None:
    async with three_nodes(tmp_path) as nodes:
        for node in nodes:
            await wait_for(partial(all_up, nodes, node), 10, "all peers up")
        _, b, c = nodes
        # B and C only knew A; the DHT introduced them to each other.
        await wait_for(
            lambda: (
                c.p2p.peer_id
                in {p.to_base58() for p in b.p2p._require_stack().host.get_connected_peers()}
            ),
            10,
            "B connected to C directly",
        )
        record = b.p2p.peers.get(c.p2p.peer_id)
        assert record is not None
        assert record.address == c.identity.address
        assert record.version is not None
        assert record.addrs


async def test_forged_gossip_is_rejected_and_costs_the_sender(tmp_path: Path) -> None:
    async with three_nodes(tmp_path) as nodes, raw_peer() as raw:
        a, b, c = nodes
        for node in nodes:
            await wait_for(partial(all_up, nodes, node), 10, "all peers up")
        await join_mesh(raw, a)
        raw_id = raw.host.get_id().to_base58()
        liar = NodeKey.generate()
        honest_payload = GossipSigner(liar, a.config.p2p.network_id).seal(
            HEARTBEAT, wire.Heartbeat(0, "x", 2, [], [], 0, 0)
        )
        envelope = wire.decode(honest_payload)
        assert isinstance(envelope, wire.Gossip)
        # r and s past the curve order: no key can have made this signature.
        bad_signature = wire.encode(
            wire.Gossip(
                envelope.network, envelope.topic, envelope.sent_ms, envelope.body, b"\xff" * 65
            )
        )
        forgeries = {
            "wrong_signer": honest_payload,  # validly signed, but not by the raw peer's key
            "bad_signature": bad_signature,
            "oversize": b"\x00" * 5000,
            "malformed": b"\xc1 garbage",
        }
        for payload in forgeries.values():
            await raw.pubsub.publish(HEARTBEAT.name, payload)
        for reason in forgeries:
            await wait_for(partial(lambda r: rejected(a, r) >= 1, reason), 5, f"A rejects {reason}")
        assert a.p2p.scorer.score(raw_id) < 0
        # Nothing reached B or C: A did not forward what it rejected.
        assert all(rejected(n, r) == 0 for n in (b, c) for r in forgeries)
        # Honest nodes keep working: C's heartbeats still arrive at A and B.
        before = {n.p2p.peer_id: heartbeat_seq(n, c) for n in (a, b)}
        await wait_for(
            lambda: all(heartbeat_seq(n, c) > before[n.p2p.peer_id] for n in (a, b)),
            5,
            "C's heartbeats still flow",
        )


async def test_a_malformed_pubsub_frame_drops_its_stream_not_the_node(tmp_path: Path) -> None:
    async with three_nodes(tmp_path) as nodes, raw_peer() as raw:
        a, _, c = nodes
        for node in nodes:
            await wait_for(partial(all_up, nodes, node), 10, "all peers up")
        await raw.host.connect(info_from_p2p_addr(Multiaddr(a.p2p.listen_addrs()[0])))
        stream = await raw.host.new_stream(
            ID.from_base58(a.p2p.peer_id), libp2p_compat.GOSSIPSUB_PROTOCOLS
        )
        frame = b"\x0a\xff\xff\xff\x0f"  # a field whose length runs past the frame
        await stream.write(bytes([len(frame)]) + frame)
        # The node keeps running and hearing its peers.
        before = heartbeat_seq(a, c)
        await wait_for(lambda: heartbeat_seq(a, c) > before + 2, 10, "C's heartbeats flow")
        assert a.supervisor.snapshot()["p2p"]["state"] == "ready"


async def test_a_persistent_liar_is_banned_and_refused(tmp_path: Path) -> None:
    async with three_nodes(tmp_path) as nodes, raw_peer() as raw:
        a = nodes[0]
        await join_mesh(raw, a)
        raw_id = raw.host.get_id()
        for _ in range(10):
            await raw.pubsub.publish(HEARTBEAT.name, b"\xc1 garbage")
        await wait_for(lambda: a.p2p.scorer.is_banned(raw_id.to_base58()), 5, "liar banned")
        a_stack = a.p2p._require_stack()
        await wait_for(
            lambda: raw_id not in a_stack.host.get_connected_peers(), 5, "liar disconnected"
        )
        assert a.registry.get_sample_value("joynode_p2p_bans_total") == 1
        # Coming back does not help during the cool-down.

        # The dial may fail outright or succeed and be closed right after.
        with contextlib.suppress(Exception):
            await raw.host.connect(info_from_p2p_addr(Multiaddr(a.p2p.listen_addrs()[0])))
        await trio.sleep(0.5)
        assert raw_id not in a_stack.host.get_connected_peers()
        status = a.p2p.status()
        assert status["scores"][raw_id.to_base58()]["banned_for_s"] > 0


async def test_requests_between_nodes_and_from_a_raw_peer(tmp_path: Path) -> None:
    async with three_nodes(tmp_path) as nodes, raw_peer() as raw:
        a, b, _ = nodes
        assert await b.p2p.request(a.p2p.peer_id, wire.Ping(7)) == wire.Pong(7)

        await raw.host.connect(info_from_p2p_addr(Multiaddr(a.p2p.listen_addrs()[0])))

        a_id = ID.from_base58(a.p2p.peer_id)
        raw_id = raw.host.get_id()

        async def send(frame: bytes) -> wire.AnyMessage:
            stream = await raw.host.new_stream(a_id, [TProtocol(rpc.PROTOCOL_ID)])
            await stream.write(frame)
            answer = await rpc.read_frame(stream, 1 << 20)
            await stream.close()
            return answer

        ok = wire.encode(wire.Ping(1))
        assert await send(len(ok).to_bytes(4, "big") + ok) == wire.Pong(1)
        garbage = b"\xc1\xc1\xc1"
        answer = await send(len(garbage).to_bytes(4, "big") + garbage)
        assert isinstance(answer, wire.ErrorReply)
        assert answer.code == 400
        oversize = await send((10_000).to_bytes(4, "big"))
        assert isinstance(oversize, wire.ErrorReply)
        assert "exceeds the cap" in oversize.reason
        assert a.p2p.scorer.score(raw_id.to_base58()) < 0
        # The burst is 20 requests: the rest are refused as rate limited.
        answers = [await send(len(ok).to_bytes(4, "big") + ok) for _ in range(20)]
        assert any(isinstance(x, wire.ErrorReply) and x.code == 429 for x in answers)
        # The honest neighbour is unaffected.
        assert await b.p2p.request(a.p2p.peer_id, wire.Ping(8)) == wire.Pong(8)


async def test_a_node_of_another_network_refuses_its_gossip(tmp_path: Path) -> None:
    """Gossip signed for one JoyNet network is refused by a node of another (no replay)."""
    a_home = fast_p2p(make_home(tmp_path / "a"))
    a_home.set("p2p", "network_id", '"alpha"')
    async with running_node(a_home) as a:
        b_home = fast_p2p(make_home(tmp_path / "b"), bootstrap=a.p2p.listen_addrs())
        b_home.set("p2p", "network_id", '"beta"')
        async with running_node(b_home) as b:
            await wait_for(
                lambda: rejected(a, "wrong_network") >= 1 and rejected(b, "wrong_network") >= 1,
                15,
                "each node refuses the other's heartbeats",
            )
            for node, other in ((a, b), (b, a)):
                record = node.p2p.peers.get(other.p2p.peer_id)
                assert record is None or record.version is None  # no heartbeat was taken


# ---- who a peer is: only an authenticated (Noise) connection says so (issue 25)


@asynccontextmanager
async def host_offering(security: str, *, claiming: KeyPair | None = None) -> AsyncIterator[IHost]:
    """A bare py-libp2p host whose only security transport is ``security``.

    With ``claiming``, its handshakes present that key pair instead of the
    host's own: a stolen public key with a private key of the attacker's.
    """
    key_pair = NodeKey.generate().libp2p_key_pair()
    handshake_key = claiming or key_pair
    transport: ISecureTransport
    if security == "plaintext":
        protocol, transport = PLAINTEXT_PROTOCOL_ID, InsecureTransport(handshake_key)
    elif security == "secio":
        protocol, transport = TProtocol(secio.ID), secio.Transport(handshake_key)
    else:
        noise_key = create_noise_key_pair().private_key
        protocol, transport = NOISE_PROTOCOL_ID, NoiseTransport(handshake_key, noise_key)
    host = new_host(
        key_pair=key_pair,
        sec_opt={TProtocol(protocol): transport},
        enable_mDNS=False,
        enable_upnp=False,
    )
    async with host.run(listen_addrs=[Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        try:
            yield host
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(3):
                await host.close()


@pytest.mark.parametrize("security", ["plaintext", "secio"])
async def test_a_peer_without_noise_cannot_connect_either_way(
    tmp_path: Path, security: str
) -> None:
    async with (
        running_node(fast_p2p(make_home(tmp_path / "a"))) as a,
        host_offering(security) as peer,
    ):
        with trio.fail_after(20), pytest.raises(BaseLibp2pError):
            await peer.connect(info_from_p2p_addr(Multiaddr(a.p2p.listen_addrs()[0])))
        with trio.fail_after(20), pytest.raises(P2PError):
            await a.p2p.connect(f"{peer.get_addrs()[0]}")
        assert peer.get_id().to_base58() not in connected(a)
        assert not peer.get_connected_peers()


async def attack(impostor: IHost, target: Node) -> int:
    """Issue 25's attack: connect under a stolen peer id and send garbage requests in its name.

    Returns how many of the garbage requests the target answered (and so
    counted against the peer id the impostor claimed).
    """
    answered = 0
    garbage = b"\xc1\xc1\xc1"
    # A Noise initiator only learns that the responder refused its identity
    # when the connection closes: the dial may "succeed" and the streams fail.
    with contextlib.suppress(BaseLibp2pError, rpc.RpcFailure), trio.fail_after(20):
        await impostor.connect(info_from_p2p_addr(Multiaddr(target.p2p.listen_addrs()[0])))
        for _ in range(6):
            stream = await impostor.new_stream(
                ID.from_base58(target.p2p.peer_id), [TProtocol(rpc.PROTOCOL_ID)]
            )
            await stream.write(len(garbage).to_bytes(4, "big") + garbage)
            await rpc.read_frame(stream, 1 << 20)
            await stream.close()
            answered += 1
    return answered


@pytest.mark.parametrize("security", ["plaintext", "noise"])
async def test_nobody_can_pose_as_a_node_to_get_it_banned(tmp_path: Path, security: str) -> None:
    """A dialer with B's public key but not its private key cannot speak for B."""
    async with running_node(fast_p2p(make_home(tmp_path / "a"))) as a:
        b_home = fast_p2p(make_home(tmp_path / "b"), bootstrap=a.p2p.listen_addrs())
        async with running_node(b_home) as b:
            await wait_for(lambda: b.p2p.peer_id in connected(a), 10, "A and B connected")
            attacker_key = NodeKey.generate().libp2p_key_pair().private_key
            stolen = KeyPair(attacker_key, b_home.key.libp2p_key_pair().public_key)
            async with host_offering(security, claiming=stolen) as impostor:
                answered = await attack(impostor, a)
            if security == "plaintext":
                assert answered == 0  # refused at the handshake: A offers Noise only
            else:
                # Noise takes the identity from the key that signs the handshake: the
                # garbage is charged to the attacker's own peer id, never to B's.
                attacker = ID.from_pubkey(attacker_key.get_public_key()).to_base58()
                assert answered > 0
                assert a.p2p.scorer.score(attacker) < 0
            assert a.p2p.scorer.score(b.p2p.peer_id) == 0
            assert not a.p2p.scorer.is_banned(b.p2p.peer_id)
            assert b.p2p.peer_id in connected(a)
            assert await b.p2p.request(a.p2p.peer_id, wire.Ping(1)) == wire.Pong(1)
