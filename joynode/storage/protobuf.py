"""The protobuf wire format, by hand, for dag-pb, UnixFS and Bitswap.

dag-pb's canonical form puts ``Links`` (field 2) before ``Data`` (field 1),
which generated protobuf code does not do, and a CID only matches kubo's if
the bytes do. Decoding takes untrusted bytes from peers: every length is
bounds-checked and anything malformed raises ``ProtobufError``.
"""

from __future__ import annotations

from collections.abc import Iterator

VARINT = 0
FIXED64 = 1
LENGTH_DELIMITED = 2
FIXED32 = 5
MAX_VARINT_BYTES = 10


class ProtobufError(ValueError):
    """Bytes that are not a well-formed protobuf message."""


def encode_varint(value: int) -> bytes:
    if value < 0:
        raise ValueError("varints here are unsigned")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_varint(buf: bytes | memoryview, offset: int = 0) -> tuple[int, int]:
    """The varint at ``offset`` and the offset just past it."""
    value = 0
    for i in range(MAX_VARINT_BYTES):
        if offset + i >= len(buf):
            raise ProtobufError("truncated varint")
        byte = buf[offset + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, offset + i + 1
    raise ProtobufError("varint longer than 10 bytes")


def varint_field(number: int, value: int) -> bytes:
    return encode_varint(number << 3 | VARINT) + encode_varint(value)


def bytes_field(number: int, payload: bytes) -> bytes:
    return encode_varint(number << 3 | LENGTH_DELIMITED) + encode_varint(len(payload)) + payload


def iter_fields(buf: bytes | memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """``(field number, wire type, value)``; length-delimited values are views into ``buf``."""
    view = memoryview(buf)
    offset = 0
    while offset < len(view):
        key, offset = decode_varint(view, offset)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise ProtobufError("field number 0")
        if wire_type == VARINT:
            value, offset = decode_varint(view, offset)
            yield number, wire_type, value
        elif wire_type == LENGTH_DELIMITED:
            length, offset = decode_varint(view, offset)
            if length > len(view) - offset:
                raise ProtobufError(f"field {number} runs past the end of the message")
            yield number, wire_type, view[offset : offset + length]
            offset += length
        elif wire_type in (FIXED64, FIXED32):
            width = 8 if wire_type == FIXED64 else 4
            if width > len(view) - offset:
                raise ProtobufError(f"field {number} runs past the end of the message")
            yield number, wire_type, int.from_bytes(view[offset : offset + width], "little")
            offset += width
        else:
            raise ProtobufError(f"unsupported wire type {wire_type} in field {number}")


def expect_varint(number: int, wire_type: int, value: int | memoryview) -> int:
    if wire_type != VARINT or not isinstance(value, int):
        raise ProtobufError(f"field {number} should be a varint")
    return value


def expect_bytes(number: int, wire_type: int, value: int | memoryview) -> memoryview:
    if wire_type != LENGTH_DELIMITED or isinstance(value, int):
        raise ProtobufError(f"field {number} should be length-delimited")
    return value
