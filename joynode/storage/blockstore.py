"""Blocks on disk, one file per block, laid out like kubo's flatfs.

A block lives at ``blocks/XY/<base32 multihash>.data`` (``XY`` = the key's
next-to-last two characters), keyed by multihash so a CIDv0 and a CIDv1 of
the same bytes share one file. Writes go to a temporary file that is then
linked into place, so a crash never leaves a partial block under a real name; every
read is checked against its hash (as kubo's ``HashOnRead``), so a block
damaged on disk is dropped and fetched again rather than served.

The methods block on disk: call them from worker threads (``trio.to_thread``).
They are safe to call from several threads at once.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from joynode.storage.cid import Cid

log = logging.getLogger(__name__)

SUFFIX = ".data"
TEMPORARY = ".tmp-"


class BlockNotFound(KeyError):
    """The store does not hold that block."""


class StoreFull(Exception):
    """Storing the block would exceed the configured quota."""


@dataclass(frozen=True, slots=True)
class BlockstoreStatistics:
    blocks: int
    bytes: int
    quota_bytes: int
    puts: int
    gets: int
    corrupt_dropped: int


class Blockstore:
    def __init__(self, root: Path, quota_bytes: int) -> None:
        self.root = root
        self.quota_bytes = quota_bytes
        self._lock = threading.Lock()
        self._blocks = 0
        self._bytes = 0
        self._puts = 0
        self._gets = 0
        self._corrupt = 0
        self._shards: set[str] = set()  # shard folders known to exist (saves a mkdir per put)

    def open(self) -> None:
        """Create the folder, drop leftover temporary files and count what is there."""
        self.root.mkdir(parents=True, exist_ok=True)
        blocks = total = 0
        for shard in os.scandir(self.root):
            if not shard.is_dir():
                continue
            self._shards.add(shard.name)
            for entry in os.scandir(shard.path):
                if entry.name.startswith(TEMPORARY):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                elif entry.name.endswith(SUFFIX):
                    blocks += 1
                    total += entry.stat().st_size
        with self._lock:
            self._blocks, self._bytes = blocks, total

    def _path(self, multihash: bytes) -> Path:
        key = base64.b32encode(multihash).decode().rstrip("=")
        return self.root / key[-3:-1] / (key + SUFFIX)

    def has(self, cid: Cid) -> bool:
        return self._path(cid.multihash).exists()

    def put(self, cid: Cid, data: bytes | memoryview) -> bool:
        """Store ``data`` under ``cid`` (which it must match); False if it was already there."""
        path = self._path(cid.multihash)
        if path.exists():
            return False
        with self._lock:
            if self.quota_bytes and self._bytes + len(data) > self.quota_bytes:
                raise StoreFull(
                    f"the block store is full ({self._bytes} of {self.quota_bytes} bytes "
                    "used); unpin and run storage.gc, or raise storage.quota_gib"
                )
        if path.parent.name not in self._shards:
            path.parent.mkdir(exist_ok=True)
            self._shards.add(path.parent.name)
        temporary = path.parent / f"{TEMPORARY}{os.getpid()}-{threading.get_ident()}"
        with temporary.open("wb") as handle:
            handle.write(data)
        try:
            # link, unlike rename, never replaces: of two threads putting the
            # same block, exactly one creates it (and counts it).
            os.link(temporary, path)
        except FileExistsError:
            return False
        finally:
            os.unlink(temporary)
        with self._lock:
            self._blocks += 1
            self._bytes += len(data)
            self._puts += 1
        return True

    def get(self, cid: Cid) -> bytes:
        """The block's bytes, checked against its hash."""
        path = self._path(cid.multihash)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BlockNotFound(str(cid)) from None
        with self._lock:
            self._gets += 1
        if not cid.matches(data):
            log.error("block %s is damaged on disk; dropping it", cid)
            self._unlink(path)
            with self._lock:
                self._corrupt += 1
            raise BlockNotFound(str(cid))
        return data

    def delete(self, multihash: bytes) -> int | None:
        """Remove a block; the bytes freed, or None if it was not there."""
        return self._unlink(self._path(multihash))

    def _unlink(self, path: Path) -> int | None:
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return None
        with self._lock:
            self._blocks -= 1
            self._bytes -= size
        return size

    def all_multihashes(self) -> Iterator[bytes]:
        """The multihash of every stored block (what the store is keyed by)."""
        for shard in os.scandir(self.root):
            if not shard.is_dir():
                continue
            for entry in os.scandir(shard.path):
                if entry.name.startswith(TEMPORARY) or not entry.name.endswith(SUFFIX):
                    continue
                key = entry.name[: -len(SUFFIX)]
                try:
                    yield base64.b32decode(key + "=" * (-len(key) % 8))
                except ValueError:
                    log.warning("ignoring a stray file in the block store: %s", entry.path)

    def statistics(self) -> BlockstoreStatistics:
        with self._lock:
            return BlockstoreStatistics(
                self._blocks, self._bytes, self.quota_bytes, self._puts, self._gets, self._corrupt
            )
