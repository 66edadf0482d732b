"""Signing with the node key and recovering who signed.

Signatures are recoverable secp256k1 signatures (65 bytes, r || s || v with v
in {0, 1}) over a keccak-256 digest, the form Ethereum contracts check with
``ecrecover``; every digest starts with a domain tag naming what is signed, so
a signature for one purpose can never be replayed as another.
"""

from __future__ import annotations

from eth_keys.datatypes import PrivateKey, PublicKey, Signature
from eth_keys.exceptions import BadSignature
from eth_utils.crypto import keccak
from eth_utils.exceptions import ValidationError

from joynode.keys import NodeKey

SIGNATURE_BYTES = 65


class SignatureError(Exception):
    """A signature that does not recover to any key."""


def digest(domain: bytes, *parts: bytes) -> bytes:
    """keccak256 over a domain tag and length-prefixed parts (unambiguous framing)."""
    return keccak(domain + b"".join(len(p).to_bytes(4, "big") + p for p in parts))


def sign(key: NodeKey, message_digest: bytes) -> bytes:
    return bytes(PrivateKey(key.secret).sign_msg_hash(message_digest).to_bytes())


def recover_address(message_digest: bytes, signature: bytes) -> str:
    """The checksummed address that produced ``signature`` over ``message_digest``."""
    try:
        recovered = Signature(signature).recover_public_key_from_msg_hash(message_digest)
    except (BadSignature, ValidationError, ValueError) as exc:
        raise SignatureError(f"unrecoverable signature: {exc}") from None
    return str(recovered.to_checksum_address())


def address_of_peer(peer_id: bytes) -> str | None:
    """The Ethereum address of a peer whose libp2p id embeds a secp256k1 key.

    Peer ids of small keys are identity multihashes of the public key, so the
    address follows from the id alone. Other key types give ``None``: such a
    peer cannot be a JoyNet node.
    """
    from libp2p.crypto.secp256k1 import Secp256k1PublicKey
    from libp2p.peer.id import ID

    public_key = ID(peer_id).extract_public_key()
    if not isinstance(public_key, Secp256k1PublicKey):
        return None
    return str(PublicKey.from_compressed_bytes(public_key.to_bytes()).to_checksum_address())
