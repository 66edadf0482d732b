"""Content identifiers (CIDs): the address of every block the store holds.

Only what IPFS uses by default is accepted: sha2-256 multihashes, codecs
dag-pb and raw, CIDv0 (base58btc ``Qm...``) and CIDv1 (multibase base32
``b...`` for output; base32 or base58btc ``z...`` for input). Anything else is
refused with ``CidError`` rather than half-supported.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

import base58

from joynode.storage.protobuf import ProtobufError, decode_varint, encode_varint

DAG_PB = 0x70
RAW = 0x55
SHA2_256 = 0x12
DIGEST_BYTES = 32
CODEC_NAMES = {DAG_PB: "dag-pb", RAW: "raw"}
_MULTIHASH_PREFIX = bytes([SHA2_256, DIGEST_BYTES])


class CidError(ValueError):
    """Text or bytes that are not a CID this node understands."""


@dataclass(frozen=True, slots=True)
class Cid:
    version: int
    codec: int
    digest: bytes  # the sha2-256 digest of the block

    def __post_init__(self) -> None:
        if self.version not in (0, 1):
            raise CidError(f"CID version {self.version} is not supported")
        if self.codec not in CODEC_NAMES:
            raise CidError(f"codec 0x{self.codec:x} is not supported (dag-pb and raw are)")
        if self.version == 0 and self.codec != DAG_PB:
            raise CidError("a CIDv0 is always dag-pb")
        if len(self.digest) != DIGEST_BYTES:
            raise CidError("a sha2-256 digest is 32 bytes")

    @classmethod
    def of_block(cls, data: bytes | memoryview, *, codec: int = DAG_PB, version: int = 0) -> Cid:
        return cls(version, codec, hashlib.sha256(data).digest())

    @classmethod
    def parse(cls, text: str) -> Cid:
        """A CID from its text form (``Qm...``, ``b...`` or ``z...``)."""
        if not isinstance(text, str) or not text:
            raise CidError("a CID is a non-empty string")
        if not text.isascii():
            raise CidError(f"{text[:80]!r} is not a CID (non-ASCII characters)")
        try:
            if len(text) == 46 and text.startswith("Qm"):
                raw = base58.b58decode(text)
                if len(raw) != 34 or raw[:2] != _MULTIHASH_PREFIX:
                    raise CidError(f"{text!r} is not a valid CIDv0")
                return cls(0, DAG_PB, raw[2:])
            if text[0] in "bz":
                body = text[1:]
                raw = (
                    base64.b32decode(body.upper() + "=" * (-len(body) % 8))
                    if text[0] == "b"
                    else base58.b58decode(body)
                )
                cid = cls.from_bytes(raw)
                if cid.version == 0:
                    raise CidError(f"{text[:80]!r}: a CIDv0 has no multibase prefix")
                return cid
        except (ValueError, TypeError) as exc:
            if isinstance(exc, CidError):
                raise
            raise CidError(f"{text[:80]!r} is not a valid CID: {exc}") from None
        raise CidError(f"{text[:80]!r} is not a CID (expected Qm..., b... or z...)")

    @classmethod
    def from_bytes(cls, raw: bytes | memoryview) -> Cid:
        """A CID from its binary form (as in dag-pb links and Bitswap wantlists)."""
        raw = bytes(raw)
        if len(raw) == 34 and raw[:2] == _MULTIHASH_PREFIX:
            return cls(0, DAG_PB, raw[2:])
        version, codec, hash_code, length, offset = _read_header(raw, "binary CID")
        if version != 1:
            raise CidError(f"CID version {version} is not supported")
        if hash_code != SHA2_256 or length != DIGEST_BYTES or len(raw) != offset + length:
            raise CidError("only sha2-256 CIDs are supported")
        return cls(1, codec, raw[offset:])

    @classmethod
    def from_prefix(cls, prefix: bytes | memoryview, data: bytes | memoryview) -> Cid:
        """The CID of ``data`` under a Bitswap block prefix (version, codec, hash, length)."""
        version, codec, hash_code, length, offset = _read_header(prefix, "block prefix")
        if hash_code != SHA2_256 or length != DIGEST_BYTES or offset != len(prefix):
            raise CidError("only sha2-256 block prefixes are supported")
        return cls.of_block(data, codec=codec, version=version)

    @property
    def multihash(self) -> bytes:
        return _MULTIHASH_PREFIX + self.digest

    def to_bytes(self) -> bytes:
        if self.version == 0:
            return self.multihash
        return encode_varint(1) + encode_varint(self.codec) + self.multihash

    def prefix(self) -> bytes:
        """The Bitswap 1.1+ block prefix: version, codec, hash function, digest length."""
        return bytes(
            encode_varint(self.version)
            + encode_varint(self.codec)
            + encode_varint(SHA2_256)
            + encode_varint(DIGEST_BYTES)
        )

    def matches(self, data: bytes | memoryview) -> bool:
        """Whether ``data`` is the block this CID names (the integrity check)."""
        return hashlib.sha256(data).digest() == self.digest

    def to_v1(self) -> Cid:
        return Cid(1, self.codec, self.digest)

    def __str__(self) -> str:
        if self.version == 0:
            return base58.b58encode(self.multihash).decode()
        return "b" + base64.b32encode(self.to_bytes()).decode().lower().rstrip("=")

    def __repr__(self) -> str:
        return f"Cid({self})"


def _read_header(raw: bytes | memoryview, what: str) -> tuple[int, int, int, int, int]:
    """Version, codec, hash function and digest length varints, and the offset past them."""
    fields = []
    offset = 0
    try:
        for _ in range(4):
            value, offset = decode_varint(raw, offset)
            fields.append(value)
    except ProtobufError as exc:
        raise CidError(f"malformed {what}: {exc}") from None
    version, codec, hash_code, length = fields
    return version, codec, hash_code, length, offset
