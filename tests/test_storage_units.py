"""Unit tests for the IPFS-compatible storage layer: protobuf, CIDs, UnixFS,
the block store and Bitswap messages. No network, no kubo: pure functions,
a dict-backed store and ``tmp_path``."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import random
import shutil
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path

import base58
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from joynode.storage import bitswap_messages as bsm
from joynode.storage.bitswap_messages import (
    MAX_ENTRIES,
    MAX_MESSAGE_BYTES,
    PROTOCOL_1_0,
    PROTOCOL_1_1,
    PROTOCOL_1_2,
    BitswapError,
    BitswapMessage,
    WantEntry,
    WantType,
)
from joynode.storage.blockstore import BlockNotFound, Blockstore, StoreFull
from joynode.storage.cid import DAG_PB, RAW, SHA2_256, Cid, CidError
from joynode.storage.protobuf import (
    FIXED32,
    FIXED64,
    LENGTH_DELIMITED,
    VARINT,
    ProtobufError,
    bytes_field,
    decode_varint,
    encode_varint,
    expect_bytes,
    expect_varint,
    iter_fields,
    varint_field,
)
from joynode.storage.unixfs import (
    CHUNK_SIZE,
    MAX_LINKS,
    Importer,
    Link,
    NodeType,
    UnixfsData,
    UnixfsError,
    decode_pbnode,
    decode_unixfs,
    directory_entries,
    encode_pbnode,
    encode_unixfs,
    file_data,
    first_difference,
    iter_file,
)

EMPTY_FILE_V0 = "QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH"
HELLO_WORLD_V0 = "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o"
EMPTY_DIR_V0 = "QmUNLLsPACCz1vLxQVkXqqLX5R1X345qqfHbsf67hvA3Nn"
EMPTY_DIR_V1 = "bafybeiczsscdsbs7ffqz55asqdf3smv6klcw3gofszvwlyarci47bgf354"
EMPTY_FILE_V1_RAW = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"

digests = st.binary(min_size=32, max_size=32)
any_cid = st.one_of(
    st.builds(lambda d: Cid(0, DAG_PB, d), digests),
    st.builds(lambda c, d: Cid(1, c, d), st.sampled_from([DAG_PB, RAW]), digests),
)


def raw_cid(data: bytes) -> Cid:
    return Cid.of_block(data, codec=RAW, version=1)


def pseudo_random(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


# ---- protobuf


@given(st.integers(0, 2**64 - 1), st.binary(max_size=4))
def test_varint_round_trip(value: int, before: bytes) -> None:
    encoded = encode_varint(value)
    assert 1 <= len(encoded) <= 10
    assert decode_varint(before + encoded + b"\xff", len(before)) == (
        value,
        len(before) + len(encoded),
    )


def test_varint_known_encodings() -> None:
    known = [(0, b"\x00"), (1, b"\x01"), (127, b"\x7f"), (128, b"\x80\x01"), (300, b"\xac\x02")]
    for value, encoded in known:
        assert encode_varint(value) == encoded
        assert decode_varint(encoded) == (value, len(encoded))
    with pytest.raises(ValueError, match="unsigned"):
        encode_varint(-1)


def test_truncated_varint(subtests: pytest.Subtests) -> None:
    for buf in [b"", b"\x80", b"\xff\xff", encode_varint(2**63)[:-1]]:
        with subtests.test(buf=buf), pytest.raises(ProtobufError, match="truncated"):
            decode_varint(buf)
    with pytest.raises(ProtobufError, match="truncated"):
        decode_varint(b"\x01", 1)
    assert decode_varint(b"\x80" * 9 + b"\x01") == (1 << 63, 10)
    with pytest.raises(ProtobufError, match="longer than 10 bytes"):
        decode_varint(b"\x80" * 10 + b"\x00")


def test_iter_fields_decodes_every_supported_wire_type() -> None:
    buf = (
        varint_field(1, 150)
        + bytes_field(2, b"abc")
        + encode_varint(3 << 3 | FIXED64)
        + (7).to_bytes(8, "little")
        + encode_varint(4 << 3 | FIXED32)
        + (9).to_bytes(4, "little")
    )
    fields = [(n, w, bytes(v) if isinstance(v, memoryview) else v) for n, w, v in iter_fields(buf)]
    assert fields == [(1, VARINT, 150), (2, LENGTH_DELIMITED, b"abc"), (3, FIXED64, 7), (4, 5, 9)]


def test_field_running_past_the_end(subtests: pytest.Subtests) -> None:
    cases = {
        "bytes": bytes_field(1, b"abcdef")[:-1],
        "huge-length": encode_varint(1 << 3 | LENGTH_DELIMITED) + encode_varint(2**40) + b"x",
        "fixed64": encode_varint(1 << 3 | FIXED64) + b"\x00" * 7,
        "fixed32": encode_varint(1 << 3 | FIXED32) + b"\x00" * 3,
    }
    for case, buf in cases.items():
        with subtests.test(case), pytest.raises(ProtobufError, match="runs past the end"):
            list(iter_fields(varint_field(1, 1) + buf))


def test_unsupported_wire_types(subtests: pytest.Subtests) -> None:
    for wire_type in (3, 4, 6, 7):
        with (
            subtests.test(wire_type=wire_type),
            pytest.raises(ProtobufError, match="unsupported wire type"),
        ):
            list(iter_fields(encode_varint(1 << 3 | wire_type) + b"\x00" * 8))


def test_malformed_fields_and_wrong_wire_types() -> None:
    with pytest.raises(ProtobufError, match="field number 0"):
        list(iter_fields(b"\x00\x00"))
    with pytest.raises(ProtobufError, match="truncated"):
        list(iter_fields(encode_varint(1 << 3 | VARINT)))
    assert expect_varint(1, VARINT, 5) == 5
    assert bytes(expect_bytes(1, LENGTH_DELIMITED, memoryview(b"x"))) == b"x"
    with pytest.raises(ProtobufError, match="should be a varint"):
        expect_varint(1, LENGTH_DELIMITED, memoryview(b"x"))
    with pytest.raises(ProtobufError, match="should be length-delimited"):
        expect_bytes(1, VARINT, 5)


@given(st.binary(max_size=256))
def test_iter_fields_on_random_bytes_raises_only_protobuf_error(buf: bytes) -> None:
    try:
        for _ in iter_fields(buf):
            pass
    except ProtobufError:
        pass


# ---- Cid


def test_known_cids() -> None:
    for text in (EMPTY_FILE_V0, HELLO_WORLD_V0, EMPTY_DIR_V0, EMPTY_DIR_V1, EMPTY_FILE_V1_RAW):
        cid = Cid.parse(text)
        assert str(cid) == text
        assert repr(cid) == f"Cid({text})"
        assert Cid.from_bytes(cid.to_bytes()) == cid
        assert Cid.from_bytes(memoryview(cid.to_bytes())) == cid
        assert cid.version == (0 if text.startswith("Qm") else 1)
    v0 = Cid.parse(EMPTY_FILE_V0)
    assert (v0.version, v0.codec) == (0, DAG_PB)
    assert v0.matches(bytes.fromhex("0a0408021800"))
    assert len(v0.to_bytes()) == 34
    assert v0.to_bytes() == v0.multihash == bytes([SHA2_256, 32]) + v0.digest
    v1 = Cid.parse(EMPTY_FILE_V1_RAW)
    assert (v1.version, v1.codec) == (1, RAW)
    assert v1 == raw_cid(b"")
    assert v1.to_bytes() == b"\x01\x55" + v1.multihash
    assert v0.to_v1() == Cid(1, DAG_PB, v0.digest)
    assert str(v0.to_v1()).startswith("bafybei")


@given(any_cid)
def test_cid_round_trips(cid: Cid) -> None:
    assert Cid.from_bytes(cid.to_bytes()) == cid
    assert Cid.parse(str(cid)) == cid
    if cid.version == 1:
        assert Cid.parse("z" + base58.b58encode(cid.to_bytes()).decode()) == cid
        assert Cid.parse(str(cid).upper().replace("B", "b", 1)) == cid


@given(st.sampled_from([(0, DAG_PB), (1, DAG_PB), (1, RAW)]), st.binary(max_size=64))
def test_prefix_round_trip(kind: tuple[int, int], data: bytes) -> None:
    version, codec = kind
    cid = Cid.of_block(data, codec=codec, version=version)
    assert cid.matches(data)
    assert Cid.from_prefix(cid.prefix(), data) == cid
    assert Cid.from_prefix(memoryview(cid.prefix()), memoryview(data)) == cid
    assert cid.prefix() == bytes([version, codec, SHA2_256, 32])


def sha256_v1(
    codec: int, hash_code: int = SHA2_256, length: int = 32, digest_len: int = 32
) -> bytes:
    return (
        encode_varint(1)
        + encode_varint(codec)
        + encode_varint(hash_code)
        + encode_varint(length)
        + b"\x07" * digest_len
    )


def test_from_bytes_rejects(subtests: pytest.Subtests) -> None:
    cases = {
        "sha512": sha256_v1(RAW, hash_code=0x13, length=64, digest_len=64),
        "sha1": sha256_v1(RAW, hash_code=0x11, length=20, digest_len=20),
        "sha512-v0-shape": bytes([0x13, 0x40]) + b"\x07" * 64,
        "short-digest": sha256_v1(RAW, length=31, digest_len=31),
        "truncated-digest": sha256_v1(RAW, digest_len=31),
        "trailing-byte": sha256_v1(RAW, digest_len=33),
        "dag-cbor": sha256_v1(0x71),
        "dag-json": sha256_v1(0x0129),
        "version-2": b"\x02" + sha256_v1(RAW)[1:],
        "version-0-in-v1-form": b"\x00" + sha256_v1(DAG_PB)[1:],
        "v0-33-bytes": bytes([SHA2_256, 32]) + b"\x07" * 31,
        "empty": b"",
        "truncated-header": b"\x01\x55\x12",
    }
    for case, raw in cases.items():
        with subtests.test(case), pytest.raises(CidError):
            Cid.from_bytes(raw)


def test_cid_constructor_rejects() -> None:
    digest = b"\x07" * 32
    with pytest.raises(CidError, match="always dag-pb"):
        Cid(0, RAW, digest)
    with pytest.raises(CidError, match="not supported"):
        Cid(1, 0x71, digest)
    with pytest.raises(CidError, match="version"):
        Cid(2, RAW, digest)
    with pytest.raises(CidError, match="32 bytes"):
        Cid(1, RAW, digest[:-1])


def test_from_prefix_rejects(subtests: pytest.Subtests) -> None:
    cases = {
        "v0-raw": bytes([0, RAW, SHA2_256, 32]),
        "dag-cbor": bytes([1, 0x71, SHA2_256, 32]),
        "sha512": bytes([1, RAW, 0x13, 64]),
        "short": bytes([1, RAW, SHA2_256, 20]),
        "trailing": bytes([1, RAW, SHA2_256, 32, 0]),
        "truncated": bytes([1, RAW, SHA2_256]),
        "version-2": bytes([2, RAW, SHA2_256, 32]),
    }
    for case, prefix in cases.items():
        with subtests.test(case), pytest.raises(CidError):
            Cid.from_prefix(prefix, b"data")


def test_parse_rejects_garbage(subtests: pytest.Subtests) -> None:
    garbage = [
        "",
        "Qm",
        "Qm" + "0" * 44,  # '0' is not base58
        "Qm" + "1" * 44,
        EMPTY_FILE_V0[:-1],
        EMPTY_FILE_V0 + "a",
        "b",
        "bafy!!!",
        "b" + "a" * 7,
        EMPTY_FILE_V1_RAW[:-2],
        EMPTY_FILE_V1_RAW + "a",
        "z",
        "z0OIl",
        "zQmbFMke",
        "x" + EMPTY_FILE_V1_RAW[1:],
        "f01551220",
        " " + EMPTY_FILE_V0,
        "Qmé" + "1" * 43,
        "bé",
        "zé",
    ]
    for text in garbage:
        with subtests.test(text=text), pytest.raises(CidError):
            Cid.parse(text)
    with pytest.raises(CidError):
        Cid.parse(b"Qm")  # type: ignore[arg-type]


@given(st.text(max_size=80))
def test_parse_random_text_raises_only_cid_error(text: str) -> None:
    with contextlib.suppress(CidError):
        Cid.parse(text)


@given(
    st.sampled_from(["b", "z", "Qm"]),
    st.text(alphabet="123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz=!é", max_size=60),
)
def test_parse_random_text_with_cid_prefixes_raises_only_cid_error(head: str, tail: str) -> None:
    with contextlib.suppress(CidError):
        Cid.parse(head + tail)


@given(st.binary(max_size=80))
def test_from_bytes_random_raises_only_cid_error(raw: bytes) -> None:
    try:
        cid = Cid.from_bytes(raw)
    except CidError:
        return
    assert cid.to_bytes() == raw


def test_parse_rejects_non_ascii_look_alikes() -> None:
    lookalike = EMPTY_FILE_V1_RAW.replace("i", "\u0131", 1)
    assert lookalike != EMPTY_FILE_V1_RAW
    with pytest.raises(CidError):
        Cid.parse(lookalike)


# ---- unixfs: files


class DictStore:
    def __init__(self) -> None:
        self.blocks: dict[Cid, bytes] = {}
        self.puts: list[Cid] = []

    def put(self, cid: Cid, data: bytes) -> None:
        assert cid.matches(data)
        self.blocks[cid] = data
        self.puts.append(cid)

    def get(self, cid: Cid) -> bytes:
        return self.blocks[cid]


def import_bytes(data: bytes, version: int) -> tuple[DictStore, Cid, int]:
    store = DictStore()
    built = Importer(store.put, cid_version=version).import_stream(io.BytesIO(data))
    assert built.filesize == len(data)
    return store, built.cid, built.tsize


def expected_blocks(size: int) -> int:
    """Leaves plus the parents of a balanced DAG with MAX_LINKS links per node."""
    chunks = max(1, -(-size // CHUNK_SIZE))
    total, level = chunks, chunks
    while level > 1:
        level = -(-level // MAX_LINKS)
        total += level
    return total


class Shape:
    def __init__(self) -> None:
        self.leaf_depths: set[int] = set()
        self.leaves = 0


def walk(store: DictStore, cid: Cid, version: int, depth: int, shape: Shape) -> tuple[int, int]:
    """Check one subtree; its (cumulative block bytes, file bytes)."""
    block = store.blocks[cid]
    if cid.codec == RAW:
        assert version == 1
        shape.leaf_depths.add(depth)
        shape.leaves += 1
        return len(block), len(block)
    assert cid.version == version
    node = decode_pbnode(block)
    meta = decode_unixfs(node.data)
    assert meta.type == NodeType.FILE
    if not node.links:
        assert version == 0
        assert meta.filesize == len(meta.data)
        assert meta.blocksizes == ()
        shape.leaf_depths.add(depth)
        shape.leaves += 1
        return len(block), len(meta.data)
    assert 1 <= len(node.links) <= MAX_LINKS
    assert meta.data == b""
    total, filesize, sizes = len(block), 0, []
    for link in node.links:
        assert link.name == ""
        before = shape.leaves
        child_total, child_size = walk(store, link.cid, version, depth + 1, shape)
        assert link.tsize == child_total
        if link is not node.links[-1]:
            # balanced: every child but the last is a full subtree
            (leaf_depth,) = shape.leaf_depths
            assert shape.leaves - before == MAX_LINKS ** (leaf_depth - depth - 1)
        total += child_total
        filesize += child_size
        sizes.append(child_size)
    assert meta.blocksizes == tuple(sizes)
    assert meta.filesize == filesize
    return total, filesize


def check_file_dag(data: bytes, version: int) -> tuple[DictStore, Cid]:
    store, root, tsize = import_bytes(data, version)
    assert b"".join(iter_file(store.get, root)) == data
    shape = Shape()
    assert walk(store, root, version, 0, shape) == (tsize, len(data))
    assert len(shape.leaf_depths) == 1, "every leaf at the same depth"
    assert len(store.puts) == len(set(store.puts)) == expected_blocks(len(data))
    assert sum(len(store.blocks[c]) for c in store.puts) == tsize
    return store, root


@pytest.fixture(scope="module")
def big_data() -> bytes:
    return pseudo_random(MAX_LINKS * CHUNK_SIZE + 1, seed=174)


@pytest.mark.parametrize("version", [0, 1])
def test_import_and_read_back(big_data: bytes, version: int, subtests: pytest.Subtests) -> None:
    sizes = [0, 1, CHUNK_SIZE, CHUNK_SIZE + 1, MAX_LINKS * CHUNK_SIZE, MAX_LINKS * CHUNK_SIZE + 1]
    for size in sizes:
        with subtests.test(size=size):
            check_file_dag(big_data[:size], version)


@settings(max_examples=8, deadline=None)
@given(st.integers(0, 3 * CHUNK_SIZE + 10), st.sampled_from([0, 1]))
def test_import_and_read_back_random_sizes(size: int, version: int) -> None:
    check_file_dag(pseudo_random(size, seed=size), version)


def test_block_counts_and_depths(big_data: bytes) -> None:
    assert expected_blocks(0) == expected_blocks(1) == expected_blocks(CHUNK_SIZE) == 1
    assert expected_blocks(CHUNK_SIZE + 1) == 3
    assert expected_blocks(MAX_LINKS * CHUNK_SIZE) == MAX_LINKS + 1
    # 175 chunks: 175 leaves, two level-1 nodes (174 + 1 leaves), one root
    assert expected_blocks(MAX_LINKS * CHUNK_SIZE + 1) == 175 + 2 + 1
    store, root = check_file_dag(big_data, 0)
    top = decode_pbnode(store.blocks[root]).links
    assert [len(decode_pbnode(store.blocks[link.cid]).links) for link in top] == [MAX_LINKS, 1]


def test_known_file_cids(tmp_path: Path) -> None:
    known = [
        (b"", 0, EMPTY_FILE_V0),
        (b"hello world\n", 0, HELLO_WORLD_V0),
        (b"", 1, EMPTY_FILE_V1_RAW),
    ]
    for data, version, text in known:
        _, root, _ = import_bytes(data, version)
        assert str(root) == text
    (tmp_path / "hello").write_bytes(b"hello world\n")
    link = Importer(DictStore().put).import_path(tmp_path / "hello")
    assert (str(link.cid), link.name) == (HELLO_WORLD_V0, "hello")


def test_v1_layout(big_data: bytes) -> None:
    store, root, tsize = import_bytes(b"hello world\n", 1)
    assert root == raw_cid(b"hello world\n")
    assert store.blocks == {root: b"hello world\n"}
    assert tsize == 12
    store, root, _ = import_bytes(big_data[: 2 * CHUNK_SIZE], 1)
    assert (root.version, root.codec) == (1, DAG_PB)
    assert [link.cid.codec for link in decode_pbnode(store.blocks[root]).links] == [RAW, RAW]


class CountingReader(io.BytesIO):
    def __init__(self, data: bytes, short: int | None = None) -> None:
        super().__init__(data)
        self.requests: list[int | None] = []
        self.short = short

    def read(self, size: int | None = -1, /) -> bytes:
        self.requests.append(size)
        if self.short is not None and size is not None and size > self.short:
            size = self.short
        return super().read(size)


def test_importer_streams_in_chunk_sized_reads() -> None:
    data = pseudo_random(3 * CHUNK_SIZE + 5)
    reader = CountingReader(data)
    store = DictStore()
    built = Importer(store.put).import_stream(reader)
    assert reader.requests, "the importer read nothing"
    assert all(n is not None and 0 < n <= CHUNK_SIZE for n in reader.requests), reader.requests
    assert max(n or 0 for n in reader.requests) == CHUNK_SIZE
    assert b"".join(iter_file(store.get, built.cid)) == data


def test_short_reads_give_the_same_cid() -> None:
    data = pseudo_random(2 * CHUNK_SIZE + 77)
    _, expected, _ = import_bytes(data, 0)
    reader = CountingReader(data, short=10_000)
    built = Importer(DictStore().put).import_stream(reader)
    assert built.cid == expected
    assert all(n is not None and n <= CHUNK_SIZE for n in reader.requests)


def test_on_chunk_reports_progress_and_can_abort() -> None:
    data = pseudo_random(2 * CHUNK_SIZE + 5)
    seen: list[int] = []
    Importer(DictStore().put, on_chunk=seen.append).import_stream(io.BytesIO(data))
    assert seen == [CHUNK_SIZE, 2 * CHUNK_SIZE, 2 * CHUNK_SIZE + 5]

    def abort(total: int) -> None:
        raise RuntimeError(f"stop at {total}")

    store = DictStore()
    with pytest.raises(RuntimeError, match=f"stop at {CHUNK_SIZE}"):
        Importer(store.put, on_chunk=abort).import_stream(io.BytesIO(data))
    assert len(store.puts) == 1


# ---- unixfs: directories


def make_tree(root: Path) -> None:
    root.mkdir()
    (root / "b.txt").write_bytes(b"bee\n")
    (root / "a.txt").write_bytes(b"ay\n")
    (root / "Z").write_bytes(b"")
    (root / "é").write_bytes(b"accent\n")
    (root / ".hidden").write_bytes(b"secret\n")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_bytes(b"ref\n")
    (root / "sub").mkdir()
    (root / "sub" / "inner.bin").write_bytes(pseudo_random(CHUNK_SIZE + 3))
    (root / "sub" / "deeper").mkdir()


def tsize_of(store: DictStore, cid: Cid) -> int:
    block = store.blocks[cid]
    if cid.codec == RAW:
        return len(block)
    return len(block) + sum(tsize_of(store, link.cid) for link in decode_pbnode(block).links)


@pytest.mark.parametrize("version", [0, 1])
def test_directory_import(tmp_path: Path, version: int) -> None:
    make_tree(tmp_path / "tree")
    store = DictStore()
    link = Importer(store.put, cid_version=version).import_path(tmp_path / "tree")
    assert link.name == "tree"
    assert link.cid.version == version
    assert link.tsize == tsize_of(store, link.cid)
    entries = directory_entries(link.cid, store.blocks[link.cid])
    assert entries is not None
    names = [e.name for e in entries]
    assert names == ["Z", "a.txt", "b.txt", "sub", "é"]
    assert names == sorted(names, key=lambda n: n.encode())
    by_name = {e.name: e for e in entries}
    for entry in entries:
        assert entry.tsize == tsize_of(store, entry.cid)
    assert b"".join(iter_file(store.get, by_name["b.txt"].cid)) == b"bee\n"
    assert b"".join(iter_file(store.get, by_name["Z"].cid)) == b""
    sub = directory_entries(by_name["sub"].cid, store.blocks[by_name["sub"].cid])
    assert sub is not None
    assert [e.name for e in sub] == ["deeper", "inner.bin"]
    assert (
        b"".join(iter_file(store.get, sub[1].cid)) == (tmp_path / "tree/sub/inner.bin").read_bytes()
    )
    deeper = directory_entries(sub[0].cid, store.blocks[sub[0].cid])
    assert deeper == ()
    assert str(sub[0].cid) == (EMPTY_DIR_V0 if version == 0 else EMPTY_DIR_V1)
    # a directory is not a file
    with pytest.raises(UnixfsError, match="not a file"):
        list(iter_file(store.get, link.cid))
    # a file is not a directory
    assert directory_entries(by_name["a.txt"].cid, store.blocks[by_name["a.txt"].cid]) is None


def test_hidden_entries(tmp_path: Path) -> None:
    make_tree(tmp_path / "tree")
    store = DictStore()
    link = Importer(store.put, include_hidden=True).import_path(tmp_path / "tree")
    entries = directory_entries(link.cid, store.blocks[link.cid])
    assert entries is not None
    assert [e.name for e in entries] == [".git", ".hidden", "Z", "a.txt", "b.txt", "sub", "é"]
    git = directory_entries(entries[0].cid, store.blocks[entries[0].cid])
    assert git is not None
    assert [e.name for e in git] == ["HEAD"]
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / ".link").symlink_to(tmp_path)
    link = Importer(DictStore().put).import_path(tmp_path / "plain")
    assert str(link.cid) == EMPTY_DIR_V0


def test_empty_directory_cid(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for version, text in ((0, EMPTY_DIR_V0), (1, EMPTY_DIR_V1)):
        link = Importer(DictStore().put, cid_version=version).import_path(tmp_path / "empty")
        assert str(link.cid) == text
        assert link.tsize == 4


def test_symlinks_are_refused(tmp_path: Path) -> None:
    make_tree(tmp_path / "tree")
    (tmp_path / "tree" / "sub" / "link").symlink_to(tmp_path / "tree" / "a.txt")
    with pytest.raises(UnixfsError, match="symlinks"):
        Importer(DictStore().put).import_path(tmp_path / "tree")
    (tmp_path / "top").symlink_to(tmp_path / "tree" / "a.txt")
    with pytest.raises(UnixfsError, match="symlinks"):
        Importer(DictStore().put).import_path(tmp_path / "top")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(UnixfsError, match="symlinks"):
        Importer(DictStore().put).import_path(tmp_path / "dangling")


def test_importer_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(UnixfsError, match="no such file"):
        Importer(DictStore().put).import_path(tmp_path / "missing")
    with pytest.raises(UnixfsError):
        Importer(DictStore().put, cid_version=2)


def test_non_utf8_file_name_is_a_unixfs_error(tmp_path: Path) -> None:
    (tmp_path / "tree").mkdir()
    with open(os.path.join(os.fsencode(tmp_path / "tree"), b"\xff"), "wb") as handle:
        handle.write(b"x")
    with pytest.raises(UnixfsError):
        Importer(DictStore().put).import_path(tmp_path / "tree")


def test_imported_directories_are_readable(tmp_path: Path) -> None:
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "a\\b").write_bytes(b"x")
    store = DictStore()
    # Refused when added, since every reader (this node's too) refuses it.
    with pytest.raises(UnixfsError, match="cannot add the entry"):
        Importer(store.put).import_path(tmp_path / "tree")


@pytest.mark.parametrize("version", [0, 1])
def test_first_difference_finds_any_change_to_a_copy(tmp_path: Path, version: int) -> None:
    tree = tmp_path / "model"
    (tree / "sub").mkdir(parents=True)
    weights = pseudo_random(3 * CHUNK_SIZE + 7, seed=7)
    (tree / "weights.bin").write_bytes(weights)
    (tree / "sub" / "config.json").write_bytes(b"{}")
    store = DictStore()
    root = Importer(store.put, cid_version=version).import_path(tree).cid
    assert first_difference(store.get, root, tree) is None
    copy = tmp_path / "copy"

    def after(change: Callable[[], object]) -> str | None:
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(tree, copy)
        change()
        return first_difference(store.get, root, copy)

    def flip_a_bit(at: int) -> None:
        data = bytearray(weights)
        data[at] ^= 1
        (copy / "weights.bin").write_bytes(bytes(data))

    def same_bytes_behind_a_symlink() -> None:
        (copy / "weights.bin").rename(tmp_path / "elsewhere.bin")
        (copy / "weights.bin").symlink_to(tmp_path / "elsewhere.bin")

    def a_file_for_a_folder() -> None:
        shutil.rmtree(copy / "sub")
        (copy / "sub").write_bytes(b"")

    last = 3 * CHUNK_SIZE
    expected: dict[Callable[[], object], str] = {
        partial(flip_a_bit, 2 * CHUNK_SIZE + 5): (
            f"weights.bin differs within bytes {2 * CHUNK_SIZE}-{last - 1}"
        ),
        partial((copy / "weights.bin").write_bytes, weights[:-1]): (
            f"weights.bin differs within bytes {last}-{last + 6}"
        ),
        partial((copy / "weights.bin").write_bytes, weights + b"!"): (
            f"weights.bin is longer than {len(weights)} bytes"
        ),
        partial((copy / "extra.bin").write_bytes, b""): "extra.bin is not part of it",
        (copy / "sub" / "config.json").unlink: "sub/config.json is missing",
        same_bytes_behind_a_symlink: "weights.bin is not a regular file",
        a_file_for_a_folder: "sub is not a folder",
    }
    for change, difference in expected.items():
        assert after(change) == f"{copy}/{difference}"
    # Blocks the store no longer holds cannot vouch for anything.
    del store.blocks[root]
    with pytest.raises(KeyError):
        first_difference(store.get, root, tree)


# ---- unixfs: decoders


def directory_block(*names: str) -> bytes:
    child = raw_cid(b"child")
    links = [Link(child, name, 5) for name in names]
    return encode_pbnode(links, encode_unixfs(UnixfsData(NodeType.DIRECTORY)))


def test_pbnode_and_unixfs_codecs_round_trip() -> None:
    links = (Link(raw_cid(b"x"), "x", 1), Link(Cid.of_block(b"y"), "é", 2**40))
    meta = UnixfsData(NodeType.FILE, b"data", 10, (4, 6))
    block = encode_pbnode(links, encode_unixfs(meta))
    node = decode_pbnode(block)
    assert node.links == links
    assert decode_unixfs(node.data) == meta
    # canonical dag-pb: links (field 2) before data (field 1)
    assert [n for n, _, _ in iter_fields(block)] == [2, 2, 1]


def test_directory_entries_refuses_unsafe_names(subtests: pytest.Subtests) -> None:
    cases: dict[str, tuple[str, ...]] = {
        "dotdot": ("..",),
        "dot": (".",),
        "slash": ("a/b",),
        "absolute": ("/abs",),
        "backslash": ("a\\b",),
        "empty": ("",),
        "nul": ("a\0b",),
        "too-long": ("x" * 256,),
        "too-long-in-bytes": ("é" * 128,),
        "duplicate": ("a", "b", "a"),
    }
    for case, names in cases.items():
        block = directory_block(*names)
        with subtests.test(case), pytest.raises(UnixfsError):
            directory_entries(Cid.of_block(block), block)


def test_directory_entries_accepts_ordinary_names() -> None:
    names = ("...", ".hidden", "a b", "x" * 255, "é" * 127, "名前")
    block = directory_block(*names)
    entries = directory_entries(Cid.of_block(block), block)
    assert entries is not None
    assert tuple(e.name for e in entries) == names


def test_directory_entries_of_other_kinds() -> None:
    hamt = encode_pbnode([], encode_unixfs(UnixfsData(NodeType.HAMT_SHARD)))
    with pytest.raises(UnixfsError, match="HAMT"):
        directory_entries(Cid.of_block(hamt), hamt)
    assert directory_entries(raw_cid(b"x"), b"x") is None
    symlink = encode_pbnode([], encode_unixfs(UnixfsData(NodeType.SYMLINK, b"/etc")))
    assert directory_entries(Cid.of_block(symlink), symlink) is None
    with pytest.raises(UnixfsError, match="not a file"):
        file_data(Cid.of_block(symlink), symlink)


def test_decode_pbnode_rejects(subtests: pytest.Subtests) -> None:
    cases: dict[str, bytes] = {
        "link-without-hash": bytes_field(2, varint_field(3, 1)),
        "bad-cid": bytes_field(2, bytes_field(1, b"\x01\x71" + b"\x00" * 34)),
        "name-not-utf8": bytes_field(
            2, bytes_field(1, raw_cid(b"").to_bytes()) + bytes_field(2, b"\xff")
        ),
        "data-as-varint": varint_field(1, 5),
        "truncated": bytes_field(1, b"x")[:-1],
    }
    for case, block in cases.items():
        with subtests.test(case), pytest.raises(UnixfsError):
            decode_pbnode(block)


def test_decode_unixfs_rejects(subtests: pytest.Subtests) -> None:
    cases: dict[str, bytes] = {
        "no-type": b"",
        "unknown-type": varint_field(1, 9),
        "type-as-bytes": bytes_field(1, b"x"),
        "data-as-varint": varint_field(1, 2) + varint_field(2, 1),
    }
    for case, raw in cases.items():
        with subtests.test(case), pytest.raises(UnixfsError):
            decode_unixfs(raw)


@given(st.binary(max_size=300))
def test_decoders_raise_only_unixfs_error(block: bytes) -> None:
    for decoder in (decode_pbnode, decode_unixfs):
        with contextlib.suppress(UnixfsError):
            decoder(block)
    with contextlib.suppress(UnixfsError):
        directory_entries(Cid.of_block(block), block)


@given(
    st.lists(st.text(max_size=8), max_size=4),
    st.sampled_from(list(NodeType)),
)
def test_directory_entries_on_generated_nodes_raises_only_unixfs_error(
    names: list[str], kind: NodeType
) -> None:
    block = encode_pbnode(
        [Link(raw_cid(n.encode()), n, 1) for n in names], encode_unixfs(UnixfsData(kind))
    )
    try:
        entries = directory_entries(Cid.of_block(block), block)
    except UnixfsError:
        return
    if entries is not None:
        assert kind == NodeType.DIRECTORY
        assert len({e.name for e in entries}) == len(entries)


# ---- blockstore


@pytest.fixture
def store(tmp_path: Path) -> Blockstore:
    blockstore = Blockstore(tmp_path / "blocks", 0)
    blockstore.open()
    return blockstore


def flatfs_path(root: Path, cid: Cid) -> Path:
    key = base64.b32encode(cid.multihash).decode().rstrip("=")
    return root / key[-3:-1] / f"{key}.data"


def test_put_get_has_delete(store: Blockstore) -> None:
    cid = raw_cid(b"hello")
    assert not store.has(cid)
    with pytest.raises(BlockNotFound):
        store.get(cid)
    assert store.put(cid, b"hello") is True
    assert store.has(cid)
    assert store.get(cid) == b"hello"
    assert store.put(cid, b"hello") is False
    # keyed by multihash: the CIDv0 of the same bytes is the same block
    v0 = Cid.of_block(b"hello")
    assert store.has(v0)
    assert store.put(v0, b"hello") is False
    assert store.get(v0) == b"hello"
    stats = store.statistics()
    assert (stats.blocks, stats.bytes, stats.puts, stats.gets) == (1, 5, 1, 2)
    assert store.delete(cid.multihash) == 5
    assert store.delete(cid.multihash) is None
    assert not store.has(cid)
    stats = store.statistics()
    assert (stats.blocks, stats.bytes, stats.quota_bytes) == (0, 0, 0)
    cid = raw_cid(b"view")
    assert store.put(cid, memoryview(b"view"))
    assert store.get(cid) == b"view"


def test_flatfs_layout(tmp_path: Path, store: Blockstore) -> None:
    cid = Cid.parse(HELLO_WORLD_V0)
    store.put(cid, bytes.fromhex("0a1208021206") + b"hello world\n" + b"\x18\x0c")
    path = flatfs_path(tmp_path / "blocks", cid)
    assert path.is_file()
    assert path.name.startswith("CIQ")  # kubo's keys: base32 of the multihash, upper case
    assert path.parent.name == path.name.removesuffix(".data")[-3:-1]
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "blocks").rglob("*")) == [
        path.parent.relative_to(tmp_path),
        path.relative_to(tmp_path),
    ]


def test_quota(tmp_path: Path) -> None:
    store = Blockstore(tmp_path / "blocks", quota_bytes=10)
    store.open()
    assert store.put(raw_cid(b"123456"), b"123456")
    with pytest.raises(StoreFull, match=r"storage\.gc") as info:
        store.put(raw_cid(b"abcdef"), b"abcdef")
    assert "6 of 10 bytes" in str(info.value)
    assert not store.has(raw_cid(b"abcdef"))
    # an existing block is no new data
    assert store.put(raw_cid(b"123456"), b"123456") is False
    assert store.put(raw_cid(b"1234"), b"1234")  # exactly at the quota
    stats = store.statistics()
    assert (stats.blocks, stats.bytes, stats.quota_bytes, stats.puts) == (2, 10, 10, 2)


def test_damaged_block_is_dropped(tmp_path: Path, store: Blockstore) -> None:
    cid = raw_cid(b"precious")
    store.put(cid, b"precious")
    path = flatfs_path(tmp_path / "blocks", cid)
    path.write_bytes(b"precioUs")
    with pytest.raises(BlockNotFound):
        store.get(cid)
    assert not path.exists()
    assert not store.has(cid)
    stats = store.statistics()
    assert (stats.blocks, stats.bytes, stats.corrupt_dropped) == (0, 0, 1)
    # fetched again, it is served again
    assert store.put(cid, b"precious")
    assert store.get(cid) == b"precious"


def test_reopen_counts_blocks_and_removes_stray_temporaries(tmp_path: Path) -> None:
    first = Blockstore(tmp_path / "blocks", 0)
    first.open()
    data = [b"one", b"three", b"seven"]
    for item in data:
        first.put(raw_cid(item), item)
    shard = flatfs_path(tmp_path / "blocks", raw_cid(b"one")).parent
    stray = shard / ".tmp-123-456-partial"
    stray.write_bytes(b"half a block")
    (tmp_path / "blocks" / "README").write_text("not a shard\n")
    second = Blockstore(tmp_path / "blocks", 0)
    second.open()
    assert not stray.exists()
    stats = second.statistics()
    assert (stats.blocks, stats.bytes, stats.puts, stats.gets) == (3, 13, 0, 0)
    assert all(second.get(raw_cid(item)) == item for item in data)


def test_open_removes_temporaries_left_by_put(tmp_path: Path) -> None:
    store = Blockstore(tmp_path / "blocks", 0)
    store.open()
    cid = raw_cid(b"whole")
    store.put(cid, b"whole")
    path = flatfs_path(tmp_path / "blocks", cid)
    # what put leaves behind when the process dies between write and rename
    leftover = path.parent / f".tmp-{os.getpid()}-{threading.get_ident()}"
    leftover.write_bytes(b"wh")
    reopened = Blockstore(tmp_path / "blocks", 0)
    reopened.open()
    assert not leftover.exists()
    assert (reopened.statistics().blocks, reopened.statistics().bytes) == (1, 5)


def test_all_multihashes(tmp_path: Path, store: Blockstore) -> None:
    assert list(store.all_multihashes()) == []
    cids = [raw_cid(bytes([i])) for i in range(20)] + [Cid.of_block(b"v0 block")]
    for cid in cids:
        store.put(cid, bytes([cids.index(cid)]) if cid.codec == RAW else b"v0 block")
    shard = flatfs_path(tmp_path / "blocks", cids[0]).parent
    (shard / "not-base32!.data").write_bytes(b"")
    (shard / "notes.txt").write_bytes(b"")
    assert sorted(store.all_multihashes()) == sorted(c.multihash for c in cids)


def test_concurrent_puts_of_one_block_count_it_once(
    store: Blockstore, monkeypatch: pytest.MonkeyPatch
) -> None:
    cid = raw_cid(b"same")
    barrier = threading.Barrier(2, timeout=5)
    real_link = os.link

    def link_together(src: str | Path, dst: str | Path) -> None:
        # both threads have passed the exists() check before either links
        barrier.wait()
        real_link(src, dst)

    monkeypatch.setattr(os, "link", link_together)
    results: list[bool] = []
    threads = [threading.Thread(target=lambda: results.append(store.put(cid, b"same")))]
    threads.append(threading.Thread(target=lambda: results.append(store.put(cid, b"same"))))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    monkeypatch.undo()
    assert sorted(results) == [False, True]
    assert (store.statistics().blocks, store.statistics().bytes) == (1, 4)


# ---- bitswap messages


CID_A = Cid.of_block(b"a")
CID_B = raw_cid(b"b")
CID_C = Cid(1, DAG_PB, Cid.of_block(b"c").digest)


def full_message() -> BitswapMessage:
    return BitswapMessage(
        wants=[
            WantEntry(CID_A, WantType.BLOCK, send_dont_have=True, priority=7),
            WantEntry(CID_B, WantType.HAVE, send_dont_have=True),
            WantEntry(CID_C, cancel=True),
        ],
        full_wantlist=True,
        blocks=[(Cid.of_block(b"block one"), b"block one"), (raw_cid(b"two"), b"two")],
        haves=[CID_A, CID_B],
        dont_haves=[CID_C],
    )


def test_round_trip_1_2_and_empty_messages() -> None:
    message = full_message()
    assert bsm.decode(bsm.encode(message, PROTOCOL_1_2)) == message
    assert bsm.encode(message) == bsm.encode(message, PROTOCOL_1_2)


def test_round_trip_1_1_drops_want_have_and_presences() -> None:
    decoded = bsm.decode(bsm.encode(full_message(), PROTOCOL_1_1))
    assert decoded == BitswapMessage(
        wants=[WantEntry(CID_A, priority=7), WantEntry(CID_C, cancel=True)],
        full_wantlist=True,
        blocks=full_message().blocks,
    )


def test_round_trip_1_0_blocks_become_cidv0() -> None:
    decoded = bsm.decode(bsm.encode(full_message(), PROTOCOL_1_0))
    assert decoded.wants == [WantEntry(CID_A, priority=7), WantEntry(CID_C, cancel=True)]
    assert decoded.full_wantlist
    assert decoded.blocks == [
        (Cid.of_block(b"block one"), b"block one"),
        (Cid.of_block(b"two"), b"two"),
    ]
    assert (decoded.haves, decoded.dont_haves) == ([], [])
    assert bsm.encode(BitswapMessage()) == b""
    decoded = bsm.decode(b"")
    assert decoded.is_empty()
    assert not full_message().is_empty()
    assert not BitswapMessage(full_wantlist=True).is_empty()
    assert bsm.decode(bsm.encode(BitswapMessage(full_wantlist=True))).full_wantlist


@given(
    st.sampled_from([PROTOCOL_1_2, PROTOCOL_1_1, PROTOCOL_1_0]),
    any_cid,
    st.sampled_from([(0, DAG_PB), (1, DAG_PB), (1, RAW)]),
    st.binary(max_size=64),
)
def test_decoded_block_cid_is_the_hash_of_its_data(
    protocol: str, claimed: Cid, kind: tuple[int, int], data: bytes
) -> None:
    version, codec = kind
    label = Cid(version, codec, claimed.digest)  # a CID that (almost surely) is not of data
    decoded = bsm.decode(bsm.encode(BitswapMessage(blocks=[(label, data)]), protocol))
    ((cid, got),) = decoded.blocks
    assert got == data
    assert cid.matches(data)
    if protocol != PROTOCOL_1_0:
        assert (cid.version, cid.codec) == (version, codec)


@given(st.binary(max_size=512))
def test_decode_random_bytes_raises_only_bitswap_error(body: bytes) -> None:
    try:
        message = bsm.decode(body)
    except BitswapError:
        return
    for cid, data in message.blocks:
        assert cid.matches(data)


@given(st.data())
def test_decode_mutated_messages_raises_only_bitswap_error(data: st.DataObject) -> None:
    body = bytearray(bsm.encode(full_message()))
    for _ in range(data.draw(st.integers(1, 3))):
        body[data.draw(st.integers(0, len(body) - 1))] = data.draw(st.integers(0, 255))
    with contextlib.suppress(BitswapError):
        bsm.decode(bytes(body))


def test_decode_rejects(subtests: pytest.Subtests) -> None:
    cases: dict[str, bytes] = {
        "want-without-cid": bytes_field(1, bytes_field(1, varint_field(2, 1))),
        "block-without-prefix": bytes_field(3, bytes_field(2, b"data")),
        "v0-raw-prefix": bytes_field(3, bytes_field(1, bytes([0, RAW, SHA2_256, 32]))),
        "presence-without-cid": bytes_field(4, varint_field(2, 1)),
        "presence-bad-cid": bytes_field(4, bytes_field(1, b"\x01\x71")),
        "wantlist-as-varint": varint_field(1, 1),
        "truncated": bytes_field(1, b"abc")[:-1],
    }
    for case, body in cases.items():
        with subtests.test(case), pytest.raises(BitswapError):
            bsm.decode(body)


def test_entry_caps() -> None:
    wants = [WantEntry(raw_cid(i.to_bytes(2, "big"))) for i in range(MAX_ENTRIES + 1)]
    assert len(bsm.decode(bsm.encode(BitswapMessage(wants=wants[:-1]))).wants) == MAX_ENTRIES
    with pytest.raises(BitswapError, match=str(MAX_ENTRIES)):
        bsm.decode(bsm.encode(BitswapMessage(wants=wants)))
    haves = [w.cid for w in wants]
    with pytest.raises(BitswapError, match=str(MAX_ENTRIES)):
        bsm.decode(bsm.encode(BitswapMessage(haves=haves)))
    blocks = [(Cid.of_block(b""), b"")] * (MAX_ENTRIES + 1)
    with pytest.raises(BitswapError, match=str(MAX_ENTRIES)):
        bsm.decode(bsm.encode(BitswapMessage(blocks=blocks), PROTOCOL_1_0))
    # entries spread over several wantlist fields count together
    half = bsm.encode(BitswapMessage(wants=wants[: MAX_ENTRIES // 2 + 1]))
    with pytest.raises(BitswapError, match=str(MAX_ENTRIES)):
        bsm.decode(half + half)


class FakeStream:
    """Hands out the bytes given, at most ``step`` per read; b'' at the end."""

    def __init__(self, data: bytes, step: int = 1_000_000) -> None:
        self.data = data
        self.step = step
        self.written = bytearray()
        self.reads = 0

    async def read(self, n: int | None = None) -> bytes:
        self.reads += 1
        take = min(self.step, len(self.data) if n is None else n)
        out, self.data = self.data[:take], self.data[take:]
        return out

    async def write(self, data: bytes) -> None:
        self.written += data


def framed(message: BitswapMessage, protocol: str = PROTOCOL_1_2) -> bytes:
    body = bsm.encode(message, protocol)
    return encode_varint(len(body)) + body


async def test_read_message_split_reads_and_eof() -> None:
    second = BitswapMessage(blocks=[(raw_cid(b"x" * 300), b"x" * 300)])
    frames = framed(full_message()) + framed(BitswapMessage()) + framed(second)
    for step in (1, 2, 7, 1_000_000):
        stream = FakeStream(frames, step)
        assert await bsm.read_message(stream) == full_message(), step
        assert await bsm.read_message(stream) == BitswapMessage(), step
        assert await bsm.read_message(stream) == second, step
        assert await bsm.read_message(stream) is None, step
        assert stream.data == b""
    assert await bsm.read_message(FakeStream(b"")) is None
    stream = FakeStream(framed(BitswapMessage(full_wantlist=True)))
    assert await bsm.read_message(stream) == BitswapMessage(full_wantlist=True)
    assert await bsm.read_message(stream) is None


async def test_write_then_read_message() -> None:
    stream = FakeStream(b"")
    await bsm.write_message(stream, full_message(), PROTOCOL_1_2)
    await bsm.write_message(stream, full_message(), PROTOCOL_1_1)
    reader = FakeStream(bytes(stream.written), step=3)
    assert await bsm.read_message(reader) == full_message()
    decoded = await bsm.read_message(reader)
    assert decoded is not None
    assert decoded.haves == []
    assert await bsm.read_message(reader) is None


async def test_read_message_size_cap() -> None:
    with pytest.raises(BitswapError, match="exceeds the cap"):
        await bsm.read_message(FakeStream(encode_varint(MAX_MESSAGE_BYTES + 1) + b"\x00" * 16))
    # a body of exactly the cap is read: 1 tag byte + 4 length bytes + the block
    data = b"\x00" * (MAX_MESSAGE_BYTES - 5)
    message = BitswapMessage(blocks=[(Cid.of_block(data), data)])
    assert len(bsm.encode(message, PROTOCOL_1_0)) == MAX_MESSAGE_BYTES
    assert await bsm.read_message(FakeStream(framed(message, PROTOCOL_1_0))) == message


async def test_read_message_errors() -> None:
    cases = [
        (b"\x80", "inside a length prefix"),
        (b"\xff\xff", "inside a length prefix"),
        (framed(BitswapMessage(full_wantlist=True)) + b"\x80", "inside a length prefix"),
        (b"\x80" * 10 + b"\x01", "too long"),
        (b"\x05abc", "stream ended"),
        (b"\x02\x08\x01", "malformed"),
    ]
    for data, match in cases:
        stream = FakeStream(data, step=1)
        with pytest.raises(BitswapError, match=match):  # noqa: PT012 (a message may come first)
            while await bsm.read_message(stream) is not None:
                pass
