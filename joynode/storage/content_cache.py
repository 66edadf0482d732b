"""What the ``/ipfs`` gateway fetched for its clients: kept unpinned, least recently used
first to go, within ``storage.gateway_cache_mib`` and the store's quota.

Pins are the operator's; this cache is the gateway's. It never removes a pinned block:
an eviction is a garbage collection that spares the pins and the roots still cached.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import trio

from joynode.storage.cid import Cid
from joynode.storage.errors import QuotaReached

# Above this share of the quota, cached content goes before a fetch could fail for room.
QUOTA_HIGH_WATER = 0.9


@dataclass(frozen=True, slots=True)
class ContentCacheStatistics:
    roots: int
    bytes: int
    budget_bytes: int
    hits: int
    fetches: int
    evicted_roots: int


class ContentCache:
    """``fetch(root)`` makes a DAG local without pinning it; ``sweep(spare)`` removes every
    unpinned block outside ``spare``; ``stored()`` is the store's (bytes, quota)."""

    def __init__(
        self,
        budget_bytes: int,
        fetch: Callable[[Cid], Awaitable[object]],
        sweep: Callable[[Sequence[Cid]], Awaitable[object]],
        stored: Callable[[], tuple[int, int]],
    ) -> None:
        self._budget = budget_bytes
        self._fetch = fetch
        self._sweep = sweep
        self._stored = stored
        self._roots: OrderedDict[Cid, int] = OrderedDict()  # oldest use first: root -> bytes
        self._trimming = trio.Lock()
        self._hits = self._fetches = self._evicted = 0

    def touch(self, root: Cid) -> None:
        """``root`` was served from the store: it is the most recently used."""
        if root in self._roots:
            self._roots.move_to_end(root)
            self._hits += 1

    async def fetch(self, root: Cid) -> None:
        """Fetch ``root`` from peers and keep it; when the store is full, drop the whole
        cache and try once more."""
        before, _ = self._stored()
        try:
            await self._fetch(root)
        except QuotaReached:
            await self._drop(len(self._roots))
            before, _ = self._stored()
            await self._fetch(root)
        after, _ = self._stored()
        self._fetches += 1
        self._roots[root] = max(self._roots.get(root, 0), after - before)
        self._roots.move_to_end(root)
        await self._trim()

    def forget(self) -> None:
        """The store was collected without sparing the cache (``storage.gc``)."""
        self._roots.clear()

    async def _trim(self) -> None:
        """Drop the least recently used roots until the cache fits its budget and the
        store is below its high-water mark."""
        async with self._trimming:
            used, quota = self._stored()
            cached = sum(self._roots.values())
            over_quota = max(0, used - int(quota * QUOTA_HIGH_WATER)) if quota else 0
            excess = max(cached - self._budget, over_quota)
            drop = freed = 0
            for size in self._roots.values():
                if freed >= excess or drop == len(self._roots) - 1:
                    break  # the root just fetched stays: a client is waiting for it
                drop += 1
                freed += size
            if excess > 0 and drop:
                await self._drop(drop)

    async def _drop(self, count: int) -> None:
        for _ in range(count):
            self._roots.popitem(last=False)
            self._evicted += 1
        await self._sweep(list(self._roots))

    def statistics(self) -> ContentCacheStatistics:
        return ContentCacheStatistics(
            len(self._roots),
            sum(self._roots.values()),
            self._budget,
            self._hits,
            self._fetches,
            self._evicted,
        )
