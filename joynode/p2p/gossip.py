"""Signed gossip: sealing our messages and verifying everyone else's.

Every gossip payload is a ``wire.Gossip`` envelope signed by the origin's node
key. ``GossipVerifier`` is the topic validator: it accepts a payload only if it
fits the size cap, decodes strictly, was signed for this node's network and
for the topic it arrived on, is fresh,
was signed by the peer that originated it (the signer's address equals the
address embedded in the origin's peer id), has not been seen before within the
replay window, and carries a message type the topic allows. It is pure (no
I/O, injectable clock) so it is tested without a network.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass

from joynode import wire
from joynode.keys import NodeKey
from joynode.signatures import SignatureError, address_of_peer, digest, recover_address, sign

# Gossip protocol 2: the network id joined the signed digest. The version is in
# the topic names and the digest's domain, so protocol 1 nodes, which cannot
# verify protocol 2 signatures, are on other topics and never penalised for it.
GOSSIP_PROTOCOL = 2
GOSSIP_DOMAIN = f"joynet/{GOSSIP_PROTOCOL}/gossip".encode()


@dataclass(frozen=True)
class Topic:
    name: str
    accepts: tuple[type[wire.Message], ...]


HEARTBEAT = Topic(f"joynet/{GOSSIP_PROTOCOL}/heartbeat", (wire.Heartbeat,))
JOBS = Topic(f"joynet/{GOSSIP_PROTOCOL}/jobs", (wire.JobOffer,))
VOTES = Topic(
    f"joynet/{GOSSIP_PROTOCOL}/votes",
    (wire.VoteCommit, wire.VoteReveal, wire.ClaimRefusal, wire.JobCancel, wire.RunRefusal),
)
ZK_JOBS = Topic(f"joynet/{GOSSIP_PROTOCOL}/zk", (wire.ZkJob,))
TOPICS: dict[str, Topic] = {topic.name: topic for topic in (HEARTBEAT, JOBS, VOTES, ZK_JOBS)}


@dataclass(frozen=True)
class VerifiedGossip:
    topic: str
    message: wire.AnyMessage
    origin: bytes
    signer: str
    sent_ms: int


class GossipRejected(Exception):
    """A payload that failed verification; ``reason`` is a short metric label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _signing_digest(network: str, topic: str, sent_ms: int, body: bytes) -> bytes:
    return digest(GOSSIP_DOMAIN, network.encode(), topic.encode(), sent_ms.to_bytes(8, "big"), body)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class GossipSigner:
    def __init__(self, key: NodeKey, network: str, clock_ms: Callable[[], int] = _now_ms) -> None:
        self._key = key
        self._network = network
        self._clock_ms = clock_ms

    def seal(self, topic: Topic, message: wire.Message) -> bytes:
        if not isinstance(message, topic.accepts):
            raise ValueError(f"{type(message).__name__} is not allowed on {topic.name}")
        body = wire.encode(message)
        sent_ms = self._clock_ms()
        signature = sign(self._key, _signing_digest(self._network, topic.name, sent_ms, body))
        return wire.encode(wire.Gossip(self._network, topic.name, sent_ms, body, signature))


class GossipVerifier:
    def __init__(
        self,
        topics: dict[str, Topic],
        *,
        network: str,
        max_bytes: int,
        replay_window_s: float,
        clock_ms: Callable[[], int] = _now_ms,
    ) -> None:
        self._topics = topics
        self._network = network
        self._max_bytes = max_bytes
        self._window_ms = int(replay_window_s * 1000)
        self._clock_ms = clock_ms
        self._seen: set[bytes] = set()
        self._expiry: collections.deque[tuple[int, bytes]] = collections.deque()

    def verify(self, topic_name: str, data: bytes, origin: bytes) -> VerifiedGossip:
        topic = self._topics.get(topic_name)
        if topic is None:
            raise GossipRejected("unknown_topic", topic_name)
        if len(data) > self._max_bytes:
            raise GossipRejected("oversize", f"{len(data)} bytes > {self._max_bytes}")
        try:
            envelope = wire.decode(data, self._max_bytes)
        except wire.WireError as exc:
            raise GossipRejected("malformed", exc.reason) from None
        if not isinstance(envelope, wire.Gossip):
            raise GossipRejected("malformed", f"{type(envelope).__name__} is not a gossip envelope")
        if envelope.network != self._network:
            raise GossipRejected("wrong_network", f"signed for {envelope.network!r}")
        if envelope.topic != topic_name:
            raise GossipRejected("wrong_topic", f"signed for {envelope.topic!r}")
        now = self._clock_ms()
        if abs(now - envelope.sent_ms) > self._window_ms:
            raise GossipRejected("stale", f"sent {now - envelope.sent_ms} ms ago")
        try:
            signer = recover_address(
                _signing_digest(envelope.network, envelope.topic, envelope.sent_ms, envelope.body),
                envelope.signature,
            )
        except SignatureError as exc:
            raise GossipRejected("bad_signature", str(exc)) from None
        origin_address = address_of_peer(origin)
        if origin_address is None:
            raise GossipRejected("wrong_signer", "origin is not a secp256k1 peer")
        if signer != origin_address:
            raise GossipRejected("wrong_signer", f"signed by {signer}, sent by {origin_address}")
        self._expire(now)
        if envelope.signature in self._seen:
            raise GossipRejected("duplicate")
        try:
            message = wire.decode(envelope.body, self._max_bytes)
        except wire.WireError as exc:
            raise GossipRejected("malformed", exc.reason) from None
        if not isinstance(message, topic.accepts):
            raise GossipRejected("unexpected_type", type(message).__name__)
        self._seen.add(envelope.signature)
        self._expiry.append((envelope.sent_ms + self._window_ms, envelope.signature))
        return VerifiedGossip(topic_name, message, origin, signer, envelope.sent_ms)

    def _expire(self, now: int) -> None:
        # sent_ms may be up to a window in the future, so expiries are not
        # strictly ordered; an entry kept a little longer is harmless.
        while self._expiry and self._expiry[0][0] < now:
            self._seen.discard(self._expiry.popleft()[1])
