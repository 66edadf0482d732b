"""Answers kept in memory, least recently used first out, within a byte budget."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

OVERHEAD = 96  # bytes an entry costs beside its key and answer (dict slot, tuple, ints)


@dataclass
class CacheStatistics:
    entries: int
    bytes: int
    hits: int
    misses: int
    evictions: int


class AnswerCache:
    """Encoded JSON results by key (chain id, method, canonical params)."""

    def __init__(self, max_bytes: int) -> None:
        self._max = max_bytes
        self._entries: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self._hits = self._misses = self._evictions = 0

    def get(self, key: str) -> bytes | None:
        found = self._entries.get(key)
        if found is None:
            self._misses += 1
            return None
        self._entries.move_to_end(key)
        self._hits += 1
        return found

    def put(self, key: str, answer: bytes) -> None:
        size = len(key) + len(answer) + OVERHEAD
        if size > self._max // 8:
            return  # one answer may not crowd out the rest
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= len(key) + len(old) + OVERHEAD
        self._entries[key] = answer
        self._bytes += size
        while self._bytes > self._max:
            gone_key, gone = self._entries.popitem(last=False)
            self._bytes -= len(gone_key) + len(gone) + OVERHEAD
            self._evictions += 1

    def statistics(self) -> CacheStatistics:
        return CacheStatistics(
            len(self._entries), self._bytes, self._hits, self._misses, self._evictions
        )
