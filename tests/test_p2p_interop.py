"""Gossip between a node and a js-libp2p peer (js-libp2p 3, @libp2p/gossipsub, Noise, Yamux).

The js peer (tests/js_gossip_peer.mjs) is a separate implementation of
libp2p and of JoyNet's signed gossip envelope: it must receive the node's
heartbeats, and the node must validate and take its well-formed messages and
refuse (and count, and score) malformed ones.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from libp2p.peer.id import ID

from joynode import wire
from joynode.node import Node
from joynode.p2p.gossip import GOSSIP_PROTOCOL, HEARTBEAT, TOPICS, GossipVerifier
from joynode.p2p.peers import PeerState
from joynode.signatures import address_of_peer
from tests.factories import LIBP2P_TEARDOWN_LEAK, fast_p2p, make_home, running_node, wait_for
from tests.js_peer import Event, JsPeer, running_js_peer
from tests.test_p2p_network import rejected

pytestmark = LIBP2P_TEARDOWN_LEAK


def js_heartbeat(seq: int, version: str) -> dict[str, object]:
    """A ``wire.Heartbeat`` as the js peer encodes it (msgpack of this map, tag included)."""
    return {
        "type": "heartbeat",
        "seq": seq,
        "version": version,
        "protocol": GOSSIP_PROTOCOL,
        "addrs": [],
        "models": ["js-model"],
        "queue_depth": 0,
        "capacity": 1,
    }


def from_node(node: Node) -> Callable[[Event], bool]:
    """Matches the js peer's ``message`` events of the node's heartbeats."""

    def matches(event: Event) -> bool:
        return bool(event["topic"] == HEARTBEAT.name and event["from"] == node.p2p.peer_id)

    return matches


async def node_subscribed(js: JsPeer, node: Node) -> None:
    await js.wait_event(
        "subscribers",
        30,
        "the js peer sees the node subscribed to the heartbeat topic",
        lambda e: e["topic"] == HEARTBEAT.name and node.p2p.peer_id in e["peers"],
    )


def js_version(node: Node, js: JsPeer) -> str | None:
    record = node.p2p.peers.get(js.peer_id)
    return None if record is None else record.version


@pytest.mark.parametrize("key_type", ["secp256k1", "Ed25519"])
async def test_a_js_peer_connects_with_noise_and_receives_the_nodes_heartbeats(
    tmp_path: Path, key_type: str
) -> None:
    async with (
        running_node(fast_p2p(make_home(tmp_path / "node"))) as node,
        running_js_peer(
            node.p2p.listen_addrs()[0], [HEARTBEAT.name], key_type=key_type, log_dir=tmp_path
        ) as js,
    ):
        ready = js.find("ready")[0]
        assert ready["remote"] == node.p2p.peer_id
        assert (ready["encryption"], ready["muxer"]) == ("/noise", "/yamux/1.0.0")
        await node_subscribed(js, node)
        # GossipSub control messages work both ways: the js peer grafted into the mesh.
        mesh = node.p2p._require_stack().router.mesh
        await wait_for(
            lambda: ID.from_base58(js.peer_id) in mesh.get(HEARTBEAT.name, set()),
            30,
            "the js peer in the node's heartbeat mesh",
        )
        await wait_for(lambda: len(js.find("message", from_node(node))) >= 2, 30, "2 heartbeats")
        # What arrived is the node's signed heartbeat, intact.
        verifier = GossipVerifier(
            TOPICS, network=node.config.p2p.network_id, max_bytes=1 << 20, replay_window_s=600
        )
        for event in js.find("message", from_node(node))[:2]:
            origin = ID.from_base58(event["from"]).to_bytes()
            verified = verifier.verify(HEARTBEAT.name, bytes.fromhex(event["data"]), origin)
            assert isinstance(verified.message, wire.Heartbeat)
            assert verified.signer == node.identity.address


async def test_a_node_takes_a_js_peers_gossip_and_refuses_its_malformed_gossip(
    tmp_path: Path,
) -> None:
    async with (
        running_node(fast_p2p(make_home(tmp_path / "node"))) as node,
        running_js_peer(
            node.p2p.listen_addrs()[0], [HEARTBEAT.name], key_type="secp256k1", log_dir=tmp_path
        ) as js,
    ):
        network = node.config.p2p.network_id
        await node_subscribed(js, node)
        await js.publish_signed_to(
            node.p2p.peer_id, network, HEARTBEAT.name, js_heartbeat(0, "js-libp2p")
        )
        await wait_for(
            lambda: js_version(node, js) == "js-libp2p", 15, "the node takes the js heartbeat"
        )
        record = node.p2p.peers.get(js.peer_id)
        assert record is not None
        assert record.state is PeerState.UP
        assert record.models == ["js-model"]
        assert record.address == address_of_peer(ID.from_base58(js.peer_id).to_bytes())
        assert node.p2p.scorer.score(js.peer_id) == 0

        await js.publish_raw(HEARTBEAT.name, b"\xc1 not msgpack")
        await wait_for(lambda: rejected(node, "malformed") >= 1, 15, "the node refuses garbage")
        # Well-formed and signed by the js peer, but for another JoyNet network.
        await js.publish_signed("othernet", HEARTBEAT.name, js_heartbeat(1, "replayed"))
        await wait_for(
            lambda: rejected(node, "wrong_network") >= 1, 15, "the node refuses another network's"
        )
        assert js_version(node, js) == "js-libp2p"
        assert node.p2p.scorer.score(js.peer_id) < 0
        assert not node.p2p.scorer.is_banned(js.peer_id)

        # The node keeps running and gossiping with the js peer both ways.
        heard = len(js.find("message", from_node(node)))
        await wait_for(
            lambda: len(js.find("message", from_node(node))) > heard, 15, "heartbeats go on"
        )
        await js.publish_signed(network, HEARTBEAT.name, js_heartbeat(2, "js-libp2p-2"))
        await wait_for(
            lambda: js_version(node, js) == "js-libp2p-2", 15, "the next good one is taken"
        )
