"""The request/response protocol ``/joynet/rpc/1.0.0``.

One request per stream: the caller opens a stream, writes one frame, reads one
frame, and the stream is closed. A frame is a 4-byte big-endian length followed
by a ``wire`` message (msgpack). Frames over the cap are refused before they are
read; every request has a deadline on both sides.
"""

from __future__ import annotations

from typing import Protocol

from joynode import wire

PROTOCOL_ID = "/joynet/rpc/1.0.0"
HEADER_BYTES = 4


class RpcFailure(Exception):
    """A request that failed: transport, timeout, bad frame or a refusal by the peer."""


class ByteStream(Protocol):
    """The part of a libp2p stream the framing needs."""

    async def read(self, n: int | None = None) -> bytes: ...

    async def write(self, data: bytes) -> None: ...


async def write_frame(stream: ByteStream, message: wire.Message) -> None:
    frame = wire.encode(message)
    await stream.write(len(frame).to_bytes(HEADER_BYTES, "big") + frame)


async def read_exactly(stream: ByteStream, n: int) -> bytes:
    # libp2p streams may return fewer bytes than asked for.
    chunks, remaining = [], n
    while remaining:
        chunk = await stream.read(remaining)
        if not chunk:
            raise RpcFailure(f"stream ended {n - remaining} bytes into a {n}-byte read")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


async def read_frame(stream: ByteStream, max_bytes: int) -> wire.AnyMessage:
    """Read one frame; raise ``RpcFailure`` for oversize, and ``WireError`` for bad content."""
    length = int.from_bytes(await read_exactly(stream, HEADER_BYTES), "big")
    if length > max_bytes:
        raise RpcFailure(f"frame of {length} bytes exceeds the cap of {max_bytes}")
    return wire.decode(await read_exactly(stream, length), max_bytes)
