"""A token bucket: what the p2p actor limits peers with, and the gateways their clients."""

from __future__ import annotations


class TokenBucket:
    """``rate`` events per second on average, up to ``burst`` at once."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._tokens = float(burst)
        self._updated = now

    def take(self, now: float, cost: float = 1.0) -> bool:
        """Take ``cost`` events' worth if the bucket holds them."""
        self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now
        if self._tokens >= cost:
            self._tokens -= cost
            return True
        return False
