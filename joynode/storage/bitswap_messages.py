"""Bitswap messages (``/ipfs/bitswap/1.2.0``, 1.1.0, 1.0.0) and their framing.

A stream carries messages, each prefixed by its length as an unsigned varint.
A received block is addressed by hashing it (under the prefix it came with),
so a block's CID always matches its bytes: a peer that serves wrong bytes
sends a block nobody asked for, which is how it gets caught.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from joynode.p2p.rpc import ByteStream, RpcFailure, read_exactly
from joynode.storage.cid import Cid, CidError
from joynode.storage.protobuf import (
    MAX_VARINT_BYTES,
    ProtobufError,
    bytes_field,
    decode_varint,
    encode_varint,
    expect_bytes,
    expect_varint,
    iter_fields,
    varint_field,
)

PROTOCOL_1_2 = "/ipfs/bitswap/1.2.0"
PROTOCOL_1_1 = "/ipfs/bitswap/1.1.0"
PROTOCOL_1_0 = "/ipfs/bitswap/1.0.0"
PROTOCOLS = (PROTOCOL_1_2, PROTOCOL_1_1, PROTOCOL_1_0)
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # go-bitswap's limit
MAX_ENTRIES = 8192


class BitswapError(ValueError):
    """A malformed or oversized Bitswap message."""


class WantType(enum.IntEnum):
    BLOCK = 0
    HAVE = 1


@dataclass(frozen=True, slots=True)
class WantEntry:
    cid: Cid
    want_type: WantType = WantType.BLOCK
    send_dont_have: bool = False
    cancel: bool = False
    priority: int = 1


@dataclass(slots=True)
class BitswapMessage:
    wants: list[WantEntry] = field(default_factory=list)
    full_wantlist: bool = False
    blocks: list[tuple[Cid, bytes]] = field(default_factory=list)
    haves: list[Cid] = field(default_factory=list)
    dont_haves: list[Cid] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not (
            self.wants or self.full_wantlist or self.blocks or self.haves or self.dont_haves
        )


def encode(message: BitswapMessage, protocol: str = PROTOCOL_1_2) -> bytes:
    """One message body (without its length prefix) for the negotiated ``protocol``."""
    out = bytearray()
    if message.wants or message.full_wantlist:
        wantlist = bytearray()
        for entry in message.wants:
            if entry.want_type == WantType.HAVE and protocol != PROTOCOL_1_2:
                continue  # older peers only know want-block
            body = (
                bytes_field(1, entry.cid.to_bytes())
                + varint_field(2, entry.priority)
                + (varint_field(3, 1) if entry.cancel else b"")
            )
            if protocol == PROTOCOL_1_2:
                body += varint_field(4, entry.want_type) + (
                    varint_field(5, 1) if entry.send_dont_have else b""
                )
            wantlist += bytes_field(1, body)
        if message.full_wantlist:
            wantlist += varint_field(2, 1)
        out += bytes_field(1, bytes(wantlist))
    for cid, data in message.blocks:
        if protocol == PROTOCOL_1_0:
            out += bytes_field(2, data)
        else:
            out += bytes_field(3, bytes_field(1, cid.prefix()) + bytes_field(2, data))
    if protocol == PROTOCOL_1_2:
        for kind, cids in ((0, message.haves), (1, message.dont_haves)):
            for cid in cids:
                out += bytes_field(4, bytes_field(1, cid.to_bytes()) + varint_field(2, kind))
    return bytes(out)


def decode(body: bytes | memoryview) -> BitswapMessage:
    message = BitswapMessage()
    entries = 0
    try:
        for number, wire_type, value in iter_fields(body):
            if number == 1:
                _decode_wantlist(expect_bytes(number, wire_type, value), message)
            elif number == 2:
                data = bytes(expect_bytes(number, wire_type, value))
                message.blocks.append((Cid.of_block(data), data))
            elif number == 3:
                message.blocks.append(_decode_block(expect_bytes(number, wire_type, value)))
            elif number == 4:
                _decode_presence(expect_bytes(number, wire_type, value), message)
            entries += 1
            if entries > MAX_ENTRIES or len(message.wants) > MAX_ENTRIES:
                raise BitswapError(f"more than {MAX_ENTRIES} entries in one message")
    except (ProtobufError, CidError) as exc:
        raise BitswapError(f"malformed bitswap message: {exc}") from None
    return message


def _decode_wantlist(raw: memoryview, message: BitswapMessage) -> None:
    for number, wire_type, value in iter_fields(raw):
        if number == 1:
            message.wants.append(_decode_entry(expect_bytes(number, wire_type, value)))
            if len(message.wants) > MAX_ENTRIES:
                raise BitswapError(f"more than {MAX_ENTRIES} wantlist entries")
        elif number == 2:
            message.full_wantlist = bool(expect_varint(number, wire_type, value))


def _decode_entry(raw: memoryview) -> WantEntry:
    cid: Cid | None = None
    want_type, send_dont_have, cancel, priority = WantType.BLOCK, False, False, 1
    for number, wire_type, value in iter_fields(raw):
        if number == 1:
            cid = Cid.from_bytes(expect_bytes(number, wire_type, value))
        elif number == 2:
            priority = expect_varint(number, wire_type, value)
        elif number == 3:
            cancel = bool(expect_varint(number, wire_type, value))
        elif number == 4:
            want_type = WantType.HAVE if expect_varint(number, wire_type, value) else WantType.BLOCK
        elif number == 5:
            send_dont_have = bool(expect_varint(number, wire_type, value))
    if cid is None:
        raise BitswapError("wantlist entry without a CID")
    return WantEntry(cid, want_type, send_dont_have, cancel, priority)


def _decode_block(raw: memoryview) -> tuple[Cid, bytes]:
    prefix: memoryview | None = None
    data = b""
    for number, wire_type, value in iter_fields(raw):
        if number == 1:
            prefix = expect_bytes(number, wire_type, value)
        elif number == 2:
            data = bytes(expect_bytes(number, wire_type, value))
    if prefix is None:
        raise BitswapError("block without a prefix")
    return Cid.from_prefix(prefix, data), data


def _decode_presence(raw: memoryview, message: BitswapMessage) -> None:
    cid: Cid | None = None
    dont_have = False
    for number, wire_type, value in iter_fields(raw):
        if number == 1:
            cid = Cid.from_bytes(expect_bytes(number, wire_type, value))
        elif number == 2:
            dont_have = expect_varint(number, wire_type, value) == 1
    if cid is None:
        raise BitswapError("block presence without a CID")
    (message.dont_haves if dont_have else message.haves).append(cid)


async def write_message(stream: ByteStream, message: BitswapMessage, protocol: str) -> None:
    body = encode(message, protocol)
    await stream.write(encode_varint(len(body)) + body)


async def read_message(stream: ByteStream) -> BitswapMessage | None:
    """The next message, or None when the peer closed the stream between messages."""
    header = bytearray()
    while True:
        byte = await stream.read(1)
        if not byte:
            if header:
                raise BitswapError("stream ended inside a length prefix")
            return None
        header += byte
        if not byte[0] & 0x80:
            break
        if len(header) >= MAX_VARINT_BYTES:
            raise BitswapError("length prefix too long")
    length, _ = decode_varint(bytes(header))
    if length > MAX_MESSAGE_BYTES:
        raise BitswapError(f"message of {length} bytes exceeds the cap of {MAX_MESSAGE_BYTES}")
    try:
        body = await read_exactly(stream, length)
    except RpcFailure as exc:
        raise BitswapError(str(exc)) from None
    return decode(body)
