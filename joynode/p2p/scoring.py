"""Abuse control: per-peer rate limits and a score that bans misbehaving peers.

A peer's score starts at 0, drops with every invalid message or request and
every message over its rate, and recovers toward 0 over time (it halves every
``half_life_s``). A peer whose score falls to the ban threshold is banned for a
cool-down period: disconnected, its gossip ignored, new connections refused.
When the ban ends the peer starts again from half the threshold, so a second
offence bans it sooner.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from joynode.ratelimit import TokenBucket


class Offence(enum.Enum):
    """What a peer did wrong; ``cost`` is what it takes off the peer's score."""

    INVALID_GOSSIP = "invalid_gossip"
    INVALID_REQUEST = "invalid_request"
    RATE_LIMITED = "rate_limited"
    BAD_BLOCK = "bad_block"  # served bytes that do not hash to the CID asked for
    REFUSED_OUTPUT = "refused_output"  # claimed an inference output this node's check refused
    OUTVOTED = "outvoted"  # revealed an output against the certified majority
    WRONG_CHAIN_ANSWER = "wrong_chain_answer"  # a chain RPC answer that failed its check

    @property
    def cost(self) -> float:
        return _OFFENCE_COST[self]


_OFFENCE_COST = {
    Offence.INVALID_GOSSIP: 20.0,
    Offence.INVALID_REQUEST: 20.0,
    Offence.RATE_LIMITED: 2.0,
    Offence.BAD_BLOCK: 50.0,
    Offence.REFUSED_OUTPUT: 30.0,
    Offence.OUTVOTED: 15.0,
    Offence.WRONG_CHAIN_ANSWER: 50.0,
}


@dataclass
class PeerStanding:
    score: float = 0.0
    updated: float = 0.0
    banned_until: float = 0.0
    offences: dict[str, int] = field(default_factory=dict)


class PeerScorer:
    """Scores, rate buckets and bans for every peer; pure bookkeeping, no I/O."""

    def __init__(
        self,
        *,
        ban_score: float,
        ban_s: float,
        gossip_rate: float,
        gossip_burst: int,
        rpc_rate: float,
        rpc_burst: int,
        half_life_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ban_score = ban_score
        self.ban_s = ban_s
        self._gossip = (gossip_rate, gossip_burst)
        self._rpc = (rpc_rate, rpc_burst)
        self._decay = math.log(2) / half_life_s
        self._clock = clock
        self._standing: dict[str, PeerStanding] = {}
        self._buckets: dict[tuple[str, str], TokenBucket] = {}

    def _get(self, peer: str) -> PeerStanding:
        now = self._clock()
        standing = self._standing.setdefault(peer, PeerStanding(updated=now))
        # Scores stand still during a ban and recover only once it is over.
        since = max(standing.updated, min(standing.banned_until, now))
        standing.score *= math.exp(-self._decay * (now - since))
        standing.updated = now
        return standing

    def score(self, peer: str) -> float:
        return self._get(peer).score

    def is_banned(self, peer: str) -> bool:
        standing = self._standing.get(peer)
        return standing is not None and standing.banned_until > self._clock()

    def penalize(self, peer: str, offence: Offence) -> bool:
        """Record ``offence``; return True if this pushed the peer into a ban."""
        standing = self._get(peer)
        standing.offences[offence.name.lower()] = standing.offences.get(offence.name.lower(), 0) + 1
        if self.is_banned(peer):
            return False
        standing.score -= offence.cost
        if standing.score > self.ban_score:
            return False
        standing.banned_until = self._clock() + self.ban_s
        standing.score = self.ban_score / 2
        return True

    def allow_gossip(self, peer: str) -> bool:
        return self._take(peer, "gossip", self._gossip)

    def allow_request(self, peer: str) -> bool:
        return self._take(peer, "rpc", self._rpc)

    def _take(self, peer: str, kind: str, limits: tuple[float, int]) -> bool:
        now = self._clock()
        bucket = self._buckets.get((peer, kind))
        if bucket is None:
            bucket = self._buckets[(peer, kind)] = TokenBucket(*limits, now=now)
        return bucket.take(now)

    def snapshot(self) -> dict[str, dict[str, object]]:
        now = self._clock()
        return {
            peer: {
                "score": round(self._get(peer).score, 2),
                "banned_for_s": round(max(0.0, s.banned_until - now), 1),
                "offences": dict(s.offences),
            }
            for peer, s in list(self._standing.items())
        }

    def forget_idle(self, peers_to_keep: set[str]) -> None:
        """Drop state of peers that are gone, not banned, and back near 0."""
        for peer in list(self._standing):
            if peer not in peers_to_keep and not self.is_banned(peer) and abs(self.score(peer)) < 1:
                del self._standing[peer]
                self._buckets.pop((peer, "gossip"), None)
                self._buckets.pop((peer, "rpc"), None)
