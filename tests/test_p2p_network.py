"""Real libp2p hosts on 127.0.0.1: three nodes in one process, plus a raw peer that lies."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from pathlib import Path

import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr

from joynode import wire
from joynode.keys import NodeKey
from joynode.node import Node
from joynode.p2p import libp2p_compat, rpc
from joynode.p2p.gossip import HEARTBEAT, GossipSigner
from joynode.p2p.peers import PeerState
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
        honest_payload = GossipSigner(liar).seal(HEARTBEAT, wire.Heartbeat(0, "x", 1, [], [], 0, 0))
        envelope = wire.decode(honest_payload)
        assert isinstance(envelope, wire.Gossip)
        # r and s past the curve order: no key can have made this signature.
        bad_signature = wire.encode(
            wire.Gossip(envelope.topic, envelope.sent_ms, envelope.body, b"\xff" * 65)
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
