"""The pure parts of the p2p layer, with injected clocks and in-memory streams."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st
from libp2p.peer.id import ID
from libp2p.transport.tcp.tcp import TCPListener

from joynode import wire
from joynode.keys import NodeKey
from joynode.p2p import gossip, libp2p_compat, rpc
from joynode.p2p.gossip import HEARTBEAT, TOPICS, GossipRejected, GossipSigner, GossipVerifier
from joynode.p2p.peers import PeerState, PeerTable
from joynode.p2p.scoring import Offence, PeerScorer
from joynode.ratelimit import TokenBucket
from joynode.signatures import SignatureError, digest, recover_address, sign

BEAT = wire.Heartbeat(1, "0.1.0", 2, ["/ip4/127.0.0.1/tcp/1"], ["tiny"], 0, 4)
NETWORK = "testnet"


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def ms(self) -> int:
        return int(self.now * 1000)


def origin_of(key: NodeKey) -> bytes:
    return bytes(ID.from_base58(key.peer_id).to_bytes())


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def verifier(clock: Clock) -> GossipVerifier:
    return GossipVerifier(
        TOPICS, network=NETWORK, max_bytes=4096, replay_window_s=60, clock_ms=clock.ms
    )


def test_valid_gossip_is_verified_once(clock: Clock, verifier: GossipVerifier) -> None:
    key = NodeKey.generate()
    payload = GossipSigner(key, NETWORK, clock.ms).seal(HEARTBEAT, BEAT)
    verified = verifier.verify(HEARTBEAT.name, payload, origin_of(key))
    assert verified.message == BEAT
    assert verified.signer == key.address
    with pytest.raises(GossipRejected) as again:
        verifier.verify(HEARTBEAT.name, payload, origin_of(key))
    assert again.value.reason == "duplicate"


def reason(verifier: GossipVerifier, topic: str, payload: bytes, origin: bytes) -> str:
    with pytest.raises(GossipRejected) as info:
        verifier.verify(topic, payload, origin)
    return info.value.reason


def test_forgeries_are_rejected_with_a_reason(clock: Clock, verifier: GossipVerifier) -> None:
    key, other = NodeKey.generate(), NodeKey.generate()
    signer = GossipSigner(key, NETWORK, clock.ms)
    payload = signer.seal(HEARTBEAT, BEAT)
    envelope = wire.decode(payload)
    assert isinstance(envelope, wire.Gossip)

    def with_(**changes: object) -> bytes:
        fields = {f: getattr(envelope, f) for f in envelope.__struct_fields__}
        return wire.encode(wire.Gossip(**{**fields, **changes}))

    bad_sig = bytes([envelope.signature[0] ^ 1]) + envelope.signature[1:]
    assert reason(verifier, HEARTBEAT.name, with_(signature=bad_sig), origin_of(key)) in {
        "bad_signature",
        "wrong_signer",
    }
    assert reason(verifier, HEARTBEAT.name, payload, origin_of(other)) == "wrong_signer"
    assert reason(verifier, HEARTBEAT.name, b"\x93garbage", origin_of(key)) == "malformed"
    assert reason(verifier, HEARTBEAT.name, b"x" * 5000, origin_of(key)) == "oversize"
    assert reason(verifier, "joynet/2/other", payload, origin_of(key)) == "unknown_topic"
    moved = with_(topic="joynet/2/elsewhere")
    assert reason(verifier, HEARTBEAT.name, moved, origin_of(key)) == "wrong_topic"
    redated = with_(sent_ms=envelope.sent_ms + 1)
    assert reason(verifier, HEARTBEAT.name, redated, origin_of(key)) == "wrong_signer"
    not_gossip = wire.encode(wire.Ping(1))
    assert reason(verifier, HEARTBEAT.name, not_gossip, origin_of(key)) == "malformed"
    clock.now += 61
    assert reason(verifier, HEARTBEAT.name, payload, origin_of(key)) == "stale"


def test_gossip_signed_for_another_network_is_refused(
    clock: Clock, verifier: GossipVerifier
) -> None:
    """A message of one JoyNet network cannot be replayed on another, even within the window."""
    key = NodeKey.generate()
    elsewhere = GossipSigner(key, "othernet", clock.ms).seal(HEARTBEAT, BEAT)
    assert reason(verifier, HEARTBEAT.name, elsewhere, origin_of(key)) == "wrong_network"
    # Relabelled for our network, its signature no longer recovers to the origin.
    envelope = wire.decode(elsewhere)
    assert isinstance(envelope, wire.Gossip)
    relabelled = wire.encode(
        wire.Gossip(NETWORK, envelope.topic, envelope.sent_ms, envelope.body, envelope.signature)
    )
    assert reason(verifier, HEARTBEAT.name, relabelled, origin_of(key)) == "wrong_signer"
    # The same message signed for our network is accepted.
    ours = GossipSigner(key, NETWORK, clock.ms).seal(HEARTBEAT, BEAT)
    assert verifier.verify(HEARTBEAT.name, ours, origin_of(key)).message == BEAT


def test_message_type_must_fit_the_topic(clock: Clock, verifier: GossipVerifier) -> None:
    key = NodeKey.generate()
    with pytest.raises(ValueError, match="not allowed"):
        GossipSigner(key, NETWORK, clock.ms).seal(HEARTBEAT, wire.Ping(1))
    # A peer that bypasses our signer still gets rejected.
    body = wire.encode(wire.Ping(1))
    sent = clock.ms()
    signature = sign(key, gossip._signing_digest(NETWORK, HEARTBEAT.name, sent, body))
    payload = wire.encode(wire.Gossip(NETWORK, HEARTBEAT.name, sent, body, signature))
    assert reason(verifier, HEARTBEAT.name, payload, origin_of(key)) == "unexpected_type"


def test_replay_cache_forgets_after_the_window(clock: Clock, verifier: GossipVerifier) -> None:
    key = NodeKey.generate()
    signer = GossipSigner(key, NETWORK, clock.ms)
    first = signer.seal(HEARTBEAT, BEAT)
    verifier.verify(HEARTBEAT.name, first, origin_of(key))
    clock.now += 61
    verifier.verify(HEARTBEAT.name, signer.seal(HEARTBEAT, BEAT), origin_of(key))
    assert first not in verifier._seen  # expired entries are dropped, memory stays bounded
    assert len(verifier._seen) == 1


@given(st.binary(max_size=600))
def test_verifier_rejects_random_payloads_with_a_reason(data: bytes) -> None:
    verifier = GossipVerifier(TOPICS, network=NETWORK, max_bytes=512, replay_window_s=60)
    with pytest.raises(GossipRejected):
        verifier.verify(HEARTBEAT.name, data, origin_of(NodeKey.generate()))


def test_token_bucket() -> None:
    bucket = TokenBucket(rate=2, burst=3, now=0)
    assert [bucket.take(0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0.5)
    assert not bucket.take(0.5)


def scorer(clock: Clock) -> PeerScorer:
    return PeerScorer(
        ban_score=-100,
        ban_s=300,
        gossip_rate=1,
        gossip_burst=2,
        rpc_rate=1,
        rpc_burst=1,
        half_life_s=60,
        clock=clock,
    )


def test_offences_ban_and_bans_expire(clock: Clock) -> None:
    s = scorer(clock)
    results = [s.penalize("p", Offence.INVALID_GOSSIP) for _ in range(5)]
    assert results == [False, False, False, False, True]
    assert s.is_banned("p")
    assert not s.penalize("p", Offence.INVALID_GOSSIP)  # no double ban
    clock.now += 301
    assert not s.is_banned("p")
    # A second offence streak bans sooner: it starts from half the threshold.
    assert s.score("p") < -40
    assert [s.penalize("p", Offence.INVALID_GOSSIP) for _ in range(3)][-1] is True


def test_scores_recover_over_time(clock: Clock) -> None:
    s = scorer(clock)
    s.penalize("p", Offence.INVALID_GOSSIP)
    clock.now += 60
    assert s.score("p") == pytest.approx(-10, abs=0.01)
    assert s.score("q") == 0


def test_rate_limits_are_per_peer_and_kind(clock: Clock) -> None:
    s = scorer(clock)
    assert [s.allow_gossip("p") for _ in range(3)] == [True, True, False]
    assert s.allow_gossip("q")
    assert s.allow_request("p")
    assert not s.allow_request("p")
    clock.now += 1
    assert s.allow_gossip("p")


def test_peer_table_lifecycle(clock: Clock) -> None:
    table = PeerTable(timeout_s=10, clock=clock)
    table.discovered("p", "0xA", ["/ip4/127.0.0.1/tcp/1"])
    assert table.get("p") is not None
    assert table.counts()[PeerState.DISCOVERED] == 1
    up = table.heartbeat("p", "0xA", BEAT, sent_ms=1_000)
    assert up is not None
    assert up.state is PeerState.UP
    assert table.heartbeat("p", "0xA", BEAT, sent_ms=1_000) is None  # a late duplicate
    assert table.heartbeat("p", "0xA", BEAT, sent_ms=999) is None  # an older one
    clock.now += 11
    down = table.sweep()
    assert [t.state for t in down] == [PeerState.DOWN]
    restarted = wire.Heartbeat(0, "0.1.0", 1, [], [], 0, 0)  # seq starts at 0 again
    assert table.heartbeat("p", "0xA", restarted, sent_ms=12_000) is not None
    # Even while it still counts as up, a restarted peer's beats are taken.
    assert table.heartbeat("p", "0xA", restarted, sent_ms=13_000) is None  # no transition
    record = table.get("p")
    assert record is not None
    assert record.heartbeat_sent_ms == 13_000


async def test_rpc_framing_over_a_memory_stream() -> None:
    left, right = trio.testing.memory_stream_pair()

    class Stream:
        def __init__(self, s: trio.abc.Stream) -> None:
            self.s = s

        async def read(self, n: int | None = None) -> bytes:
            return bytes(await self.s.receive_some(min(n or 65536, 3)))  # short reads on purpose

        async def write(self, data: bytes) -> None:
            await self.s.send_all(data)

    await rpc.write_frame(Stream(left), wire.Ping(42))
    assert await rpc.read_frame(Stream(right), 1024) == wire.Ping(42)
    await rpc.write_frame(Stream(left), wire.ErrorReply(1, "x" * 500))
    with pytest.raises(rpc.RpcFailure, match="exceeds the cap"):
        await rpc.read_frame(Stream(right), 100)
    short_left, short_right = trio.testing.memory_stream_pair()
    await short_left.send_all(b"\x00\x00\x01\x00abc")  # promises 256 bytes, sends 3
    await short_left.aclose()
    with pytest.raises(rpc.RpcFailure, match="stream ended 3 bytes into a 256-byte read"):
        await rpc.read_frame(Stream(short_right), 1024)


def test_high_s_twin_of_a_signature_is_refused() -> None:
    key = NodeKey.generate()
    message = digest(b"test", b"hello")
    signature = sign(key, message)
    assert recover_address(message, signature) == key.address
    order = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
    s = int.from_bytes(signature[32:64], "big")
    twin = signature[:32] + (order - s).to_bytes(32, "big") + bytes([55 - signature[64]])
    with pytest.raises(SignatureError, match="upper half"):
        recover_address(message, twin)


async def test_a_closing_listener_reports_only_its_open_sockets() -> None:
    """libp2p_compat item 15: a pubsub task asking a closing host for its addresses."""
    assert TCPListener.get_addrs.__module__ == libp2p_compat.__name__
    open_socket, closed_socket = trio.socket.socket(), trio.socket.socket()
    for s in (open_socket, closed_socket):
        await s.bind(("127.0.0.1", 0))
        s.listen()
    closed_socket.close()
    listener = SimpleNamespace(
        listeners=[SimpleNamespace(socket=closed_socket), SimpleNamespace(socket=open_socket)]
    )
    with open_socket:
        port = open_socket.getsockname()[1]
        addrs = TCPListener.get_addrs(listener)  # type: ignore[arg-type]
    assert [str(a) for a in addrs] == [f"/ip4/127.0.0.1/tcp/{port}"]


def test_peer_table_finds_an_up_peer_by_address() -> None:
    table = PeerTable(60.0)
    key = NodeKey.generate()
    assert table.up_peer_of(key.address) is None
    table.heard("peer-1", key.address)
    assert table.up_peer_of(key.address.lower()) == "peer-1"
