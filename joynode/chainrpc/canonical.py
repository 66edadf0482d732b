"""The chain's recent blocks as most upstreams see them: hashes by number, chained by hash.

A block that hashes to its hash can still be a block of the liar's own making, with a
hash of its own. ``CanonicalWindow`` closes that for the last ``depth`` blocks: every
head poll, each upstream's latest block (checked against its hash) is a vote; the head
most upstreams agree on (the highest, on a tie) is taken, and its ancestors are filled in
by ``parentHash``, each fetched by hash and checked against it, so one honest majority
head fixes every hash below it. A block answered by number inside the window must then
have the window's hash; one below it is checked against its own hash only. With a single
upstream the majority is that upstream (nothing to compare it with): the window then
guards against nothing but a change of mind, which is still a reorg to follow.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from joynode.chainrpc import methods
from joynode.chainrpc.integrity import Forged, check_block

Header = dict[str, Any]
FetchByHash = Callable[[str], Awaitable[Header | None]]


class CanonicalWindow:
    def __init__(self, depth: int = 128, fetches_per_poll: int = 32) -> None:
        self.depth = depth
        self._budget = fetches_per_poll
        self._hashes: dict[int, str] = {}  # number -> hash, lower case; contiguous
        self._parents: dict[int, str] = {}  # number -> its parentHash
        self.head: int | None = None
        self.reorgs = 0

    def hash_at(self, number: int) -> str | None:
        return self._hashes.get(number)

    async def follow(self, latest: list[Header], fetch: FetchByHash) -> None:
        """Take the head most of ``latest`` (each upstream's latest block, already checked
        against its hash) agree on; chain down from it to the blocks already known
        (replacing what a reorg replaced), then extend the window down, at most
        ``fetches_per_poll`` headers a poll. A parent that cannot be fetched ends the
        poll's walk; the next one goes on."""
        votes = Counter(
            (methods.quantity(b.get("number")), str(b.get("hash")).lower()) for b in latest
        )
        if not votes:
            return
        (number, head_hash), _ = max(votes.items(), key=lambda item: (item[1], item[0][0] or -1))
        if number is None:
            return
        block = next(b for b in latest if str(b.get("hash")).lower() == head_hash)
        for stale in [n for n in self._hashes if n > number or n <= number - self.depth]:
            self._forget(stale)
        self.head = number
        budget = self._budget
        at = number
        while True:  # 1. down from the head to where it meets the known chain
            known = self._hashes.get(at)
            here = str(block.get("hash")).lower()
            if known == here:
                break
            if known is not None:
                self.reorgs += 1
            self._hashes[at] = here
            self._parents[at] = str(block.get("parentHash", "")).lower()
            below = self._hashes.get(at - 1)
            if at == 0 or below == self._parents[at]:
                break  # it meets the known chain
            if below is None and not any(n < at for n in self._hashes):
                break  # nothing known below: step 2 fills the window
            if budget == 0:  # a deep reorg: what lies below is not known to chain here
                self._forget_below(at)
                break
            parent = await self._fetch(fetch, self._parents[at])
            budget -= 1
            if parent is None:
                self._forget_below(at)
                break
            block, at = parent, at - 1
        low = min(self._hashes)
        while budget > 0 and low > max(0, number - self.depth + 1):  # 2. the window down
            parent = await self._fetch(fetch, self._parents[low])
            budget -= 1
            if parent is None:
                return
            low -= 1
            self._hashes[low] = self._parents[low + 1]
            self._parents[low] = str(parent.get("parentHash", "")).lower()

    async def _fetch(self, fetch: FetchByHash, block_hash: str) -> Header | None:
        """The block of ``block_hash``, checked to be it (``Forged`` if not)."""
        block = await fetch(block_hash)
        if block is None:
            return None
        check_block(block)
        if str(block.get("hash")).lower() != block_hash:
            raise Forged(f"asked for block {block_hash}, sent {block.get('hash')}")
        return block

    def _forget_below(self, number: int) -> None:
        for lower in [n for n in self._hashes if n < number]:
            self._forget(lower)

    def _forget(self, number: int) -> None:
        self._hashes.pop(number, None)
        self._parents.pop(number, None)

    def check(self, block: Any) -> None:
        """``Forged`` if ``block`` (hashed right) is not the window's block at its number."""
        if not isinstance(block, dict):
            return
        number = methods.quantity(block.get("number"))
        known = None if number is None else self._hashes.get(number)
        if known is not None and str(block.get("hash")).lower() != known:
            raise Forged(
                f"block {number}: {block.get('hash')} is not the block most upstreams chain to"
            )
