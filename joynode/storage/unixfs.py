"""UnixFS over dag-pb, built exactly as kubo's ``ipfs add`` builds it.

Files are cut into 256 KiB chunks and laid out as kubo's *balanced* DAG: every
leaf at the same depth, at most 174 links per node, each link's ``Tsize`` the
cumulative size of the subtree. With CIDv0 (the default) leaves are dag-pb
UnixFS ``File`` nodes; with CIDv1 they are raw blocks, as
``ipfs add --cid-version=1`` makes them. Directories are UnixFS ``Directory``
nodes with links sorted by name. The same bytes therefore give the same CID
here and in kubo, which the interop tests check against a real kubo.

Everything is streamed: the importer holds one chunk and the link lists of the
open tree nodes, the reader yields one block's data at a time. The decoders
take untrusted blocks from peers and raise ``UnixfsError`` on anything
malformed.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from joynode.storage.cid import DAG_PB, RAW, Cid, CidError
from joynode.storage.protobuf import (
    ProtobufError,
    bytes_field,
    expect_bytes,
    expect_varint,
    iter_fields,
    varint_field,
)

CHUNK_SIZE = 256 * 1024
MAX_LINKS = 174
MAX_DIRECTORY_BLOCK = 256 * 1024  # beyond this kubo shards the directory (HAMT)
MAX_NAME_BYTES = 255

PutBlock = Callable[[Cid, bytes], object]
GetBlock = Callable[[Cid], bytes]


class UnixfsError(ValueError):
    """A block or a DAG that is not well-formed UnixFS, or a path that cannot be added."""


class NodeType(enum.IntEnum):
    RAW = 0
    DIRECTORY = 1
    FILE = 2
    METADATA = 3
    SYMLINK = 4
    HAMT_SHARD = 5


@dataclass(frozen=True, slots=True)
class Link:
    cid: Cid
    name: str
    tsize: int  # cumulative bytes of the linked subtree's blocks


@dataclass(frozen=True, slots=True)
class PbNode:
    links: tuple[Link, ...]
    data: bytes


@dataclass(frozen=True, slots=True)
class UnixfsData:
    type: NodeType
    data: bytes = b""
    filesize: int | None = None
    blocksizes: tuple[int, ...] = ()


# ---- codecs


def encode_pbnode(links: tuple[Link, ...] | list[Link], data: bytes) -> bytes:
    out = bytearray()
    for link in links:
        body = (
            bytes_field(1, link.cid.to_bytes())
            + bytes_field(2, link.name.encode())
            + varint_field(3, link.tsize)
        )
        out += bytes_field(2, body)
    out += bytes_field(1, data)
    return bytes(out)


def decode_pbnode(block: bytes | memoryview) -> PbNode:
    links: list[Link] = []
    data = b""
    try:
        for number, wire_type, value in iter_fields(block):
            if number == 1:
                data = bytes(expect_bytes(number, wire_type, value))
            elif number == 2:
                links.append(_decode_link(expect_bytes(number, wire_type, value)))
    except (ProtobufError, CidError, UnicodeDecodeError) as exc:
        raise UnixfsError(f"malformed dag-pb node: {exc}") from None
    return PbNode(tuple(links), data)


def _decode_link(raw: memoryview) -> Link:
    cid: Cid | None = None
    name = ""
    tsize = 0
    for number, wire_type, value in iter_fields(raw):
        if number == 1:
            cid = Cid.from_bytes(expect_bytes(number, wire_type, value))
        elif number == 2:
            name = bytes(expect_bytes(number, wire_type, value)).decode()
        elif number == 3:
            tsize = expect_varint(number, wire_type, value)
    if cid is None:
        raise UnixfsError("dag-pb link without a hash")
    return Link(cid, name, tsize)


def encode_unixfs(node: UnixfsData) -> bytes:
    out = varint_field(1, node.type)
    if node.data:
        out += bytes_field(2, node.data)
    if node.filesize is not None:
        out += varint_field(3, node.filesize)
    for size in node.blocksizes:
        out += varint_field(4, size)
    return out


def decode_unixfs(raw: bytes | memoryview) -> UnixfsData:
    node_type: int | None = None
    data = b""
    filesize: int | None = None
    blocksizes: list[int] = []
    try:
        for number, wire_type, value in iter_fields(raw):
            if number == 1:
                node_type = expect_varint(number, wire_type, value)
            elif number == 2:
                data = bytes(expect_bytes(number, wire_type, value))
            elif number == 3:
                filesize = expect_varint(number, wire_type, value)
            elif number == 4:
                blocksizes.append(expect_varint(number, wire_type, value))
        kind = NodeType(node_type) if node_type is not None else None
    except (ProtobufError, ValueError) as exc:
        raise UnixfsError(f"malformed UnixFS data: {exc}") from None
    if kind is None:
        raise UnixfsError("UnixFS data without a type")
    return UnixfsData(kind, data, filesize, tuple(blocksizes))


def links_of(cid: Cid, block: bytes | memoryview) -> tuple[Link, ...]:
    """The links out of a block (none for raw blocks)."""
    return () if cid.codec == RAW else decode_pbnode(block).links


# ---- importing


@dataclass(frozen=True, slots=True)
class _Built:
    cid: Cid
    tsize: int
    filesize: int


class Importer:
    """Turns files and folders into blocks, handing each to ``put`` as it is made.

    ``put`` runs in the caller's thread; ``import_path`` blocks on disk and
    hashing, so call it from a worker thread. ``on_chunk(bytes_read)`` is
    called after every chunk and may raise to abort.
    """

    def __init__(
        self,
        put: PutBlock,
        *,
        cid_version: int = 0,
        include_hidden: bool = False,
        on_chunk: Callable[[int], None] | None = None,
    ) -> None:
        if cid_version not in (0, 1):
            raise UnixfsError("cid_version is 0 or 1")
        self._put = put
        self._version = cid_version
        self._include_hidden = include_hidden
        self._on_chunk = on_chunk

    def import_path(self, path: Path) -> Link:
        """Add a file or a folder; the returned link names it (``name`` = its base name)."""
        if path.is_symlink():
            raise UnixfsError(f"{path}: symlinks are not supported")
        if path.is_dir():
            built = self._directory(path)
        elif path.is_file():
            with path.open("rb") as handle:
                built = self.import_stream(handle)
        else:
            raise UnixfsError(f"{path}: no such file or folder")
        return Link(built.cid, path.name, built.tsize)

    def import_stream(self, handle: BinaryIO) -> _Built:
        # The balanced layout: ``levels[h]`` holds the finished children of the
        # open node at height h + 1, and a node closes as soon as it is full.
        levels: list[list[_Built]] = [[]]
        count = 0
        for leaf in self._leaves(handle):
            count += 1
            self._push(levels, 0, leaf)
        if count == 1:
            return levels[0][0]
        height = 1
        while MAX_LINKS**height < count:
            height += 1
        levels.extend([] for _ in range(height + 1 - len(levels)))
        for h in range(height):
            if levels[h]:
                levels[h + 1].append(self._parent(levels[h]))
                levels[h] = []
        (root,) = levels[height]
        return root

    def _push(self, levels: list[list[_Built]], height: int, node: _Built) -> None:
        if len(levels) == height:
            levels.append([])
        levels[height].append(node)
        if len(levels[height]) == MAX_LINKS:
            full, levels[height] = levels[height], []
            self._push(levels, height + 1, self._parent(full))

    def _leaves(self, handle: BinaryIO) -> Iterator[_Built]:
        total = 0
        chunk = _read_chunk(handle)
        while True:
            total += len(chunk)
            if self._version == 0:
                block = encode_pbnode(
                    (), encode_unixfs(UnixfsData(NodeType.FILE, chunk, len(chunk)))
                )
                cid = Cid.of_block(block)
            else:
                block = chunk
                cid = Cid.of_block(block, codec=RAW, version=1)
            self._put(cid, block)
            if self._on_chunk is not None:
                self._on_chunk(total)
            yield _Built(cid, len(block), len(chunk))
            chunk = _read_chunk(handle)
            if not chunk:
                return

    def _parent(self, children: list[_Built]) -> _Built:
        sizes = tuple(c.filesize for c in children)
        data = encode_unixfs(UnixfsData(NodeType.FILE, b"", sum(sizes), sizes))
        block = encode_pbnode([Link(c.cid, "", c.tsize) for c in children], data)
        cid = Cid.of_block(block, codec=DAG_PB, version=self._version)
        self._put(cid, block)
        return _Built(cid, len(block) + sum(c.tsize for c in children), sum(sizes))

    def _directory(self, folder: Path) -> _Built:
        entries = [
            e for e in os.scandir(folder) if self._include_hidden or not e.name.startswith(".")
        ]
        for entry in entries:
            try:
                check_entry_name(entry.name)
            except (UnixfsError, UnicodeEncodeError):
                # Refused here because every reader (this node's too) would refuse it.
                raise UnixfsError(
                    f"{folder}: cannot add the entry {entry.name!r} (names must be valid "
                    "UTF-8 without '/', '\\' or NUL)"
                ) from None
        entries.sort(key=lambda e: e.name.encode())
        links = [self.import_path(Path(entry.path)) for entry in entries]
        if (
            sum(len(link.name.encode()) + len(link.cid.to_bytes()) for link in links)
            > MAX_DIRECTORY_BLOCK
        ):
            raise UnixfsError(
                f"{folder}: {len(links)} entries need a sharded (HAMT) directory, "
                "which is not supported"
            )
        block = encode_pbnode(links, encode_unixfs(UnixfsData(NodeType.DIRECTORY)))
        cid = Cid.of_block(block, codec=DAG_PB, version=self._version)
        self._put(cid, block)
        return _Built(cid, len(block) + sum(link.tsize for link in links), 0)


def _read_chunk(handle: BinaryIO) -> bytes:
    """Exactly CHUNK_SIZE bytes unless the stream ends (pipes return short reads)."""
    parts: list[bytes] = []
    missing = CHUNK_SIZE
    while missing:
        part = handle.read(missing)
        if not part:
            break
        parts.append(part)
        missing -= len(part)
    return b"".join(parts)


# ---- reading


def file_data(cid: Cid, block: bytes) -> tuple[bytes, tuple[Link, ...]]:
    """A file node's own bytes and its children, in file order."""
    if cid.codec == RAW:
        return block, ()
    node = decode_pbnode(block)
    meta = decode_unixfs(node.data)
    if meta.type not in (NodeType.FILE, NodeType.RAW):
        raise UnixfsError(f"{cid} is a UnixFS {meta.type.name.lower()}, not a file")
    return meta.data, node.links


def iter_file(get: GetBlock, cid: Cid) -> Iterator[bytes]:
    """The file's bytes, one block's worth at a time (depth first, as written)."""
    stack = [cid]
    while stack:
        current = stack.pop()
        data, links = file_data(current, get(current))
        if data:
            yield data
        stack.extend(link.cid for link in reversed(links))


def directory_entries(cid: Cid, block: bytes) -> tuple[Link, ...] | None:
    """A directory's entries (names checked safe to write), or None if ``cid`` is not one."""
    if cid.codec == RAW:
        return None
    node = decode_pbnode(block)
    meta = decode_unixfs(node.data)
    if meta.type == NodeType.HAMT_SHARD:
        raise UnixfsError(f"{cid} is a sharded (HAMT) directory, which is not supported")
    if meta.type != NodeType.DIRECTORY:
        return None
    seen: set[str] = set()
    for link in node.links:
        check_entry_name(link.name)
        if link.name in seen:
            raise UnixfsError(f"directory {cid} has two entries named {link.name!r}")
        seen.add(link.name)
    return node.links


def first_difference(get: GetBlock, cid: Cid, path: Path) -> str | None:
    """Where the file or folder at ``path`` differs from the DAG ``cid``; None if it is its copy.

    Every block is read through ``get`` (the block store checks each against
    its hash) and every byte under ``path`` is compared with it, so None means
    ``path`` holds exactly the bytes ``cid`` names, whatever chunking made it.
    An entry that is missing, extra, a symlink or of the wrong kind differs.
    """
    entries = directory_entries(cid, get(cid))
    if entries is None:
        return _file_difference(get, cid, path)
    if path.is_symlink() or not path.is_dir():
        return f"{path} is not a folder"
    names, present = {entry.name for entry in entries}, set(os.listdir(path))
    if extra := sorted(present - names):
        return f"{path / extra[0]} is not part of it"
    if missing := sorted(names - present):
        return f"{path / missing[0]} is missing"
    for entry in entries:
        if (found := first_difference(get, entry.cid, path / entry.name)) is not None:
            return found
    return None


def _file_difference(get: GetBlock, cid: Cid, path: Path) -> str | None:
    if path.is_symlink() or not path.is_file():
        return f"{path} is not a regular file"
    offset = 0
    with path.open("rb") as handle:
        for data in iter_file(get, cid):
            if handle.read(len(data)) != data:
                return f"{path} differs within bytes {offset}-{offset + len(data) - 1}"
            offset += len(data)
        if handle.read(1):
            return f"{path} is longer than {offset} bytes"
    return None


def check_entry_name(name: str) -> None:
    """Refuse names that would escape the target folder when written to disk."""
    if (
        not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\0" in name
        or len(name.encode()) > MAX_NAME_BYTES
    ):
        raise UnixfsError(f"unsafe directory entry name {name[:80]!r}")
